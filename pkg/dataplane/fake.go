package dataplane

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/netagent/netagent/pkg/netipx"
	"github.com/netagent/netagent/pkg/plan"
)

// Fake is a dataplane in memory, in the spirit of knftables' Fake: it holds the last plan
// set (deltas applied onto it, as the kernel would hold them), can be told to fail, and
// prints its state as sorted text. It lets the agent's loop be tested without root.
type Fake struct {
	mu       sync.Mutex
	underlay Underlay
	state    *plan.Plan // nil before the first successful full Set
	gen      uint64
	fails    []error // the next Sets fail with these, in order
	sets     int
	deltas   int
	prepared []plan.NAT
	changed  chan struct{}
	kernel   chan struct{} // Watch's output: see Drift
	invalid  Part          // invalidated since the last full Set
	found    Part          // what the last full Set found invalidated
	wgKey    string        // the public WireGuard key WireGuardKey returns
}

// NewFake returns a fake whose underlay is u.
func NewFake(u Underlay) *Fake {
	return &Fake{underlay: u, changed: make(chan struct{}, 1), kernel: make(chan struct{}, 1)}
}

// Underlay returns the underlay the fake was given (SetUnderlay changes it).
func (f *Fake) Underlay(string, netip.Addr) (Underlay, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	u := f.underlay
	u.Connected = slices.Clone(u.Connected)
	return u, nil
}

// SetUnderlay changes what Underlay returns.
func (f *Fake) SetUnderlay(u Underlay) {
	f.mu.Lock()
	f.underlay = u
	f.mu.Unlock()
}

// Prepare records the NAT it was given.
func (f *Fake) Prepare(_ context.Context, n plan.NAT) {
	f.mu.Lock()
	f.prepared = append(f.prepared, n)
	f.mu.Unlock()
}

// GuardWireGuard does nothing: the fake has no firewall.
func (f *Fake) GuardWireGuard(*plan.WGDevice) {}

// PrepareWireGuard does nothing: the fake's WireGuard device is its plan's, made by Set.
func (f *Fake) PrepareWireGuard(context.Context, *plan.WGDevice) {}

// Fail makes the next len(errs) Sets fail with errs, in order, changing nothing.
func (f *Fake) Fail(errs ...error) {
	f.mu.Lock()
	f.fails = append(f.fails, errs...)
	f.mu.Unlock()
}

// Set applies p (or its delta) to the fake's state, or fails as told.
func (f *Fake) Set(_ context.Context, p plan.Plan) (Stats, error) {
	f.mu.Lock()
	defer func() {
		f.mu.Unlock()
		signal(f.changed)
	}()
	f.sets++
	from := f.gen
	f.gen = p.Gen
	if len(f.fails) > 0 {
		err := f.fails[0]
		f.fails = f.fails[1:]
		f.state = nil // a failed Set may have left anything: deltas are refused until a full one
		return Stats{}, err
	}
	if p.Delta != nil {
		if f.state == nil || p.Delta.From != from {
			return Stats{}, fmt.Errorf("%w: delta from plan %d, the fake has plan %d", ErrStale, p.Delta.From, from)
		}
		f.deltas++
		next := plan.Follow(*f.state, p)
		f.state = &next
		return Stats{}, nil
	}
	c := plan.Clone(p)
	f.state = &c
	f.found, f.invalid = f.invalid, 0
	return Stats{}, nil
}

// Invalidate records what was invalidated, for the next full Set.
func (f *Fake) Invalidate(parts Part) {
	f.mu.Lock()
	f.invalid |= parts
	f.mu.Unlock()
}

// Invalidated returns what was invalidated before the last successful full Set (what a
// real dataplane would have re-read from the kernel).
func (f *Fake) Invalidated() Part {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.found
}

// Watch signals changed whenever Drift is called, until ctx ends.
func (f *Fake) Watch(ctx context.Context, changed chan<- struct{}) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-f.kernel:
			signal(changed)
		}
	}
}

// Drift pretends someone changed the kernel under the agent: Watch reports it.
func (f *Fake) Drift() { signal(f.kernel) }

// Dropped is always 0.
func (f *Fake) Dropped() uint64 { return 0 }

// WireGuardKey returns a public key kept in memory (a new one with rotate), as Linux does
// with the key in the state directory.
func (f *Fake) WireGuardKey(_ string, rotate bool) (pub string, created bool, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	created = f.wgKey == ""
	if created || rotate {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			return "", false, err
		}
		f.wgKey = k.PublicKey().String()
	}
	return f.wgKey, created && !rotate, nil
}

// WireGuard reports no device: the fake has no kernel to read one from (its Dump shows
// the WireGuard device and peers it was set to hold).
func (f *Fake) WireGuard() (WGStatus, bool) { return WGStatus{}, false }

// Changed is signalled after every Set.
func (f *Fake) Changed() <-chan struct{} { return f.changed }

// Plan returns the state the fake holds (false before the first successful full Set).
func (f *Fake) Plan() (plan.Plan, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.state == nil {
		return plan.Plan{}, false
	}
	return plan.Clone(*f.state), true
}

// Counts returns how many Sets were called, and how many of them applied a delta.
func (f *Fake) Counts() (sets, deltas int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.sets, f.deltas
}

// Prepared returns the NATs Prepare was given.
func (f *Fake) Prepared() []plan.NAT {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.prepared)
}

// Dump prints the state as sorted lines, for comparison in tests.
func (f *Fake) Dump() string {
	p, ok := f.Plan()
	if !ok {
		return ""
	}
	var lines []string
	for _, r := range p.Routes {
		l := fmt.Sprintf("route %s via %s dev %s", r.Dst, r.Gw, r.Dev)
		if r.OnLink {
			l += " onlink"
		}
		if r.MTU != 0 {
			l += fmt.Sprintf(" mtu %d", r.MTU)
		}
		lines = append(lines, l)
	}
	for _, n := range p.Neighs {
		lines = append(lines, fmt.Sprintf("neigh %s %s", n.IP, n.MAC))
	}
	for _, e := range p.FDB {
		lines = append(lines, fmt.Sprintf("fdb %s dst %s", e.MAC, e.Dst))
	}
	for n, a := range p.Allow.Peers {
		lines = append(lines, fmt.Sprintf("allow %s from %s inner %s", n, a.IP, a.Subnet))
	}
	if v := p.VXLAN; v != nil {
		lines = append(lines, fmt.Sprintf("vxlan %s vni %d port %d dev %s local %s mac %s mtu %d", v.Name, v.VNI, v.Port, v.Underlay, v.Local, v.MAC, v.MTU))
	}
	if w := p.WireGuard; w != nil {
		l := fmt.Sprintf("wireguard %s port %d mtu %d addr %s underlay %s", w.Name, w.Port, w.MTU, w.Addr, w.Underlay)
		if w.Addr6.IsValid() {
			l += " addr6 " + w.Addr6.String()
		}
		lines = append(lines, l)
	}
	for _, w := range p.WGPeers {
		lines = append(lines, fmt.Sprintf("wgpeer %s key %s endpoint %s allowed %s", w.Node, w.PublicKey, w.Endpoint, netipx.Join(w.AllowedIPs())))
	}
	lines = append(lines, fmt.Sprintf("nat %s %s final %t", p.NAT.Network, p.NAT.Subnet, p.NAT.Final))
	slices.Sort(lines)
	return strings.Join(lines, "\n") + "\n"
}

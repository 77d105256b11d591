// Package dataplane makes the kernel hold what a plan says, in one call: Set(ctx, plan).
// It applies the VXLAN device and its neighbour and FDB entries first, then the routes
// that depend on them, then the VXLAN allow-list, then the NAT and FORWARD chains; it
// keeps going past a failure and reports them all. Nothing is decided here: every value
// comes from the plan, and no reconciler calls back into the planner.
//
// Each reconciler compares the plan against its mirror of the kernel (kept current by the
// kernel's own notifications, see Watch) and re-reads the kernel only when the mirror was
// invalidated (Invalidate: a notification overflow, someone else's firewall change, the
// resync ticker). A plan with a Delta (a lease event) touches only the entries the delta
// names: the incremental path is the difference of two consecutive plans, applied here.
//
// Scale: a full Set is O(plan) in memory plus the kernel writes it needs; a delta is
// O(delta). Only an invalidated mirror costs a dump of its table.
package dataplane

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/nat"
	"github.com/netagent/netagent/pkg/nlbatch"
	"github.com/netagent/netagent/pkg/nldump"
	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/pkg/route"
	"github.com/netagent/netagent/pkg/vxguard"
	"github.com/netagent/netagent/pkg/vxlan"
	"github.com/netagent/netagent/pkg/wireguard"
)

// Stats say what a Set changed, per reconciler.
type Stats struct {
	VXLAN     vxlan.Stats
	Routes    route.Stats
	Allow     vxguard.Stats
	NAT       nat.Stats
	WireGuard wireguard.Changes
}

// Changed reports whether Set touched the kernel.
func (s Stats) Changed() bool {
	return s.VXLAN.Changed() || s.Routes.Changed() || s.Allow.Changed() || s.NAT.Changed() || !s.WireGuard.Empty()
}

// Part names mirrors to invalidate.
type Part uint8

const (
	Tables Part = 1 << iota // routes, neighbour and FDB entries (netlink notifications keep them)
	Allow                   // the VXLAN allow-list (nftables)
	NAT                     // the NAT and FORWARD chains (iptables)
	All    = Tables | Allow | NAT
)

// ErrStale means Set was given a delta it cannot apply (it does not follow the plan Set
// last had, or a mirror is not valid): the caller sets a full plan instead.
var ErrStale = errors.New("dataplane: a full plan is needed")

// Underlay is the interface peers reach this node at, as the kernel has it now.
type Underlay struct {
	Dev       string
	IP        netip.Addr // the IPv4 address peers reach this node at (unset: none)
	IP6       netip.Addr // the IPv6 one (unset: none)
	MTU       int
	MAC       string // published for peers on the same L2 (empty: not Ethernet)
	Connected []netip.Prefix
	// Tentative6 says Dev has a global IPv6 address still in duplicate address detection
	// and no usable one yet (IP6 unset): it becomes usable in a second or two.
	Tentative6 bool
	// Tunnels are netagent's VXLAN devices in the kernel (plan.Underlay.Tunnels).
	Tunnels []plan.Tunnel
}

// Linux is the dataplane of the network namespace it was created in. Set, Prepare and
// Underlay are called by one goroutine (the agent's loop); Watch, Invalidate and Dropped
// may run concurrently with them.
type Linux struct {
	h     *netlink.Handle
	log   *slog.Logger
	route *route.Reconciler
	vxlan *vxlan.Reconciler
	guard *vxguard.Guard
	nat   *nat.Reconciler
	wg    *wgState // nil: no WireGuard backend (UseWireGuard)

	gen      uint64   // the plan Set was last given
	natPlan  plan.NAT // what the NAT chains were last made to hold
	natDirty atomic.Bool
	early    chan natResult // Prepare's NAT sync, taken by the next Set

	vxDev, ulDev, wgDev atomic.Value // string: the devices whose link events matter (read by Watch)
	ulIndex             atomic.Int64 // the underlay's link index: its address events matter (0: none yet)
	kept                string       // the last full plan's KeepVXLAN
}

// kernel is the netlink handle, with batched writes (a full pass's routes and neighbour
// and FDB entries) for the reconcilers.
type kernel struct {
	*netlink.Handle
	*nlbatch.Conn
}

// New opens the kernel of the current network namespace; iptables runs the NAT chains'
// iptables-save and -restore (nil: the binaries, in the agent's namespace).
func New(log *slog.Logger, iptables nat.Runner) (*Linux, error) {
	if iptables == nil {
		iptables = nat.Exec{}
	}
	h, err := netlink.NewHandle()
	if err != nil {
		return nil, fmt.Errorf("netlink: %w", err)
	}
	b, err := nlbatch.Open()
	if err != nil {
		h.Close()
		return nil, err
	}
	g, err := vxguard.New()
	if err != nil {
		h.Close()
		b.Close()
		return nil, err
	}
	k := kernel{h, b}
	d := &Linux{h: h, log: log, route: route.New(k, log), vxlan: vxlan.New(k, log), guard: g, nat: nat.New(iptables)}
	d.vxDev.Store("")
	d.ulDev.Store("")
	d.wgDev.Store("")
	d.natDirty.Store(true)
	// Passes diff against mirrors that kernel notifications keep current (see Watch).
	d.route.Mirror()
	d.vxlan.Mirror()
	// Routes leave a peer's VXLAN entries before the entries go (Set commits them after).
	d.vxlan.DeferDeletes()
	return d, nil
}

// Invalidate makes the next Set re-read the given parts of the kernel.
func (d *Linux) Invalidate(parts Part) {
	if parts&Tables != 0 {
		d.route.Invalidate()
		d.vxlan.Invalidate()
	}
	if parts&Allow != 0 {
		d.guard.Invalidate()
	}
	if parts&NAT != 0 {
		d.natDirty.Store(true)
	}
}

// Dropped is how many VXLAN packets the allow-list has dropped.
func (d *Linux) Dropped() uint64 { return d.guard.Dropped() }

type natResult struct {
	plan plan.NAT
	st   nat.Stats
	err  error
}

// Prepare starts writing the NAT chains of a plan ahead of the first Set: they depend on
// the config and the node's subnet only, and the iptables processes are slow, so they run
// while the peers are listed. The next Set takes the result when its plan has the same
// NAT.
func (d *Linux) Prepare(ctx context.Context, n plan.NAT) {
	ch := make(chan natResult, 1)
	d.early = ch
	go func() {
		st, err := d.nat.Sync(ctx, n)
		ch <- natResult{n, st, err}
	}()
}

// Set makes the kernel hold p. A plan with a Delta changes only what the delta names, and
// returns ErrStale when that is not possible.
func (d *Linux) Set(ctx context.Context, p plan.Plan) (Stats, error) {
	from := d.gen
	d.gen = p.Gen
	if p.Delta != nil {
		if p.Delta.From != from {
			return Stats{}, fmt.Errorf("%w: delta from plan %d, the dataplane has plan %d", ErrStale, p.Delta.From, from)
		}
		if p.KeepVXLAN != d.kept {
			return Stats{}, fmt.Errorf("%w: the kept VXLAN device changes (%q to %q)", ErrStale, d.kept, p.KeepVXLAN)
		}
		return d.apply(ctx, p.Delta)
	}
	var st Stats
	var errs []error
	keep := p.KeepVXLAN
	if p.VXLAN != nil {
		keep = p.VXLAN.Name
	}
	d.kept = p.KeepVXLAN
	d.vxDev.Store(keep)
	var err error
	// The WireGuard device and its peers before the routes through it.
	if err := d.setWireGuard(ctx, p, &st); err != nil {
		errs = append(errs, err)
	}
	// Neighbours and FDB entries before the routes that go through them; the ones no
	// longer wanted, and devices the plan does not name, after the routes left them.
	if st.VXLAN, err = d.vxlan.Sync(p.VXLAN, p.Neighs, p.FDB); err != nil {
		errs = append(errs, err)
	}
	if st.Routes, err = d.route.Sync(p.Routes); err != nil {
		errs = append(errs, err)
	}
	if err := d.commitVXLAN(&st.VXLAN); err != nil {
		errs = append(errs, err)
	}
	gone, err := d.vxlan.Prune(keep)
	st.VXLAN.Pruned += len(gone)
	if err != nil {
		errs = append(errs, err)
	}
	if err := d.pruneWireGuard(ctx, p, &st); err != nil {
		errs = append(errs, err)
	}
	if st.Allow, err = d.guard.Set(guardSpec(p.Allow)); err != nil {
		errs = append(errs, err)
	}
	// The firewall, the slow part, last, and only when it may differ.
	if d.natDirty.Swap(false) || p.NAT != d.natPlan || d.early != nil {
		d.natPlan = p.NAT
		if st.NAT, err = d.natSync(ctx, p.NAT); err != nil {
			d.natDirty.Store(true)
			errs = append(errs, err)
		}
	}
	return st, errors.Join(errs...)
}

// apply is the per-event path: only the delta's entries, against valid mirrors.
func (d *Linux) apply(ctx context.Context, delta *plan.Delta) (Stats, error) {
	var st Stats
	if delta.Empty() {
		return st, nil
	}
	var errs []error
	var err error
	if len(delta.WGPeers) > 0 {
		if d.wg == nil {
			return st, fmt.Errorf("%w: a WireGuard delta without WireGuard", ErrStale)
		}
		st.WireGuard, err = d.wg.apply(ctx, delta.WGPeers)
		if errors.Is(err, ErrStale) {
			return st, err
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	st.VXLAN, err = d.vxlan.Apply(delta.Neighs, delta.FDB)
	if errors.Is(err, vxlan.ErrNoMirror) {
		return st, fmt.Errorf("%w: %w", ErrStale, err)
	}
	if err != nil {
		errs = append(errs, err)
	}
	st.Routes, err = d.route.Apply(delta.Routes)
	if errors.Is(err, route.ErrNoMirror) {
		return st, fmt.Errorf("%w: %w", ErrStale, err)
	}
	if err != nil {
		errs = append(errs, err)
	}
	if err := d.commitVXLAN(&st.VXLAN); err != nil {
		errs = append(errs, err)
	}
	// The allow-list follows the peers: a new peer's packets are accepted from now.
	allow := make(map[string]vxguard.Peer, len(delta.Allow))
	for _, c := range delta.Allow {
		allow[c.Node] = vxguard.Peer(c.Allowed) // the zero Peer (Del) removes it
	}
	st.Allow, err = d.guard.Update(allow)
	if errors.Is(err, vxguard.ErrNoMirror) {
		return st, fmt.Errorf("%w: %w", ErrStale, err)
	}
	if err != nil {
		errs = append(errs, err)
	}
	return st, errors.Join(errs...)
}

// setWireGuard makes the WireGuard device hold the plan's (a plan without one leaves an
// existing device alone: the backend is changed by restarting the agents).
func (d *Linux) setWireGuard(ctx context.Context, p plan.Plan, st *Stats) error {
	name := ""
	if p.WireGuard != nil {
		name = p.WireGuard.Name
	}
	d.wgDev.Store(name)
	if d.wg == nil {
		if p.WireGuard != nil {
			return fmt.Errorf("the plan has a WireGuard device %s but the dataplane was not given WireGuard options", name)
		}
		return nil
	}
	var err error
	st.WireGuard, err = d.wg.sync(ctx, p.WireGuard, p.WGPeers)
	return err
}

// commitVXLAN removes the neighbour and FDB entries the last vxlan Sync or Apply left for
// after the routes, adding the count to st.
func (d *Linux) commitVXLAN(st *vxlan.Stats) error {
	c, err := d.vxlan.Commit()
	st.Add(c)
	return err
}

// natSync syncs the NAT chains to n, or takes Prepare's result when it was for n and
// succeeded.
func (d *Linux) natSync(ctx context.Context, n plan.NAT) (nat.Stats, error) {
	if ch := d.early; ch != nil {
		d.early = nil
		if r := <-ch; r.err == nil && r.plan == n {
			return r.st, nil
		}
	}
	return d.nat.Sync(ctx, n)
}

// guardSpec is the plan's allow-list in the guard's terms (a map of its own: the guard
// keeps it as its mirror).
func guardSpec(a plan.AllowList) vxguard.Spec {
	s := vxguard.Spec{Port: a.Port, Network: a.Network, SubnetLen: a.SubnetLen, SubnetLen6: a.SubnetLen6,
		Network6: a.Network6, Underlay6: a.Underlay6, Peers: make(map[string]vxguard.Peer, len(a.Peers))}
	for n, p := range a.Peers {
		s.Peers[n] = vxguard.Peer(p)
	}
	return s
}

// Underlay reads the interface peers reach this node at: iface, else the one holding ip,
// else the default route's (IPv4, else IPv6); and its addresses: ip for its family, else
// the interface's first global address of each family (an IPv6 one still in duplicate
// address detection is reported, not taken: Underlay.Tentative6).
func (d *Linux) Underlay(iface string, ip netip.Addr) (Underlay, error) {
	var link netlink.Link
	var err error
	switch {
	case iface != "":
		link, err = d.h.LinkByName(iface)
		if err != nil {
			return Underlay{}, fmt.Errorf("--iface %s: %w", iface, err)
		}
	case ip.IsValid():
		link, err = d.linkWith(ip)
		if err != nil {
			return Underlay{}, err
		}
	default:
		routes, err := d.h.RouteGet(net.IPv4(192, 0, 2, 0))
		if err != nil || len(routes) == 0 {
			routes, err = d.h.RouteGet(net.ParseIP("2001:db8::"))
		}
		if err != nil || len(routes) == 0 {
			return Underlay{}, fmt.Errorf("no --iface given and no default route to pick one from")
		}
		if link, err = d.h.LinkByIndex(routes[0].LinkIndex); err != nil {
			return Underlay{}, err
		}
	}
	addrs, err := nldump.Retry(func() ([]netlink.Addr, error) { return d.h.AddrList(link, netlink.FAMILY_ALL) })
	if err != nil && ip.IsValid() {
		// Only the connected prefixes are missing: peers are planned as off-link for now.
		d.log.Warn("cannot read underlay prefixes", "dev", link.Attrs().Name, "err", err)
	}
	u := Underlay{Dev: link.Attrs().Name, MTU: link.Attrs().MTU}
	if ip.Is4() {
		u.IP = ip
	} else if ip.IsValid() {
		u.IP6 = ip
	}
	if m := link.Attrs().HardwareAddr; len(m) == 6 {
		u.MAC = m.String()
	}
	for _, ad := range addrs {
		a, ok := netip.AddrFromSlice(ad.IP)
		if !ok {
			continue
		}
		a = a.Unmap()
		if a.IsLinkLocalUnicast() || a.IsLoopback() {
			continue // not an address peers can reach, nor a prefix they can share
		}
		ones, _ := ad.Mask.Size()
		u.Connected = append(u.Connected, netip.PrefixFrom(a, ones).Masked())
		switch {
		case a.Is4() && !u.IP.IsValid():
			u.IP = a
		case a.Is6() && !u.IP6.IsValid() && ad.Flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DEPRECATED|unix.IFA_F_TEMPORARY) == 0:
			u.IP6 = a
		case a.Is6() && ad.Flags&unix.IFA_F_TENTATIVE != 0 && ad.Flags&(unix.IFA_F_DADFAILED|unix.IFA_F_TEMPORARY) == 0:
			u.Tentative6 = true // (a failed one stays tentative for ever)
		}
	}
	u.Tentative6 = u.Tentative6 && !u.IP6.IsValid()
	if !u.IP.IsValid() && !u.IP6.IsValid() && !u.Tentative6 {
		return Underlay{}, fmt.Errorf("underlay %s has no IPv4 or global IPv6 address (set --public-ip)", link.Attrs().Name)
	}
	d.ulDev.Store(u.Dev)
	d.ulIndex.Store(int64(link.Attrs().Index))
	if u.Tunnels, err = d.tunnels(); err != nil {
		d.log.Warn("cannot list VXLAN devices; none is kept for peers still sending through one", "err", err)
	}
	return u, nil
}

// tunnels lists netagent's VXLAN devices.
func (d *Linux) tunnels() ([]plan.Tunnel, error) {
	links, err := nldump.Retry(d.h.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	var out []plan.Tunnel
	for _, l := range links {
		if v, ok := l.(*netlink.Vxlan); ok && vxlan.Ours(l) {
			out = append(out, plan.Tunnel{Name: v.Name, Port: v.Port})
		}
	}
	return out, nil
}

func (d *Linux) linkWith(ip netip.Addr) (netlink.Link, error) {
	addrs, err := nldump.Retry(func() ([]netlink.Addr, error) { return d.h.AddrList(nil, netlink.FAMILY_ALL) })
	if err != nil {
		return nil, err
	}
	for _, ad := range addrs {
		if x, ok := netip.AddrFromSlice(ad.IP); ok && x.Unmap() == ip {
			return d.h.LinkByIndex(ad.LinkIndex)
		}
	}
	return nil, fmt.Errorf("--public-ip %s is not on any interface", ip)
}

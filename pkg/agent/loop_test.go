package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/netagent/netagent/pkg/antispoof"
	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/dataplane"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/plan"
)

// The loop's tests run the whole agent (store -> plan -> Set) against an in-memory store
// and dataplane.Fake, inside a synctest bubble: no root, no namespace, and the timers
// (backoff, grace window, pod-guard delay) are checked to the millisecond.

// memStore is a lease store in memory: the config, this node's lease, and peers the test
// adds and removes; as a HealthWatcher it reports what the test tells it.
type memStore struct {
	cfg  config.Network
	self netip.Prefix

	mu      sync.Mutex
	peers   *lease.Peers // the agent's view, once it watches
	changed chan<- struct{}
	pending map[string]lease.Lease // peers added before the watch started
	health  chan error
	lost    chan error    // KeepAlive returns what is sent here (the lease was lost)
	renew   error         // what Renew then returns
	renewed []lease.Lease // what Renew was given
	alive   int           // KeepAlive calls
}

func newMemStore(t *testing.T, backend string) *memStore {
	t.Helper()
	c, err := config.Parse(fmt.Appendf(nil, `{"network":"10.244.0.0/16","backend":{"type":%q}}`, backend))
	if err != nil {
		t.Fatal(err)
	}
	return &memStore{cfg: c, self: netip.MustParsePrefix("10.244.1.0/24"), pending: map[string]lease.Lease{}, health: make(chan error), lost: make(chan error)}
}

func (s *memStore) Config(context.Context) (config.Network, int64, error) { return s.cfg, 1, nil }

func (s *memStore) Acquire(_ context.Context, _ config.Network, self lease.Lease, _ netip.Prefix) (lease.Held, error) {
	self.Subnet = s.self
	s.put(self)
	return lease.Held{Lease: self}, nil
}

func (s *memStore) Renew(_ context.Context, h lease.Held) (lease.Held, error) {
	s.mu.Lock()
	s.renewed = append(s.renewed, h.Lease)
	s.mu.Unlock()
	if s.renew != nil {
		return lease.Held{}, s.renew
	}
	return h, nil
}

func (s *memStore) KeepAlive(ctx context.Context, _ lease.Held) error {
	s.mu.Lock()
	s.alive++
	s.mu.Unlock()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case err := <-s.lost:
		return err
	}
}

func (s *memStore) Watch(ctx context.Context, peers *lease.Peers, changed chan<- struct{}, _ lease.WatchStats) {
	s.mu.Lock()
	list := map[string]lease.Entry{}
	for k, l := range s.pending {
		list[k] = lease.Entry{Lease: l, Rev: 1}
	}
	peers.Replace(list, nil)
	s.peers, s.changed = peers, changed
	s.mu.Unlock()
	changed <- struct{}{}
	<-ctx.Done()
}

func (s *memStore) WatchConfig(ctx context.Context, _ chan<- struct{}) { <-ctx.Done() }

func (s *memStore) WatchHealth(ctx context.Context, report func(error)) {
	report(nil)
	for {
		select {
		case <-ctx.Done():
			return
		case err := <-s.health:
			report(err)
		}
	}
}

// put adds or changes a lease, as the store's watch would report it.
func (s *memStore) put(l lease.Lease) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.peers == nil {
		s.pending[l.Node] = l
		return
	}
	s.peers.Set(l.Node, l, 2)
	signal2(s.changed)
}

// remove deletes a node's lease (it expired).
func (s *memStore) remove(node string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.peers.Delete(node)
	signal2(s.changed)
}

func signal2(ch chan<- struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func peerLease(node, subnet, ip string) lease.Lease {
	return lease.Lease{Node: node, Subnet: netip.MustParsePrefix(subnet), PublicIP: netip.MustParseAddr(ip), Backend: config.VXLAN, VTEPMAC: plan.VTEPMAC(node).String()}
}

// loopAgent is an agent wired to a memStore and a dataplane.Fake, with the host's own
// firewall, netconf, files and anti-spoofing set left alone.
type loopAgent struct {
	*Agent
	store  *memStore
	dp     *dataplane.Fake
	pods   *podSyncs
	cancel context.CancelFunc
	done   chan error
}

// podSyncs stands in for the anti-spoofing sync: it records when it ran, and withholds
// an entry (as missing, not yet re-added) the first withhold times.
type podSyncs struct {
	mu       sync.Mutex
	runs     []time.Time
	withhold int
}

func (p *podSyncs) sync(context.Context, string, func(antispoof.Entry) bool) (antispoof.Stats, []antispoof.Entry, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.runs = append(p.runs, time.Now())
	if p.withhold > 0 {
		p.withhold--
		return antispoof.Stats{}, []antispoof.Entry{{}}, nil
	}
	return antispoof.Stats{}, nil, nil
}

// reset forgets the runs so far and withholds the next n checks' entry.
func (p *podSyncs) reset(n int) {
	p.mu.Lock()
	p.runs, p.withhold = nil, n
	p.mu.Unlock()
}

// since returns when it ran, from t0.
func (p *podSyncs) since(t0 time.Time) []time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []time.Duration
	for _, t := range p.runs {
		out = append(out, t.Sub(t0))
	}
	return out
}

func startLoopAgent(t *testing.T, st *memStore, dp *dataplane.Fake, ttl time.Duration) *loopAgent {
	t.Helper()
	a, err := New(Options{
		Node: "n1", SubnetFile: filepath.Join(t.TempDir(), "subnet.env"), Store: st, Dataplane: dp,
		Log: slog.New(slog.NewTextHandler(t.Output(), nil)), Resync: time.Hour, LeaseTTL: ttl,
	})
	if err != nil {
		t.Fatal(err)
	}
	idle := func(ctx context.Context) { <-ctx.Done() }
	a.watchFirewall = func(ctx context.Context, _ *slog.Logger, _, _, _ chan struct{}) { idle(ctx) }
	a.watchNetconf = func(ctx context.Context, _ *slog.Logger, _ chan struct{}) { idle(ctx) }
	a.watchFiles = func(ctx context.Context, _ *slog.Logger, _ []string, _ chan struct{}) { idle(ctx) }
	pods := &podSyncs{}
	a.pod.sync = pods.sync
	ctx, cancel := context.WithCancel(t.Context())
	la := &loopAgent{Agent: a, store: st, dp: dp, pods: pods, cancel: cancel, done: make(chan error, 1)}
	go func() { la.done <- a.Run(ctx) }()
	return la
}

// stop stops the agent and checks that it stopped cleanly and left the dataplane alone.
func (la *loopAgent) stop(t *testing.T) {
	t.Helper()
	before, _ := la.dp.Counts()
	la.cancel()
	if err := <-la.done; err != nil {
		t.Errorf("Run() = %v at stop, want nil", err)
	}
	if after, _ := la.dp.Counts(); after != before {
		t.Errorf("%d Sets during stop, want none (the dataplane stays in place)", after-before)
	}
}

// statusNow is the status without the kernel's view (Snapshot reads the kernel).
func (la *loopAgent) statusNow() (Status, bool) {
	la.mu.Lock()
	defer la.mu.Unlock()
	st := la.status
	st.Errors = maps.Clone(st.Errors)
	return st, st.Ready
}

func testUnderlay() dataplane.Underlay {
	return dataplane.Underlay{Dev: "eth0", IP: netip.MustParseAddr("192.0.2.11"), MTU: 1500, Connected: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}}
}

// has reports whether the dataplane holds a route to dst.
func has(dp *dataplane.Fake, dst string) bool {
	p, ok := dp.Plan()
	return ok && slices.ContainsFunc(p.Routes, func(r plan.Route) bool { return r.Dst == netip.MustParsePrefix(dst) })
}

// TestLoopAppliesLeases: the first full pass sets the plan of the listed peers; a lease
// that appears later reaches the dataplane as a delta, with its route, neighbour, FDB and
// allow-list entries; one that goes is removed the same way.
func TestLoopAppliesLeases(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		st := newMemStore(t, config.VXLAN)
		st.put(peerLease("n2", "10.244.2.0/24", "198.51.100.12"))
		dp := dataplane.NewFake(testUnderlay())
		la := startLoopAgent(t, st, dp, 30*time.Second)
		synctest.Wait()
		if !la.ready() || !has(dp, "10.244.2.0/24") {
			t.Fatalf("after start: ready %t, dataplane:\n%s", la.ready(), dp.Dump())
		}
		if got := dp.Prepared(); len(got) != 1 || got[0].Subnet != st.self {
			t.Errorf("Prepare got %v, want the NAT of %s", got, st.self)
		}

		st.put(peerLease("n3", "10.244.3.0/24", "198.51.100.13"))
		synctest.Wait()
		mac := plan.VTEPMAC("n3").String()
		for _, want := range []string{
			"route 10.244.3.0/24 via 10.244.3.0 dev netagent.1 onlink",
			"neigh 10.244.3.0 " + mac,
			"fdb " + mac + " dst 198.51.100.13",
			"allow n3 from 198.51.100.13 inner 10.244.3.0/24",
		} {
			if !strings.Contains(dp.Dump(), want+"\n") {
				t.Errorf("after n3's lease: dataplane lacks %q:\n%s", want, dp.Dump())
			}
		}
		sets, deltas := dp.Counts()
		if sets != 2 || deltas != 1 {
			t.Errorf("Sets = %d (deltas %d), want the start's full one and one delta", sets, deltas)
		}

		st.remove("n2")
		synctest.Wait()
		if has(dp, "10.244.2.0/24") || strings.Contains(dp.Dump(), "n2") {
			t.Errorf("after n2's lease went: dataplane still has it:\n%s", dp.Dump())
		}
		la.stop(t)
	})
}

// TestLoopRetriesFailedSet: a failed Set is retried after 100 ms, doubling to 10 s; the
// agent becomes ready with the first Set that succeeds, and a later failure starts again
// from 100 ms.
func TestLoopRetriesFailedSet(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		st := newMemStore(t, config.HostGW)
		dp := dataplane.NewFake(testUnderlay())
		fail := errors.New("netlink: device busy")
		dp.Fail(slices.Repeat([]error{fail}, 9)...)
		start := time.Now()
		la := startLoopAgent(t, st, dp, 30*time.Second)
		var gaps []time.Duration
		last := start
		for range 10 {
			<-dp.Changed()
			gaps = append(gaps, time.Since(last))
			last = time.Now()
			if sets, _ := dp.Counts(); sets < 10 && la.ready() {
				t.Fatalf("ready after %d failed Sets", sets)
			}
		}
		ms := time.Millisecond
		want := []time.Duration{0, 100 * ms, 200 * ms, 400 * ms, 800 * ms, 1600 * ms, 3200 * ms, 6400 * ms, 10 * time.Second, 10 * time.Second}
		if !slices.Equal(gaps, want) {
			t.Errorf("gaps between Sets = %v, want %v", gaps, want)
		}
		synctest.Wait()
		if snap, _ := la.statusNow(); !snap.Ready || snap.Errors["reconcile"] != "" {
			t.Errorf("after the first good Set: ready %t, errors %v", snap.Ready, snap.Errors)
		}

		dp.Fail(fail)
		dp.Drift() // someone changed the kernel: a full pass, which fails
		<-dp.Changed()
		t0 := time.Now()
		<-dp.Changed()
		if d := time.Since(t0); d != 100*ms {
			t.Errorf("retry after a later failure: %s, want 100ms", d)
		}
		la.stop(t)
	})
}

// TestLoopStoreOutageGrace: a peer whose lease vanishes while the store is unreachable
// keeps its route through the outage and for two lease TTLs after the store returns; then
// it is removed. A peer whose lease vanishes with the store up goes at once.
func TestLoopStoreOutageGrace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const ttl = 10 * time.Second
		st := newMemStore(t, config.VXLAN)
		st.put(peerLease("n2", "10.244.2.0/24", "198.51.100.12"))
		st.put(peerLease("n3", "10.244.3.0/24", "198.51.100.13"))
		dp := dataplane.NewFake(testUnderlay())
		la := startLoopAgent(t, st, dp, ttl)
		synctest.Wait()

		st.health <- errors.New("etcd: context deadline exceeded")
		synctest.Wait()
		st.remove("n2") // its lease expired in the outage
		synctest.Wait()
		if !has(dp, "10.244.2.0/24") {
			t.Fatalf("n2 removed during the outage:\n%s", dp.Dump())
		}
		time.Sleep(time.Minute)
		st.health <- nil // back
		synctest.Wait()
		back := time.Now()
		time.Sleep(2*ttl - time.Second)
		synctest.Wait()
		if !has(dp, "10.244.2.0/24") {
			t.Errorf("n2 removed %s after the store returned, want it kept for %s", time.Since(back), 2*ttl)
		}
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if has(dp, "10.244.2.0/24") {
			t.Errorf("n2 still routed %s after the store returned:\n%s", time.Since(back), dp.Dump())
		}
		if !has(dp, "10.244.3.0/24") {
			t.Errorf("n3 lost:\n%s", dp.Dump())
		}
		st.remove("n3") // no outage: at once
		synctest.Wait()
		if has(dp, "10.244.3.0/24") {
			t.Errorf("n3 still routed after its lease went with the store up:\n%s", dp.Dump())
		}
		la.stop(t)
	})
}

// TestLoopDriftInvalidates: what someone else changed is re-read: a kernel change makes a
// full pass; the resync ticker invalidates every mirror; a firewall change the NAT chains.
func TestLoopDriftInvalidates(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		st := newMemStore(t, config.VXLAN)
		dp := dataplane.NewFake(testUnderlay())
		la := startLoopAgent(t, st, dp, 30*time.Second)
		synctest.Wait()
		before, _ := dp.Counts()
		dp.Drift()
		synctest.Wait()
		if after, _ := dp.Counts(); after != before+1 {
			t.Errorf("kernel drift: %d Sets, want 1", after-before)
		}
		for _, tc := range []struct {
			r    reason
			want dataplane.Part
		}{
			{rFirewall, dataplane.NAT},
			{rAllow, dataplane.Allow},
			{rResync, dataplane.All},
		} {
			before, _ := dp.Counts()
			la.in.post(tc.r)
			synctest.Wait()
			after, _ := dp.Counts()
			if got := dp.Invalidated(); got != tc.want || after != before+1 {
				t.Errorf("reason %b: %d Sets, the full one re-reading %b; want 1 re-reading %b", tc.r, after-before, got, tc.want)
			}
		}
		la.stop(t)
	})
}

// TestPodGuardDelay: the pod anti-spoofing set is checked 300 ms after its table changed,
// once for a burst of changes, and again 300 ms later while entries are withheld.
func TestPodGuardDelay(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		st := newMemStore(t, config.HostGW)
		dp := dataplane.NewFake(testUnderlay())
		la := startLoopAgent(t, st, dp, 30*time.Second)
		synctest.Wait()
		la.pods.reset(0) // forget the start's check
		t0 := time.Now()
		for range 5 { // a burst of pod ADDs, 50 ms apart
			signal(la.pod.changed)
			time.Sleep(50 * time.Millisecond)
		}
		time.Sleep(time.Second)
		synctest.Wait()
		if got := la.pods.since(t0); !slices.Equal(got, []time.Duration{300 * time.Millisecond}) {
			t.Errorf("checks after a burst at %v, want one at 300ms", got)
		}

		la.pods.reset(2)
		t0 = time.Now()
		signal(la.pod.changed)
		time.Sleep(2 * time.Second)
		synctest.Wait()
		ms := time.Millisecond
		if got := la.pods.since(t0); !slices.Equal(got, []time.Duration{300 * ms, 600 * ms, 900 * ms}) {
			t.Errorf("checks while entries are withheld at %v, want 300ms, 600ms, 900ms", got)
		}
		la.stop(t)
	})
}

// TestLoopStopsWhenReassigned: the store gives this node another subnet (a Kubernetes Node
// deleted and registered again): Run returns lease.ErrReassigned at once, so the service
// manager restarts the agent on the new subnet, and leaves the dataplane as it was.
func TestLoopStopsWhenReassigned(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		st := newMemStore(t, config.VXLAN)
		st.put(peerLease("n2", "10.244.2.0/24", "192.0.2.12"))
		dp := dataplane.NewFake(testUnderlay())
		la := startLoopAgent(t, st, dp, 30*time.Second)
		synctest.Wait()
		if !has(dp, "10.244.2.0/24") {
			t.Fatal("the first pass did not set the peer's route")
		}
		before, _ := dp.Counts()
		st.renew = fmt.Errorf("%w: node n1: its podCIDR is now 10.244.3.0/24", lease.ErrReassigned)
		st.lost <- errors.New("the Node's podCIDR changed")
		synctest.Wait()
		select {
		case err := <-la.done:
			if !errors.Is(err, lease.ErrReassigned) {
				t.Errorf("Run() = %v, want lease.ErrReassigned", err)
			}
		default:
			t.Fatal("Run still running after the subnet was reassigned")
		}
		if after, _ := dp.Counts(); after != before || !has(dp, "10.244.2.0/24") {
			t.Errorf("the dataplane changed on the way out (%d Sets, route kept %t)", after-before, has(dp, "10.244.2.0/24"))
		}
		la.cancel()
	})
}

// TestLoopWireGuard: with the wireguard backend the agent publishes the dataplane's public
// key and the port in its lease (never the private key: the Fake has none to give), the
// first pass sets the device and a WireGuard peer per node, a new lease arrives as a delta
// with its peer and route, a changed key replaces the peer, and a removed lease removes it.
func TestLoopWireGuard(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		st := newMemStore(t, config.WireGuard)
		k2, k3, k3b := "zo060cy2M+x7cMF4FKXHbs0CloUFDTRHRboFhw5YfVk=", "pOCSkrZRwni5dyxWn1+puxPZBrRqtoyd+dwrRAn4ogk=", "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
		wg := func(node, subnet, ip, k string) lease.Lease {
			return lease.Lease{Node: node, Subnet: netip.MustParsePrefix(subnet), PublicIP: netip.MustParseAddr(ip), Backend: config.WireGuard, WGPublicKey: k, WGPort: 51820}
		}
		st.put(wg("n2", "10.244.2.0/24", "198.51.100.12", k2))
		dp := dataplane.NewFake(testUnderlay())
		la := startLoopAgent(t, st, dp, 30*time.Second)
		synctest.Wait()
		own, created, _ := dp.WireGuardKey("", false)
		st.mu.Lock()
		self := st.peers.Snapshot()
		renewed := slices.Clone(st.renewed)
		st.mu.Unlock()
		// A new key: the lease is claimed without it, and published with it once the
		// first pass has set the device's peers.
		if i := slices.IndexFunc(self, func(l *lease.Lease) bool { return l.Node == "n1" }); created || i < 0 || self[i].WGPublicKey != "" || self[i].WGPort != 0 || self[i].VTEPMAC != "" {
			t.Fatalf("own lease as claimed %+v (key created again: %v), want no key or port yet, no VTEP MAC", self, created)
		}
		if len(renewed) != 1 || renewed[0].WGPublicKey != own || renewed[0].WGPort != 51820 || renewed[0].Subnet != st.self {
			t.Fatalf("own lease published after the first pass: %+v, want one with the dataplane's public key %s and port 51820", renewed, own)
		}
		want := func(lines ...string) {
			t.Helper()
			for _, l := range lines {
				if !strings.Contains(dp.Dump(), l+"\n") {
					t.Errorf("dataplane lacks %q:\n%s", l, dp.Dump())
				}
			}
		}
		want("wireguard netagent-wg port 51820 mtu 1440 addr 10.244.1.0/32 underlay eth0",
			"wgpeer n2 key "+k2+" endpoint 198.51.100.12:51820 allowed 10.244.2.0/24",
			"route 10.244.2.0/24 via invalid IP dev netagent-wg")

		st.put(wg("n3", "10.244.3.0/24", "198.51.100.13", k3))
		synctest.Wait()
		want("wgpeer n3 key "+k3+" endpoint 198.51.100.13:51820 allowed 10.244.3.0/24", "route 10.244.3.0/24 via invalid IP dev netagent-wg")
		st.put(wg("n3", "10.244.3.0/24", "198.51.100.13", k3b)) // n3 rotated its key
		synctest.Wait()
		want("wgpeer n3 key " + k3b + " endpoint 198.51.100.13:51820 allowed 10.244.3.0/24")
		st.remove("n2")
		synctest.Wait()
		if d := dp.Dump(); strings.Contains(d, "n2") || strings.Contains(d, k3+" ") || strings.Contains(d, "10.244.2.0/24") {
			t.Errorf("after n3's rotation and n2's removal:\n%s", d)
		}
		if sets, deltas := dp.Counts(); sets != 4 || deltas != 3 {
			t.Errorf("Sets = %d (deltas %d), want the start's full one and three deltas", sets, deltas)
		}
		la.stop(t)
	})
}

// TestLoopWireGuardReadyAfterKey: a new node becomes ready only once the store holds its
// lease with its WireGuard key (before that, no peer can reach its pods); a store that
// refuses the write holds readiness back until it takes it.
func TestLoopWireGuardReadyAfterKey(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		st := newMemStore(t, config.WireGuard)
		st.renew = errors.New("etcd is down")
		dp := dataplane.NewFake(testUnderlay())
		la := startLoopAgent(t, st, dp, 30*time.Second)
		time.Sleep(3 * time.Second)
		synctest.Wait()
		if sets, _ := dp.Counts(); sets == 0 || la.ready() {
			t.Fatalf("key not written: %d Sets, ready %t; want the first pass done and not ready", sets, la.ready())
		}
		st.mu.Lock()
		st.renew = nil
		st.mu.Unlock()
		time.Sleep(2 * time.Second) // the re-claim's retry
		synctest.Wait()
		st.mu.Lock()
		renewed := slices.Clone(st.renewed)
		st.mu.Unlock()
		if !la.ready() || len(renewed) == 0 || renewed[len(renewed)-1].WGPublicKey == "" {
			t.Fatalf("key written (%+v): ready %t, want ready", renewed, la.ready())
		}
		la.stop(t)
	})
}

// An underlay address of a family the lease lacks (an IPv6 address that came up, or left
// duplicate address detection, after the start) is published: the store gets the lease
// with it (Renew) and keeps it alive, status shows it, and a peer's lease claiming it is
// refused from then on. A changed address is reported once, not published: peers keep
// the leased one until a restart.
func TestLoopPublishesGainedAddress(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		st := newMemStore(t, config.HostGW)
		v6 := netip.MustParseAddr("2001:db8:1::11")
		thief := peerLease("n3", "10.244.3.0/24", "198.51.100.13")
		thief.PublicIP6 = v6 // claims the address n1 does not publish yet
		st.put(peerLease("n2", "10.244.2.0/24", "192.0.2.12"))
		st.put(thief)
		ul := testUnderlay()
		ul.Connected = append(ul.Connected, netip.MustParsePrefix("198.51.100.0/24"))
		dp := dataplane.NewFake(ul)
		la := startLoopAgent(t, st, dp, 30*time.Second)
		synctest.Wait()
		if !la.ready() || !has(dp, "10.244.3.0/24") {
			t.Fatalf("after start: ready %t, dataplane:\n%s", la.ready(), dp.Dump())
		}

		ul.IP6 = v6
		dp.SetUnderlay(ul)
		dp.Drift() // the address event (dataplane Watch)
		synctest.Wait()
		st.mu.Lock()
		renewed, alive := slices.Clone(st.renewed), st.alive
		st.mu.Unlock()
		if len(renewed) != 1 || renewed[0].PublicIP6 != v6 || renewed[0].PublicIP != ul.IP || renewed[0].Subnet != st.self {
			t.Fatalf("Renew got %v, want one call with the lease and publicIP6 %s", renewed, v6)
		}
		if alive != 2 {
			t.Errorf("KeepAlive called %d times, want 2 (kept alive again after publishing)", alive)
		}
		if got, _ := la.statusNow(); got.PublicIP6 != v6.String() {
			t.Errorf("status publicIP6 %q, want %s", got.PublicIP6, v6)
		}
		if has(dp, "10.244.3.0/24") || !has(dp, "10.244.2.0/24") {
			t.Errorf("n3 claims n1's published address: want it dropped, n2 kept:\n%s", dp.Dump())
		}

		ul.IP6 = netip.MustParseAddr("2001:db8:1::99")
		dp.SetUnderlay(ul)
		dp.Drift()
		synctest.Wait()
		st.mu.Lock()
		n := len(st.renewed)
		st.mu.Unlock()
		if got, _ := la.statusNow(); n != 1 || got.PublicIP6 != v6.String() {
			t.Errorf("after the address changed: %d Renew calls, publicIP6 %q; want none more and the leased %s", n-1, got.PublicIP6, v6)
		}
		la.stop(t)
	})
}

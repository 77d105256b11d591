package cluster_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/lab"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/nat"
	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/pkg/route"
	"github.com/netagent/netagent/test/netns"
)

// synthPeers writes synthetic peer leases straight into the lab's etcd (as
// BenchmarkAgentScale does), never over a lease that exists: a real node may hold any
// subnet of the network. It is safe for concurrent use; errors are reported with Errorf.
type synthPeers struct {
	t     *testing.T
	cli   *clientv3.Client
	grant clientv3.LeaseID
	gen   func(i int) lease.Lease

	mu    sync.Mutex
	next  int
	alive map[int]lease.Lease
	names map[netip.Prefix]string // every subnet ever written -> its node, for messages
}

func newSynthPeers(t *testing.T, l *lab.Lab, gen func(int) lease.Lease) *synthPeers {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{l.EtcdEndpoint()}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	g, err := cli.Grant(context.Background(), 3600)
	if err != nil {
		t.Fatal(err)
	}
	return &synthPeers{t: t, cli: cli, grant: g.ID, gen: gen, alive: map[int]lease.Lease{}, names: map[netip.Prefix]string{}}
}

func subnetKey(s netip.Prefix) string { return "/netagent/subnets/" + lease.SubnetKey(s) }

// add writes k new leases.
func (s *synthPeers) add(k int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for added := 0; added < k; s.next++ {
		ls := s.gen(s.next)
		key := subnetKey(ls.Subnet)
		resp, err := s.cli.Txn(context.Background()).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
			Then(clientv3.OpPut(key, string(ls.Encode()), clientv3.WithLease(s.grant))).Commit()
		if err != nil {
			s.t.Errorf("put lease %s: %v", ls.Node, err)
			return
		}
		if resp.Succeeded {
			s.alive[s.next] = ls
			s.names[ls.Subnet] = ls.Node
			added++
		}
	}
}

// remove deletes k random leases and returns them.
func (s *synthPeers) remove(k int, rng *rand.Rand) []lease.Lease {
	s.mu.Lock()
	defer s.mu.Unlock()
	ids := make([]int, 0, len(s.alive))
	for i := range s.alive {
		ids = append(ids, i)
	}
	sort.Ints(ids)
	rng.Shuffle(len(ids), func(i, j int) { ids[i], ids[j] = ids[j], ids[i] })
	var out []lease.Lease
	for _, i := range ids[:min(k, len(ids))] {
		ls := s.alive[i]
		if _, err := s.cli.Delete(context.Background(), subnetKey(ls.Subnet)); err != nil {
			s.t.Errorf("delete lease %s: %v", ls.Node, err)
			return out
		}
		delete(s.alive, i)
		out = append(out, ls)
	}
	return out
}

func (s *synthPeers) leases() []lease.Lease {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]lease.Lease, 0, len(s.alive))
	for _, ls := range s.alive {
		out = append(out, ls)
	}
	return out
}

// dataplane is a node's netagent objects as sets of text keys with their counts, so a
// duplicate shows as a count above one.
type dataplane struct {
	routes map[string]int // "dst via gw dev name"
	neigh  map[string]int // "vtep lladdr mac"
	fdb    map[string]int // "mac dst ip"
}

// wantDataplane is the plan for a vxlan-backend node: per peer one route via its VTEP
// address on the VXLAN device, one neighbour entry and one FDB entry.
func wantDataplane(dev string, peers []lease.Lease) dataplane {
	d := dataplane{routes: map[string]int{}, neigh: map[string]int{}, fdb: map[string]int{}}
	for _, p := range peers {
		vtep := p.Subnet.Addr()
		mac := strings.ToLower(p.VTEPMAC)
		d.routes[fmt.Sprintf("%s via %s dev %s", p.Subnet, vtep, dev)]++
		d.neigh[fmt.Sprintf("%s lladdr %s", vtep, mac)]++
		d.fdb[fmt.Sprintf("%s dst %s", mac, p.PublicIP)]++
	}
	return d
}

// readDataplane reads the routes with netagent's protocol (main table) and every
// neighbour and FDB entry on the VXLAN device.
func readDataplane(ns *netns.NS, dev string) (dataplane, error) {
	d := dataplane{routes: map[string]int{}, neigh: map[string]int{}, fdb: map[string]int{}}
	h, err := ns.Handle()
	if err != nil {
		return d, err
	}
	defer h.Close()
	names := map[int]string{}
	links, err := h.LinkList()
	if err != nil {
		return d, err
	}
	for _, l := range links {
		names[l.Attrs().Index] = l.Attrs().Name
	}
	rs, err := h.RouteListFiltered(unix.AF_INET, &netlink.Route{Protocol: route.Protocol, Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	if err != nil {
		return d, err
	}
	for _, r := range rs {
		d.routes[fmt.Sprintf("%s via %s dev %s", r.Dst, r.Gw, names[r.LinkIndex])]++
	}
	vx, err := h.LinkByName(dev)
	if err != nil {
		return d, nil // no device, no entries
	}
	ns4, err := h.NeighList(vx.Attrs().Index, unix.AF_INET)
	if err != nil {
		return d, err
	}
	for _, n := range ns4 {
		d.neigh[fmt.Sprintf("%s lladdr %s", n.IP, n.HardwareAddr)]++
	}
	fdb, err := h.NeighList(vx.Attrs().Index, unix.AF_BRIDGE)
	if err != nil {
		return d, err
	}
	for _, f := range fdb {
		d.fdb[fmt.Sprintf("%s dst %s", f.HardwareAddr, f.IP)]++
	}
	return d, nil
}

// diff lists every difference: missing, stale (with the peer it belonged to) and duplicate
// objects.
func (d dataplane) diff(want dataplane, names map[netip.Prefix]string) []string {
	var out []string
	for _, kind := range []struct {
		name      string
		got, want map[string]int
	}{{"route", d.routes, want.routes}, {"neighbour", d.neigh, want.neigh}, {"FDB entry", d.fdb, want.fdb}} {
		for k, c := range kind.got {
			switch {
			case kind.want[k] == 0:
				out = append(out, fmt.Sprintf("stale %s %s%s", kind.name, k, owner(k, names)))
			case c > 1:
				out = append(out, fmt.Sprintf("%d copies of %s %s", c, kind.name, k))
			}
		}
		for k := range kind.want {
			if kind.got[k] == 0 {
				out = append(out, fmt.Sprintf("missing %s %s%s", kind.name, k, owner(k, names)))
			}
		}
	}
	sort.Strings(out)
	return out
}

// owner names the peer a route (by its destination) belonged to.
func owner(key string, names map[netip.Prefix]string) string {
	if p, err := netip.ParsePrefix(strings.Fields(key)[0]); err == nil && names[p] != "" {
		return " (" + names[p] + ")"
	}
	return ""
}

// waitDataplane polls until the node's dataplane equals want, and returns the last
// difference (empty: equal) and how long it took.
func waitDataplane(ns *netns.NS, dev string, want dataplane, names map[netip.Prefix]string, d time.Duration) ([]string, time.Duration) {
	start := time.Now()
	var diff []string
	for {
		got, err := readDataplane(ns, dev)
		if err != nil {
			diff = []string{err.Error()}
		} else if diff = got.diff(want, names); len(diff) == 0 || time.Since(start) > d {
			return diff, time.Since(start)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// natProblems checks netagent's chains in iptables-save: each chain declared once with its
// two rules, one jump to it, first in its built-in chain, and no rule line twice.
func natProblems(ns *netns.NS) []string {
	out, err := ns.Run("iptables-save")
	if err != nil {
		return []string{err.Error()}
	}
	var problems []string
	lines := strings.Split(out, "\n")
	count := func(pred func(string) bool) int {
		c := 0
		for _, l := range lines {
			if pred(l) {
				c++
			}
		}
		return c
	}
	for _, c := range []struct{ chain, hook string }{{nat.PostChain, "POSTROUTING"}, {nat.FwdChain, "FORWARD"}} {
		if n := count(func(l string) bool { return strings.HasPrefix(l, ":"+c.chain+" ") }); n != 1 {
			problems = append(problems, fmt.Sprintf("chain %s declared %d times", c.chain, n))
		}
		if n := count(func(l string) bool { return strings.HasPrefix(l, "-A "+c.chain+" ") }); n != 2 {
			problems = append(problems, fmt.Sprintf("chain %s has %d rules, want 2", c.chain, n))
		}
		jump := func(l string) bool {
			return strings.HasPrefix(l, "-A "+c.hook+" ") && strings.HasSuffix(l, "-j "+c.chain)
		}
		if n := count(jump); n != 1 {
			problems = append(problems, fmt.Sprintf("%d jumps from %s to %s, want 1", n, c.hook, c.chain))
		}
		if i := slices.IndexFunc(lines, func(l string) bool { return strings.HasPrefix(l, "-A "+c.hook+" ") }); i >= 0 && !jump(lines[i]) {
			problems = append(problems, fmt.Sprintf("the jump to %s is not first in %s: %s", c.chain, c.hook, lines[i]))
		}
	}
	seen := map[string]bool{}
	for _, l := range lines {
		if strings.HasPrefix(l, "-A ") {
			if seen[l] {
				problems = append(problems, "rule twice: "+l)
			}
			seen[l] = true
		}
	}
	return problems
}

// wipeDataplane removes the VXLAN device (its routes, neighbour and FDB entries go with it)
// and netagent's chains from a node whose agent is down: the kernel of a fresh node.
func wipeDataplane(t *testing.T, ns *netns.NS, dev string) {
	t.Helper()
	ns.MustRun(t, "ip", "link", "del", dev)
	for _, c := range []struct{ table, hook, chain string }{{"nat", "POSTROUTING", nat.PostChain}, {"filter", "FORWARD", nat.FwdChain}} {
		jump := []string{"-m", "comment", "--comment", "netagent", "-j", c.chain}
		if c.table == "filter" { // uncommented: it sees every forwarded packet
			jump = []string{"-j", c.chain}
		}
		ns.MustRun(t, "iptables", append([]string{"-t", c.table, "-D", c.hook}, jump...)...)
		ns.MustRun(t, "iptables", "-t", c.table, "-F", c.chain)
		ns.MustRun(t, "iptables", "-t", c.table, "-X", c.chain)
	}
}

// stopAgent stops the node's agent (SIGKILL with kill, else SIGTERM) and waits until the
// process is reaped: the lab's StopAgent returns once the main thread is a zombie, when
// other threads may still hold the listening socket the next agent needs.
func stopAgent(t *testing.T, l *lab.Lab, n *lab.Node, kill bool) {
	t.Helper()
	pid := n.Agent
	if err := l.StopAgent(n, kill); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(2 * time.Millisecond) {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent %d not reaped 10 s after it was stopped", pid)
		}
	}
}

func fileSize(path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return st.Size()
}

func readFrom(path string, off int64) string {
	b, _ := os.ReadFile(path)
	if int64(len(b)) < off {
		return ""
	}
	return string(b[off:])
}

// TestAgentKilledDuringReconcile kills the agent (SIGKILL) at random points of its cold
// start and first full pass on a node whose peers include 1,000 synthetic leases, so that
// the pass has about 3,000 kernel objects to write (or to check) and NAT chains to
// rewrite. Half of the trials start from a wiped node (no VXLAN device, no chains), half
// from the dataplane the last run left; leases come and go both before the killed start
// (60 of them replaced, so even an adopting start has a pass with work) and between the
// kill and the restart (20). After each restart the kernel must equal the plan
// exactly (no missing, stale or duplicate route, neighbour or FDB entry; each NAT chain
// and jump once) and the pods must still reach each other across the nodes.
func TestAgentKilledDuringReconcile(t *testing.T) {
	const peers = 1000
	trials := 12
	if testing.Short() {
		trials = 4
	}
	begin := time.Now()
	l := newLabWith(t, lab.Options{Backend: "vxlan", Nodes: 2, PodsPerNode: 1, Network: "10.0.0.0/8"})
	n, other := l.Nodes[0], l.Nodes[1]
	ns := l.NodeNS(n)
	const dev = "netagent.1"
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 0x6167))

	sp := newSynthPeers(t, l, synthetic)
	otherLease := lease.Lease{Node: other.Name, Subnet: netip.MustParsePrefix(status(t, l, other).Subnet), PublicIP: other.IP, Backend: "vxlan", VTEPMAC: plan.VTEPMAC(other.Name).String()}
	sp.names[otherLease.Subnet] = other.Name
	sp.add(peers)
	want := func() dataplane { return wantDataplane(dev, append(sp.leases(), otherLease)) }
	if diff, d := waitDataplane(ns, dev, want(), sp.names, time.Minute); len(diff) > 0 {
		t.Fatalf("node1 did not program the %d synthetic peers: %d differences, first %q", peers, len(diff), diff[0])
	} else {
		t.Logf("node1 programmed %d synthetic peers in %s", peers, d.Round(time.Millisecond))
	}

	// How long a start takes until ready (its first full pass done): from a wiped node and
	// on the dataplane the last run left.
	startReady := func() time.Duration {
		t.Helper()
		start := time.Now()
		if err := l.StartAgent(n); err != nil {
			t.Fatal(err)
		}
		if err := l.WaitReady(context.Background(), n, 30*time.Second); err != nil {
			t.Fatal(err)
		}
		return time.Since(start)
	}
	cold := map[bool]time.Duration{}
	for _, wipe := range []bool{true, false} {
		var ds []time.Duration
		for range 3 {
			stopAgent(t, l, n, true)
			if wipe {
				wipeDataplane(t, ns, dev)
			}
			ds = append(ds, startReady())
			if diff, _ := waitDataplane(ns, dev, want(), sp.names, 30*time.Second); len(diff) > 0 {
				t.Fatalf("after a start (wiped %v): %d differences, first %q", wipe, len(diff), diff[0])
			}
		}
		slices.Sort(ds)
		cold[wipe] = ds[1]
	}
	t.Logf("start until ready with %d peers: %s on a wiped node, %s on the last run's dataplane (medians of 3; kill delays are drawn from 0 to 1.2x these)",
		peers+1, cold[true].Round(time.Millisecond), cold[false].Round(time.Millisecond))

	phases := map[string]int{}
	var kills []string
	var converge []time.Duration
	// Stratified draws: each mode's kill delays fall one into each of trials/2 equal slices
	// of 0..1.2x its start time, in random order, so that a handful of trials cover the
	// whole start (before the lease, the pass, after ready) instead of clumping.
	strata := map[bool][]int{}
	for _, wipe := range []bool{true, false} {
		strata[wipe] = rng.Perm(trials / 2)
	}
	for trial := range trials {
		wipe := trial%2 == 0
		slice := strata[wipe][trial/2]
		delay := (time.Duration(slice)*cold[wipe] + uniform(rng, cold[wipe])) * 12 / 10 / time.Duration(trials/2)
		stopAgent(t, l, n, true)
		if wipe {
			wipeDataplane(t, ns, dev)
		}
		sp.remove(60, rng)
		sp.add(60)
		target := want()
		before, err := readDataplane(ns, dev)
		if err != nil {
			t.Fatal(err)
		}
		logPath := n.Dir + "/agent.log"
		off := fileSize(logPath)
		if err := l.StartAgent(n); err != nil {
			t.Fatal(err)
		}
		time.Sleep(delay)
		stopAgent(t, l, n, true)
		at, err := readDataplane(ns, dev)
		if err != nil {
			t.Fatal(err)
		}
		log := readFrom(logPath, off)
		// How far the first pass got: objects it still had to write or remove.
		todo := func(d dataplane) int { return len(d.diff(target, nil)) }
		phase := "before the lease was held"
		switch {
		case strings.Contains(log, "msg=ready"):
			phase = "after ready"
		case !strings.Contains(log, `msg="lease acquired"`):
		case todo(at) == todo(before):
			phase = "lease held, before the first pass changed the kernel"
		case todo(at) > 0:
			phase = "in the first full pass"
		default:
			phase = "kernel done, before ready (NAT, files)"
		}
		phases[phase]++
		kills = append(kills, fmt.Sprintf("%s start killed after %s: %s; kernel objects still to change %d of %d",
			map[bool]string{true: "wiped", false: "adopting"}[wipe], delay.Round(time.Millisecond), phase, todo(at), todo(before)))

		// Between the kill and the restart peers leave (and a few join).
		gone := sp.remove(20, rng)
		sp.add(20)
		start := time.Now()
		if err := l.StartAgent(n); err != nil {
			t.Fatal(err)
		}
		if err := l.WaitReady(context.Background(), n, 30*time.Second); err != nil {
			t.Fatal(err)
		}
		diff, _ := waitDataplane(ns, dev, want(), sp.names, 30*time.Second)
		converge = append(converge, time.Since(start))
		if len(diff) > 0 {
			t.Errorf("trial %d (%s): after the restart the dataplane differs from the plan in %d objects:\n%s", trial, kills[len(kills)-1], len(diff), strings.Join(diff[:min(len(diff), 20)], "\n"))
		}
		got, err := readDataplane(ns, dev)
		if err != nil {
			t.Fatal(err)
		}
		for _, g := range gone {
			w := wantDataplane(dev, []lease.Lease{g})
			for _, m := range []struct{ got, want map[string]int }{{got.routes, w.routes}, {got.neigh, w.neigh}, {got.fdb, w.fdb}} {
				for k := range m.want {
					if m.got[k] > 0 {
						t.Errorf("trial %d: %s left while the agent was dead, yet %q is still there after the restart", trial, g.Node, k)
					}
				}
			}
		}
		if p := natProblems(ns); len(p) > 0 {
			t.Errorf("trial %d (%s): NAT after the restart:\n%s", trial, kills[len(kills)-1], strings.Join(p, "\n"))
		}
		if f := lab.Failures(l.Matrix(context.Background())); len(f) > 0 {
			t.Errorf("trial %d (%s): connectivity after the restart: %v", trial, kills[len(kills)-1], f)
		}
	}
	slices.Sort(converge)
	t.Logf("%d kills: %v", trials, phases)
	for _, k := range kills {
		t.Logf("  %s", k)
	}
	t.Logf("restart to converged (ready, every peer programmed, kernel equal to the plan): median %s, max %s; %d synthetic peers at the end; took %s",
		converge[len(converge)/2].Round(time.Millisecond), converge[len(converge)-1].Round(time.Millisecond), len(sp.alive), time.Since(begin).Round(time.Second))
}

// uniform draws a duration uniformly from [0, max).
func uniform(r *rand.Rand, max time.Duration) time.Duration {
	return time.Duration(r.Int64N(int64(max)))
}

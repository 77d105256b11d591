package cluster_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/netagent/netagent/pkg/antispoof"
	"github.com/netagent/netagent/pkg/bridge"
	"github.com/netagent/netagent/pkg/hostport"
	"github.com/netagent/netagent/pkg/ipam"
	"github.com/netagent/netagent/pkg/lab"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/test/netns"
)

// synthetic23 is the i-th synthetic peer lease of a network with /23 node subnets.
func synthetic23(i int) lease.Lease {
	l := synthetic(i)
	l.Subnet = netip.MustParsePrefix(fmt.Sprintf("10.%d.%d.0/23", 1+i/128, (i%128)*2))
	return l
}

// loadPod is one pod of the load test.
type loadPod struct {
	id   string
	ns   *netns.NS
	port int // host port, 0: none
	ip   netip.Addr
}

func (p *loadPod) rt() *libcni.RuntimeConf {
	rt := &libcni.RuntimeConf{ContainerID: p.id, NetNS: p.ns.Path, IfName: "eth0"}
	if p.port != 0 {
		rt.CapabilityArgs = map[string]any{"portMappings": []any{map[string]any{"hostPort": p.port, "containerPort": 80, "protocol": "tcp"}}}
	}
	return rt
}

// podLoad drives one node's pods through libcni with the agent's conflist, 16 at a time,
// and keeps what a runtime knows: the live pods and their addresses.
type podLoad struct {
	t    *testing.T
	node *netns.NS
	cni  *libcni.CNIConfig
	list *libcni.NetworkConfigList

	mu       sync.Mutex
	live     map[string]*loadPod
	byIP     map[netip.Addr]*loadPod // live pods whose DEL has not started
	adds     []time.Duration
	dels     []time.Duration
	errs     int
	dupes    int
	seq      int
	ported   int
	children map[*netns.NS]bool // every pod namespace not yet removed
}

func (pl *podLoad) add(port bool) {
	pl.mu.Lock()
	pl.seq++
	p := &loadPod{id: fmt.Sprintf("load-%04d", pl.seq)}
	if port {
		pl.ported++
		p.port = 40000 + pl.seq
	}
	pl.mu.Unlock()
	ns, err := netns.Create("lp")
	if err != nil {
		pl.fail("create the namespace of %s: %v", p.id, err)
		return
	}
	p.ns = ns
	pl.mu.Lock()
	pl.children[ns] = true
	pl.mu.Unlock()
	start := time.Now()
	var res *current.Result
	err = pl.node.Do(func() error {
		r, err := pl.cni.AddNetworkList(context.Background(), pl.list, p.rt())
		if err == nil {
			res, err = current.NewResultFromResult(r)
		}
		return err
	})
	took := time.Since(start)
	if err != nil {
		pl.fail("ADD %s: %v", p.id, err)
		return
	}
	p.ip, _ = netip.AddrFromSlice(res.IPs[0].Address.IP.To4())
	pl.mu.Lock()
	defer pl.mu.Unlock()
	pl.adds = append(pl.adds, took)
	if o, dup := pl.byIP[p.ip]; dup {
		pl.dupes++
		pl.t.Errorf("ADD %s got %s, which live pod %s holds", p.id, p.ip, o.id)
	}
	pl.byIP[p.ip] = p
	pl.live[p.id] = p
}

func (pl *podLoad) del(p *loadPod) {
	pl.mu.Lock()
	if pl.byIP[p.ip] == p {
		delete(pl.byIP, p.ip) // from here on the address may be handed out again
	}
	pl.mu.Unlock()
	start := time.Now()
	err := pl.node.Do(func() error { return pl.cni.DelNetworkList(context.Background(), pl.list, p.rt()) })
	took := time.Since(start)
	if err != nil {
		pl.fail("DEL %s: %v", p.id, err)
		return
	}
	if err := p.ns.Close(); err != nil {
		pl.fail("remove the namespace of %s: %v", p.id, err)
	}
	pl.mu.Lock()
	defer pl.mu.Unlock()
	delete(pl.children, p.ns)
	pl.dels = append(pl.dels, took)
	delete(pl.live, p.id)
}

func (pl *podLoad) fail(format string, args ...any) {
	pl.mu.Lock()
	pl.errs++
	pl.mu.Unlock()
	pl.t.Errorf(format, args...)
}

// wave runs jobs, 16 at a time.
func wave(jobs []func()) time.Duration {
	start := time.Now()
	ch := make(chan func())
	var wg sync.WaitGroup
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range ch {
				j()
			}
		}()
	}
	for _, j := range jobs {
		ch <- j
	}
	close(ch)
	wg.Wait()
	return time.Since(start)
}

// leaks compares the node with the live pods: the store holds exactly their addresses,
// the node exactly their host veths, the anti-spoofing set exactly their entries, iptables
// exactly their host-port rules (and no host-port chain once none is published).
func (pl *podLoad) leaks(storeDir string) []string {
	var out []string
	want := map[ipam.Key]netip.Addr{}
	veths := map[string]bool{}
	tags := map[string]bool{}
	for _, p := range pl.live {
		want[ipam.Key{ContainerID: p.id, IfName: "eth0"}] = p.ip
		veths[bridge.HostVethName(p.id, "eth0")] = true
		if p.port != 0 {
			tags[hostport.Tag(p.id, "eth0")] = true
		}
	}
	s, err := ipam.Open(storeDir)
	if err != nil {
		return []string{err.Error()}
	}
	recs, err := s.Records()
	if err != nil {
		return []string{fmt.Sprintf("address store unreadable: %v", err)}
	}
	seen := map[netip.Addr]bool{}
	for _, r := range recs {
		if seen[r.IP] {
			out = append(out, fmt.Sprintf("%s recorded twice", r.IP))
		}
		seen[r.IP] = true
		if ip, ok := want[r.Key]; !ok || ip != r.IP {
			out = append(out, fmt.Sprintf("store holds %s for %s, which is not a live pod with that address", r.IP, r.Key))
		}
	}
	if len(recs) != len(want) {
		out = append(out, fmt.Sprintf("store holds %d addresses for %d live pods", len(recs), len(want)))
	}
	wantEntries := map[string]bool{}
	for _, p := range pl.live {
		wantEntries[antispoof.EntryFor(bridge.HostVethName(p.id, "eth0"), p.ip).String()] = true
	}
	// A bridged pod has its entry in the bridge set, a routed one its chain (by its veth).
	var entries []antispoof.Entry
	var chains []string
	if err := pl.node.Do(func() error {
		var err error
		entries, err = antispoof.List(context.Background())
		if errors.Is(err, antispoof.ErrNotInstalled) {
			err = nil
		}
		if err != nil {
			return err
		}
		chains, err = antispoof.RoutedChains(context.Background())
		return err
	}); err != nil {
		out = append(out, err.Error())
	}
	for _, e := range entries {
		if !wantEntries[e.String()] {
			out = append(out, fmt.Sprintf("anti-spoofing entry %q of no live pod", e))
		}
	}
	for _, c := range chains {
		if !veths[c] {
			out = append(out, fmt.Sprintf("routed pod's anti-spoofing chain %q of no live pod", c))
		}
	}
	if len(entries)+len(chains) != len(wantEntries) {
		out = append(out, fmt.Sprintf("%d anti-spoofing entries and %d routed pods' chains for %d live pods", len(entries), len(chains), len(wantEntries)))
	}
	h, err := pl.node.Handle()
	if err != nil {
		return append(out, err.Error())
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return append(out, err.Error())
	}
	nveth := 0
	for _, l := range links {
		if name := l.Attrs().Name; l.Type() == "veth" && strings.HasPrefix(name, bridge.HostVethPrefix) {
			nveth++
			if !veths[name] {
				out = append(out, fmt.Sprintf("host veth %s of no live pod", name))
			}
		}
	}
	if nveth != len(veths) {
		out = append(out, fmt.Sprintf("%d host veths for %d live pods", nveth, len(veths)))
	}
	nat, err := pl.node.Run("iptables-save", "-t", "nat")
	if err != nil {
		return append(out, err.Error())
	}
	rules := map[string]int{}
	for _, l := range strings.Split(nat, "\n") {
		hp := strings.Contains(l, hostport.Chain) || strings.Contains(l, hostport.PostChain)
		if i := strings.Index(l, "netagent-hp:"); i >= 0 {
			rules[strings.Trim(strings.Fields(l[i:])[0], `"`)]++
		} else if hp && len(tags) == 0 {
			out = append(out, "host-port chain or jump left with no port published: "+l)
		}
	}
	for tag, c := range rules {
		if !tags[tag] || c != 2 {
			out = append(out, fmt.Sprintf("%d host-port rules for %s (live with a port: %v)", c, tag, tags[tag]))
		}
	}
	if len(rules) != len(tags) {
		out = append(out, fmt.Sprintf("host-port rules for %d attachments, %d live pods publish a port", len(rules), len(tags)))
	}
	return out
}

func pct(ds []time.Duration, q float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[int(q*float64(len(s)-1))].Round(100 * time.Microsecond)
}

// TestLoad500PodsWithPeerChurn wires 500 pods into one node (a /23 subnet) and removes
// them again in waves, 16 CNI calls in parallel, while a goroutine keeps replacing
// synthetic peer leases in etcd so the agent reconciles all along. No ADD or DEL may fail,
// no two live pods may ever share an address, every wave must leave exactly the live
// pods' addresses, veths and host-port rules, and at the end the agent's routes, FDB and
// neighbour entries must equal the final set of peers. Durations and latency percentiles
// are logged, never asserted.
func TestLoad500PodsWithPeerChurn(t *testing.T) {
	const pods = 500
	begin := time.Now()
	l := newLabWith(t, lab.Options{Backend: "vxlan", Nodes: 1, Network: "10.0.0.0/8"})
	n := l.Nodes[0]
	ns := l.NodeNS(n)
	// The node subnet must hold 500 pods: /23 subnets. The lease was made for /24, so the
	// agent leaves it and starts again under the new config.
	stopAgent(t, l, n, false)
	for _, args := range [][]string{
		{"leave", "--node-name", n.Name},
		{"config", "set", "--network", "10.0.0.0/8", "--subnet-len", "23", "--backend", "vxlan"},
	} {
		if out, err := l.NodeNS(n).Run(l.Opt.Netagent, append(args, l.EtcdFlags()...)...); err != nil {
			t.Fatalf("netagent %s: %v: %s", args[0], err, out)
		}
	}
	if err := l.StartAgent(n); err != nil {
		t.Fatal(err)
	}
	if err := l.WaitReady(context.Background(), n, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	own := netip.MustParsePrefix(status(t, l, n).Subnet)
	if own.Bits() != 23 {
		t.Fatalf("node subnet %s after subnetLen 23", own)
	}

	list, err := libcni.LoadNetworkConf(filepath.Join(n.Dir, "net.d"), "netagent")
	if err != nil {
		t.Fatal(err)
	}
	pl := &podLoad{t: t, node: ns, list: list, live: map[string]*loadPod{}, byIP: map[netip.Addr]*loadPod{}, children: map[*netns.NS]bool{},
		cni: libcni.NewCNIConfigWithCacheDir([]string{l.Opt.CNIBinDir}, filepath.Join(n.Dir, "load-cache"),
			&invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}, PluginDecoder: version.PluginDecoder{}})}
	t.Cleanup(func() {
		for c := range pl.children {
			_ = c.Close()
		}
	})
	storeDir := filepath.Join(n.Dir, "ipam", "netagent")

	// Peer churn: 200 synthetic peers, then one replaced every 10 ms until the pods are gone.
	seed := uint64(time.Now().UnixNano())
	t.Logf("node subnet %s; seed %d", own, seed)
	sp := newSynthPeers(t, l, synthetic23)
	sp.add(200)
	stop := make(chan struct{})
	churned := atomic.Int64{}
	var churn sync.WaitGroup
	churn.Add(1)
	go func() {
		defer churn.Done()
		rng := rand.New(rand.NewPCG(seed, 0x636875))
		for {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			sp.remove(1, rng)
			sp.add(1)
			churned.Add(1)
		}
	}()

	rng := rand.New(rand.NewPCG(seed, 0x706f64))
	creates := func(k int) []func() {
		jobs := make([]func(), k)
		for i := range jobs {
			port := rng.IntN(10) == 0 // a tenth of the pods publish a host port
			jobs[i] = func() { pl.add(port) }
		}
		return jobs
	}
	deletes := func(k int) []func() {
		var ps []*loadPod
		for _, p := range pl.live {
			ps = append(ps, p)
		}
		sort.Slice(ps, func(i, j int) bool { return ps[i].id < ps[j].id })
		rng.Shuffle(len(ps), func(i, j int) { ps[i], ps[j] = ps[j], ps[i] })
		jobs := make([]func(), 0, k)
		for _, p := range ps[:min(k, len(ps))] {
			jobs = append(jobs, func() { pl.del(p) })
		}
		return jobs
	}
	mixed := func(del, add int) []func() {
		jobs := append(deletes(del), creates(add)...)
		rng.Shuffle(len(jobs), func(i, j int) { jobs[i], jobs[j] = jobs[j], jobs[i] })
		return jobs
	}
	var leaks []string
	for _, w := range []struct {
		name string
		jobs func() []func()
	}{
		{"create 500", func() []func() { return creates(pods) }},
		{"delete 250", func() []func() { return deletes(pods / 2) }},
		// ADDs and DELs at once on the same store; at most 250+16 pods live.
		{"create 250 while deleting 125", func() []func() { return mixed(pods/4, pods/2) }},
		{"delete all", func() []func() { return deletes(len(pl.live)) }},
	} {
		jobs := w.jobs()
		d := wave(jobs)
		t.Logf("wave %q: %d CNI calls in %s (%.0f/s), %d pods live", w.name, len(jobs), d.Round(time.Millisecond), float64(len(jobs))/d.Seconds(), len(pl.live))
		if len(pl.live) == pods {
			// Full: the node answers from a few pods.
			var ps []*loadPod
			for _, p := range pl.live {
				ps = append(ps, p)
			}
			for _, p := range ps[1:6] {
				if err := lab.Ping(ps[0].ns, p.ip.String()); err != nil {
					t.Errorf("pod %s -> pod %s (%s) with %d pods on the node: %v", ps[0].id, p.id, p.ip, pods, err)
				}
			}
		}
		for _, p := range pl.leaks(storeDir) {
			leaks = append(leaks, w.name+": "+p)
		}
	}
	close(stop)
	churn.Wait()

	final := sp.leases()
	diff, settle := waitDataplane(ns, "netagent.1", wantDataplane("netagent.1", final), sp.names, 30*time.Second)
	if len(diff) > 0 {
		t.Errorf("after %d lease replacements the agent's dataplane differs from the %d final peers in %d objects:\n%s", churned.Load(), len(final), len(diff), strings.Join(diff[:min(len(diff), 20)], "\n"))
	}
	if p := natProblems(ns); len(p) > 0 {
		t.Errorf("NAT after the load:\n%s", strings.Join(p, "\n"))
	}
	if len(leaks) > 0 {
		t.Errorf("leaks:\n%s", strings.Join(leaks, "\n"))
	}
	t.Logf("%d ADDs (%d with a host port), %d DELs, %d errors, %d duplicate addresses, %d leaks; %d peer leases replaced meanwhile, dataplane equal to the %d final peers %s after the churn stopped; took %s",
		len(pl.adds), pl.ported, len(pl.dels), pl.errs, pl.dupes, len(leaks), churned.Load(), len(final), settle.Round(time.Millisecond), time.Since(begin).Round(time.Second))
	if len(pl.adds) > 0 && len(pl.dels) > 0 {
		t.Logf("ADD latency p50 %s p90 %s p99 %s max %s; DEL latency p50 %s p90 %s p99 %s max %s (16 in parallel, 2 cores)",
			pct(pl.adds, .5), pct(pl.adds, .9), pct(pl.adds, .99), pct(pl.adds, 1), pct(pl.dels, .5), pct(pl.dels, .9), pct(pl.dels, .99), pct(pl.dels, 1))
	}
}

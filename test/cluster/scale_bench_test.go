package cluster_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	vns "github.com/vishvananda/netns"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/lab"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/pkg/route"
	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

// synthetic returns the i-th synthetic peer lease (VTEPs behind a router, so vxlan).
func synthetic(i int) lease.Lease {
	node := fmt.Sprintf("synthetic-%05d", i)
	return lease.Lease{
		Node:     node,
		Subnet:   netip.MustParsePrefix(fmt.Sprintf("10.%d.%d.0/24", 1+i/256, i%256)),
		PublicIP: netip.MustParseAddr(fmt.Sprintf("198.18.%d.%d", i/250, 1+i%250)),
		Backend:  "vxlan",
		VTEPMAC:  plan.VTEPMAC(node).String(),
	}
}

// synthetic6 is synthetic(i) in a dual-stack cluster: an IPv6 pod subnet too, carried
// over the same IPv4 VXLAN (the peers have no IPv6 underlay address).
func synthetic6(i int) lease.Lease {
	l := synthetic(i)
	l.Subnet6 = netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%x::/64", i+1))
	return l
}

// synthetic6u is the i-th peer of an IPv6-only cluster over an IPv6 underlay: an IPv6 pod
// subnet and an IPv6 underlay address only (behind the router, so VXLAN over IPv6).
func synthetic6u(i int) lease.Lease {
	l := synthetic6(i)
	l.Subnet, l.PublicIP = netip.Prefix{}, netip.Addr{}
	l.PublicIP6 = netip.MustParseAddr(fmt.Sprintf("2001:db8:18::%x:%x", i/250, 1+i%250))
	return l
}

func countOurRoutes(h *netlink.Handle) int { return countOurRoutesOf(h, unix.AF_INET) }

func countOurRoutesOf(h *netlink.Handle, family int) int {
	rs, err := h.RouteListFiltered(family, &netlink.Route{Protocol: route.Protocol, Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	if err != nil {
		return -1
	}
	return len(rs)
}

func rssMB(pid int) float64 {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			kb, _ := strconv.Atoi(strings.Fields(l)[1])
			return float64(kb) / 1024
		}
	}
	return 0
}

func cpuTicks(pid int) int {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	f := strings.Fields(string(b)[strings.LastIndexByte(string(b), ')')+2:])
	u, _ := strconv.Atoi(f[11])
	s, _ := strconv.Atoi(f[12])
	return u + s
}

// watchOurRoutes subscribes to the namespace's route notifications and returns a wait for
// the time from now until the main table holds want[0] IPv4 and want[1] IPv6 routes of
// netagent's protocol. Counting by notification, not by polling: a dump of 10,000 routes
// every few milliseconds keeps a core of this 2-core machine busy and slowed the very
// agent it timed. A notification buffer that overflows falls back to polling every 20 ms.
func watchOurRoutes(b *testing.B, nsPath string) func(want [2]int, limit time.Duration) (time.Duration, error) {
	nsh, err := vns.GetFromPath(nsPath)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { nsh.Close() })
	updates := make(chan netlink.RouteUpdate, 4096)
	done := make(chan struct{})
	b.Cleanup(func() { close(done) })
	overflow := make(chan error, 1)
	if err := netlink.RouteSubscribeWithOptions(updates, done, netlink.RouteSubscribeOptions{
		Namespace: &nsh, ReceiveBufferSize: 64 << 20, ReceiveBufferForceSize: true,
		ErrorCallback: func(err error) {
			select {
			case overflow <- err:
			default:
			}
		},
	}); err != nil {
		b.Fatal(err)
	}
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(h.Close)
	start := time.Now()
	seen := [2]map[string]bool{{}, {}}
	return func(want [2]int, limit time.Duration) (time.Duration, error) {
		deadline := time.After(limit)
		for len(seen[0]) < want[0] || len(seen[1]) < want[1] {
			select {
			case u := <-updates:
				if u.Protocol != route.Protocol || u.Table != unix.RT_TABLE_MAIN || u.Dst == nil {
					continue
				}
				f := 0
				if u.Dst.IP.To4() == nil {
					f = 1
				}
				switch u.Type {
				case unix.RTM_NEWROUTE:
					seen[f][u.Dst.String()] = true
				case unix.RTM_DELROUTE:
					delete(seen[f], u.Dst.String())
				}
			case err := <-overflow:
				b.Logf("route notifications lost (%v): polling every 20 ms", err)
				for countOurRoutes(h) < want[0] || countOurRoutesOf(h, unix.AF_INET6) < want[1] {
					if time.Since(start) > limit {
						return 0, fmt.Errorf("only %d IPv4 and %d IPv6 routes after %s", countOurRoutes(h), countOurRoutesOf(h, unix.AF_INET6), limit)
					}
					time.Sleep(20 * time.Millisecond)
				}
				return time.Since(start), nil
			case <-deadline:
				return 0, fmt.Errorf("only %d IPv4 and %d IPv6 routes after %s", len(seen[0]), len(seen[1]), limit)
			}
		}
		return time.Since(start), nil
	}
}

// rawProgram is the reference: the same objects written straight through netlink into a
// fresh namespace, with nothing else (no etcd, no plan, no diff).
func rawProgram(b *testing.B, peers []lease.Lease) time.Duration {
	ns := netns.New(b, "raw")
	ns.MustRun(b, "ip", "link", "add", "eth0", "type", "bridge")
	ns.MustRun(b, "ip", "addr", "add", "192.0.2.11/24", "dev", "eth0")
	ns.MustRun(b, "ip", "link", "set", "eth0", "up")
	local := []string{}
	if !peers[0].PublicIP.IsValid() { // over IPv6, as the agent's device
		ns.MustRun(b, "ip", "addr", "add", "2001:db8:1::11/64", "dev", "eth0", "nodad")
		local = []string{"local", "2001:db8:1::11"}
	}
	ns.MustRun(b, "ip", append([]string{"link", "add", "vx", "type", "vxlan", "id", "1", "dstport", "8472", "dev", "eth0", "nolearning"}, local...)...)
	ns.MustRun(b, "ip", "link", "set", "vx", "up")
	h, err := ns.Handle()
	if err != nil {
		b.Fatal(err)
	}
	defer h.Close()
	vx, _ := h.LinkByName("vx")
	idx := vx.Attrs().Index
	start := time.Now()
	for _, p := range peers {
		mac := p.MAC()
		if err := h.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, State: netlink.NUD_PERMANENT, IP: p.PublicIPOf(!p.PublicIP.IsValid()).AsSlice(), HardwareAddr: mac}); err != nil {
			b.Fatal(err)
		}
		if p.Subnet.IsValid() {
			vtep := p.Subnet.Addr().AsSlice()
			if err := h.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_INET, State: netlink.NUD_PERMANENT, IP: vtep, HardwareAddr: mac}); err != nil {
				b.Fatal(err)
			}
			if err := h.RouteReplace(&netlink.Route{LinkIndex: idx, Dst: &net.IPNet{IP: vtep, Mask: net.CIDRMask(24, 32)}, Gw: vtep, Flags: int(netlink.FLAG_ONLINK), Protocol: route.Protocol}); err != nil {
				b.Fatal(err)
			}
		}
		if !p.Subnet6.IsValid() {
			continue
		}
		vtep6 := p.Subnet6.Addr().AsSlice()
		if err := h.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_INET6, State: netlink.NUD_PERMANENT, IP: vtep6, HardwareAddr: mac}); err != nil {
			b.Fatal(err)
		}
		if err := h.RouteReplace(&netlink.Route{LinkIndex: idx, Dst: &net.IPNet{IP: vtep6, Mask: net.CIDRMask(64, 128)}, Gw: vtep6, Flags: int(netlink.FLAG_ONLINK), Protocol: route.Protocol}); err != nil {
			b.Fatal(err)
		}
	}
	return time.Since(start)
}

// BenchmarkAgentScale: one agent, 5,000 synthetic peer leases in etcd. It reports the time
// to program every route, FDB and neighbour entry from a cold start, the time one further
// lease takes to reach the kernel, RSS and idle CPU, each next to the raw netlink cost of
// the same kernel objects measured in the same run; for an IPv4 cluster, a dual-stack one
// (each peer an IPv6 subnet too: twice the routes and neighbours), and an IPv6-only one over
// an IPv6 underlay (VXLAN over IPv6, the allow-list in its ip6 table).
//
//	go test -run '^$' -bench AgentScale -benchtime 20x ./test/cluster
func BenchmarkAgentScale(b *testing.B) {
	netns.RequireRoot(b)
	for _, family := range []string{"ipv4", "dual", "ipv6"} {
		b.Run("family="+family, func(b *testing.B) { agentScale(b, family) })
	}
}

func agentScale(b *testing.B, family string) {
	const peers = 5000
	bin := testbin.Build(b, "./cmd/netagent", "netagent")
	testbin.Build(b, "./cmd/netagent-etcd", "netagent-etcd")
	testbin.Build(b, "./cmd/cni-plugin", "netagent-cni")
	ctx := context.Background()
	gen := map[string]func(int) lease.Lease{"ipv4": synthetic, "dual": synthetic6, "ipv6": synthetic6u}[family]
	l, err := lab.Up(ctx, lab.Options{
		Prefix: fmt.Sprintf("%s%d-scale-", netns.Prefix, os.Getpid()), Dir: b.TempDir(),
		Nodes: 1, Backend: "vxlan", Netagent: bin, CNIBinDir: testbin.Dir(), LeaseTTL: 30 * time.Second,
		Network: "10.0.0.0/8", IPFamily: family,
	})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Down()
	n := l.Nodes[0]
	if err := l.StopAgent(n, false); err != nil {
		b.Fatal(err)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{l.EtcdEndpoint()}, DialTimeout: 5 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	defer cli.Close()
	grant, err := cli.Grant(ctx, 3600)
	if err != nil {
		b.Fatal(err)
	}
	// The node leased a random subnet per family when the lab started it: a synthetic peer
	// on one of them would lose it to the node and be left out (4,999 routes, never 5,000).
	// (Its owner record names them: "subnet[,subnet6]".)
	mine := map[netip.Prefix]bool{}
	owner, err := cli.Get(ctx, "/netagent/owners/"+n.Name)
	if err != nil || len(owner.Kvs) != 1 {
		b.Fatalf("the node's owner record: %v, %v", owner, err)
	}
	for f := range strings.SplitSeq(string(owner.Kvs[0].Value), ",") {
		mine[netip.MustParsePrefix(f)] = true
	}
	all := make([]lease.Lease, 0, peers+b.N)
	for i := 0; len(all) < peers+b.N; i++ {
		if p := gen(i); !slices.ContainsFunc(p.Subnets(), func(s netip.Prefix) bool { return mine[s] }) {
			all = append(all, p)
		}
	}
	for _, p := range all[:peers] {
		if _, err := cli.Put(ctx, "/netagent/subnets/"+lease.SubnetKey(p.Primary()), string(p.Encode()), clientv3.WithLease(grant.ID)); err != nil {
			b.Fatal(err)
		}
	}
	raw := rawProgram(b, all[:peers])

	h, err := l.NodeNS(n).Handle()
	if err != nil {
		b.Fatal(err)
	}
	defer h.Close()
	landed := watchOurRoutes(b, l.NodeNS(n).Path)
	start := time.Now()
	if err := l.StartAgent(n); err != nil {
		b.Fatal(err)
	}
	if f := os.Getenv("SCALE_CPU"); f != "" { // with NETAGENT_PPROF=true: a CPU profile of the cold start
		go func() {
			for time.Since(start) < 10*time.Second {
				if code, prof, err := l.Get(n, "/debug/pprof/profile?seconds=4"); err == nil && code == 200 {
					_ = os.WriteFile(f, prof, 0o644)
					return
				}
				time.Sleep(5 * time.Millisecond)
			}
		}()
	}
	want := [2]int{peers, peers}
	switch family {
	case "ipv4":
		want[1] = 0
	case "ipv6":
		want[0] = 0
	}
	cold, err := landed(want, 2*time.Minute)
	if err != nil {
		b.Fatal(err)
	}
	if v4, v6 := countOurRoutes(h), countOurRoutesOf(h, unix.AF_INET6); v4 < want[0] || v6 < want[1] {
		b.Fatalf("notifications counted %v routes, a dump finds %d IPv4 and %d IPv6", want, v4, v6)
	}
	if err := l.WaitReady(ctx, n, time.Minute); err != nil {
		b.Fatal(err)
	}
	t0 := cpuTicks(n.Agent)
	time.Sleep(5 * time.Second)
	idle := float64(cpuTicks(n.Agent)-t0) / 100 / 5 // share of one core
	// Steady-state RSS: after the 5 s idle window, not in the wake of the cold pass.
	rss := rssMB(n.Agent)
	if f := os.Getenv("SCALE_HEAP"); f != "" { // with NETAGENT_PPROF=true in the environment
		if _, heap, err := l.Get(n, "/debug/pprof/heap"); err == nil {
			_ = os.WriteFile(f, heap, 0o644)
		}
	}
	if _, m, err := l.Get(n, "/metrics"); err == nil {
		for _, line := range strings.Split(string(m), "\n") {
			if strings.HasPrefix(line, "go_memstats_heap_inuse_bytes") || strings.HasPrefix(line, "go_memstats_heap_alloc_bytes") || strings.HasPrefix(line, "go_memstats_heap_idle_bytes") || strings.HasPrefix(line, "go_memstats_heap_released_bytes") || strings.HasPrefix(line, "go_memstats_stack_inuse_bytes") ||
				strings.HasPrefix(line, "netagent_reconcile_duration_seconds_count") { // passes so far: one, unless notifications overflowed
				b.Log(line)
			}
		}
		b.Logf("status: %s", func() string {
			s, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", n.Agent))
			return grepLines(string(s), "Rss")
		}())
	}
	// Watch the node's routes as they land (a subscription, not polling, which would dump
	// 5,000 routes per look).
	nsh, err := vns.GetFromPath(l.NodeNS(n).Path)
	if err != nil {
		b.Fatal(err)
	}
	defer nsh.Close()
	updates := make(chan netlink.RouteUpdate, 1024)
	done := make(chan struct{})
	defer close(done)
	if err := netlink.RouteSubscribeWithOptions(updates, done, netlink.RouteSubscribeOptions{Namespace: &nsh}); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	var total, afterCommit time.Duration
	for i := range b.N {
		p := all[peers+i]
		// The change is in the kernel when the routes of every family it brings are.
		want := map[string]bool{}
		for _, s := range []netip.Prefix{p.Subnet, p.Subnet6} {
			if s.IsValid() {
				want[s.String()] = true
			}
		}
		t := time.Now()
		if _, err := cli.Put(ctx, "/netagent/subnets/"+lease.SubnetKey(p.Primary()), string(p.Encode()), clientv3.WithLease(grant.ID)); err != nil {
			b.Fatal(err)
		}
		committed := time.Now()
	wait:
		for {
			select {
			case u := <-updates:
				if u.Type == unix.RTM_NEWROUTE && u.Dst != nil && want[u.Dst.String()] {
					delete(want, u.Dst.String())
					if len(want) == 0 {
						break wait
					}
				}
			case <-time.After(10 * time.Second):
				b.Fatalf("lease %d not programmed in 10s", i)
			}
		}
		total += time.Since(t)
		afterCommit += time.Since(committed)
	}
	b.StopTimer()
	if f := os.Getenv("SCALE_LOG"); f != "" {
		log, _ := os.ReadFile(n.Dir + "/agent.log")
		_ = os.WriteFile(f, log, 0o644)
	}
	perChange := total / time.Duration(b.N)
	perCommitted := afterCommit / time.Duration(b.N)
	b.ReportMetric(cold.Seconds(), "cold-program-s")
	b.ReportMetric(cold.Seconds()/raw.Seconds(), "cold/raw-netlink")
	b.ReportMetric(float64(perChange.Microseconds())/1000, "one-change-ms")
	b.ReportMetric(float64(perCommitted.Microseconds())/1000, "committed-to-kernel-ms")
	b.ReportMetric(float64(perChange)/(float64(raw)/peers), "one-change/raw-netlink-per-peer")
	b.ReportMetric(rss, "rss-MB")
	b.ReportMetric(idle*100, "idle-cpu-%")
	b.Logf("peers %d: agent programs all in %s (raw netlink %s), one change %s (%s after etcd committed it), RSS %.1f MB, idle CPU %.2f%% of a core",
		peers, cold.Round(time.Millisecond), raw.Round(time.Millisecond), perChange.Round(time.Microsecond), perCommitted.Round(time.Microsecond), rss, idle*100)
}

func grepLines(s, prefix string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, prefix) {
			out = append(out, strings.Join(strings.Fields(l), " "))
		}
	}
	return strings.Join(out, "; ")
}

package wireguard_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/netagent/netagent/pkg/lab"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/netipx"
	"github.com/netagent/netagent/pkg/wireguard/device"
	"github.com/netagent/netagent/test/labtest"
	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

// The benchmarks here run the wireguard backend as users get it: a lab of real agents
// (etcd, CNI plugin, bridge and veth pods, the underlay guard, netagent-wireguard daemons
// configured by the agents), next to references measured in the same run.

func wgLabLogs(l *lab.Lab, n *lab.Node) []string {
	return []string{"state/netagent-wireguard-" + l.WGDevice(n) + ".log"}
}

// BenchmarkAgentThroughput: pod to pod across two nodes of a wireguard lab (one iperf3
// TCP stream), and node to node through the same devices, against a bare upstream wireguard-go tunnel between the same two node
// namespaces over the same underlay (the floor for the userspace implementation) and the
// plain underlay, 5 interleaved rounds of 2 s.
//
//	go test -run '^$' -bench AgentThroughput -benchtime 1x ./test/wireguard
func BenchmarkAgentThroughput(b *testing.B) {
	l := labtest.Up(b, lab.Options{Backend: "wireguard", Nodes: 2, PodsPerNode: 1}, wgLabLogs)
	n1, n2 := l.Nodes[0], l.Nodes[1]
	p1, p2 := l.PodNS(n1.Pods[0]), l.PodNS(n2.Pods[0])
	pingUntil(b, p1, n2.Pods[0].IP)
	bare := bareTunnel(b, tunnelEnd{l.NodeNS(n1), n1.IP}, tunnelEnd{l.NodeNS(n2), n2.IP})
	// node2's bridge address (the first of its pod subnet): node to node through the
	// agents' devices, without the pods' veth and bridge legs.
	gw := netip.PrefixFrom(n2.Pods[0].IP, 24).Masked().Addr().Next()
	throughput(b, []iperfPath{
		{"underlay", l.NodeNS(n1), l.NodeNS(n2), n2.IP.String()},
		{"bare-wireguard-go", l.NodeNS(n1), l.NodeNS(n2), bare},
		{"agent-pods", p1, p2, n2.Pods[0].IP.String()},
		{"agent-nodes", l.NodeNS(n1), l.NodeNS(n2), gw.String()},
	}, []ratio{{"pods/bare", 2, 1}, {"nodes/bare", 3, 1}, {"pods/underlay", 2, 0}, {"bare/underlay", 1, 0}})
}

// BenchmarkAgentJoin: node3 of a 3-node wireguard lab leaves (its agent killed, `netagent
// leave`: its peer goes from the other nodes' devices) and its agent starts again, with a
// 2 ms ping running both ways between its pod and each other node's pod. Reported: from
// the moment a watch on etcd sees node3's new lease with its WireGuard key (when peers can
// add it: a new node claims its lease without the key and publishes the key after its
// first pass) to the first reply on the slowest of the four pings (every node's traffic
// flows, handshakes included), the agent's start to that lease, and for a new node the
// claim to the key. Each iteration joins twice: as a node that keeps its WireGuard device
// and key across the leave (a rejoin: node3 still holds its peers), and as a brand-new
// node (its device and key deleted before the start: a new daemon, a new key, no peers);
// new/rejoin is the ratio of their lease -> flow means in the same run.
//
//	go test -run '^$' -bench AgentJoin -benchtime 5x ./test/wireguard
func BenchmarkAgentJoin(b *testing.B) {
	l := labtest.Up(b, lab.Options{Backend: "wireguard", Nodes: 3, PodsPerNode: 1}, wgLabLogs)
	n1, n2, n3 := l.Nodes[0], l.Nodes[1], l.Nodes[2]
	wg, err := wgctrl.New()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { wg.Close() })
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{l.EtcdEndpoint()}, DialTimeout: 5 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cli.Close() })
	ctx := context.Background()
	pod := func(n *lab.Node) *netns.NS { return l.PodNS(n.Pods[0]) }
	ip := func(n *lab.Node) netip.Addr { return n.Pods[0].IP }
	peers := func(n *lab.Node) int {
		d, err := wg.Device(l.WGDevice(n))
		if err != nil {
			return -1
		}
		return len(d.Peers)
	}
	type sums struct{ join, start, added, route, worst, daemon, own, total, claim time.Duration }
	var rejoin, fresh sums
	for range b.N {
		for _, isNew := range []bool{false, true} {
			if err := l.StopAgent(n3, true); err != nil {
				b.Fatal(err)
			}
			if out, err := l.Netagent(ctx, "leave", "--node-name", n3.Name); err != nil {
				b.Fatalf("netagent leave: %v: %s", err, out)
			}
			for deadline := time.Now().Add(10 * time.Second); peers(n1) != 1 || peers(n2) != 1; time.Sleep(10 * time.Millisecond) {
				if time.Now().After(deadline) {
					b.Fatal("node3's peer still on node1 or node2 after it left")
				}
			}
			sum := &rejoin
			if isNew {
				sum = &fresh
				// A brand-new node: no device (its daemon stops with it), no key.
				l.NodeNS(n3).MustRun(b, "ip", "link", "del", l.WGDevice(n3))
				for deadline := time.Now().Add(10 * time.Second); device.SocketLive(l.WGDevice(n3)); time.Sleep(10 * time.Millisecond) {
					if time.Now().After(deadline) {
						b.Fatal("node3's daemon still answers after its device was deleted")
					}
				}
				if err := os.Remove(filepath.Join(n3.Dir, "state", "wireguard.key")); err != nil {
					b.Fatal(err)
				}
			}
			pings := []*pinger{
				startPingEvery(b, pod(n1), ip(n3), 2*time.Millisecond), startPingEvery(b, pod(n2), ip(n3), 2*time.Millisecond),
				startPingEvery(b, pod(n3), ip(n1), 2*time.Millisecond), startPingEvery(b, pod(n3), ip(n2), 2*time.Millisecond),
			}
			wctx, cancel := context.WithCancel(ctx)
			seen, claimed := make(chan time.Time, 1), make(chan time.Time, 1)
			w := cli.Watch(wctx, "/netagent/subnets/", clientv3.WithPrefix())
			go func() {
				first := true
				for r := range w {
					for _, ev := range r.Events {
						if l, err := lease.Decode(ev.Kv.Value); ev.Type == clientv3.EventTypePut && err == nil && l.Node == n3.Name {
							now := time.Now()
							if first {
								claimed <- now
								first = false
							}
							if l.WGPublicKey != "" {
								seen <- now
								return
							}
						}
					}
				}
			}()
			time.Sleep(100 * time.Millisecond) // the watch is established
			t0 := time.Now()
			if err := l.StartAgent(n3); err != nil {
				b.Fatal(err)
			}
			var leased time.Time
			select {
			case leased = <-seen:
			case <-time.After(30 * time.Second):
				b.Fatal("node3's lease not seen within 30 s")
			}
			cancel()
			claim := <-claimed
			sum.claim += leased.Sub(claim)
			var last time.Time
			for _, p := range pings {
				p.waitReplies(1, 10*time.Second)
				p.mu.Lock()
				first := time.Unix(0, int64(p.rx[0]*1e9))
				p.mu.Unlock()
				if first.After(last) {
					last = first
				}
				p.finish()
			}
			sum.join += last.Sub(leased)
			sum.worst = max(sum.worst, last.Sub(leased))
			sum.start += leased.Sub(t0)
			sum.total += last.Sub(t0)
			// When the slower of node1 and node2 had node3's peer on its device, and the
			// route to node3's pods (their agents' log, millisecond stamps; the route is
			// logged at the end of the pass that added it): the watch, the plan and the Set.
			var in, routed time.Time
			for _, n := range []*lab.Node{n1, n2} {
				log := filepath.Join(n.Dir, "agent.log")
				in = later(in, lastLogTime(b, log, `msg="wireguard device reconciled"`, n3.Name))
				routed = later(routed, lastLogTime(b, log, `msg="dataplane updated"`, `routes="+1 `))
			}
			sum.added += in.Sub(leased)
			sum.route += routed.Sub(leased)
			kind := "rejoin"
			var more string
			if isNew {
				// node3's own side: its daemon up, and its device holding its peers.
				log := filepath.Join(n3.Dir, "agent.log")
				up := lastLogTime(b, log, `msg="wireguard daemon started"`, "")
				own := lastLogTime(b, log, `msg="wireguard device reconciled"`, "added")
				sum.daemon += up.Sub(leased)
				sum.own += own.Sub(leased)
				kind = "new node"
				more = fmt.Sprintf("; on node3: lease claimed %v before, its daemon up %v, its peers set %v", leased.Sub(claim).Round(time.Millisecond), up.Sub(leased).Round(time.Millisecond), own.Sub(leased).Round(time.Millisecond))
			}
			b.Logf("%s: lease to node3's peer set on node1 and node2 %v, its route %v, to flow both ways on every node %v%s", kind,
				in.Sub(leased).Round(time.Millisecond), routed.Sub(leased).Round(time.Millisecond), last.Sub(leased).Round(time.Millisecond), more)
			if err := l.WaitConverged(ctx, 10*time.Second); err != nil {
				b.Fatal(err)
			}
		}
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 / float64(b.N) }
	b.ReportMetric(ms(rejoin.join), "ms/lease-to-flow")
	b.ReportMetric(float64(rejoin.worst.Microseconds())/1000, "ms/lease-to-flow-max")
	b.ReportMetric(ms(rejoin.added), "ms/lease-to-peer-set")
	b.ReportMetric(ms(rejoin.route), "ms/lease-to-route")
	b.ReportMetric(ms(rejoin.start), "ms/start-to-lease")
	b.ReportMetric(ms(fresh.join), "ms/new-lease-to-flow")
	b.ReportMetric(float64(fresh.worst.Microseconds())/1000, "ms/new-lease-to-flow-max")
	b.ReportMetric(ms(fresh.daemon), "ms/new-lease-to-daemon")
	b.ReportMetric(ms(fresh.own), "ms/new-lease-to-own-peers")
	b.ReportMetric(ms(fresh.start), "ms/new-start-to-lease")
	b.ReportMetric(ms(fresh.claim), "ms/new-claim-to-key")
	b.ReportMetric(ms(rejoin.total), "ms/start-to-flow")
	b.ReportMetric(ms(fresh.total), "ms/new-start-to-flow")
	b.ReportMetric(float64(fresh.join)/float64(rejoin.join), "new/rejoin")
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// lastLogTime is the time= stamp of the last line of an agent's log holding both strings.
func lastLogTime(b *testing.B, file, a, c string) time.Time {
	b.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		b.Fatal(err)
	}
	lines := strings.Split(string(data), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if f := strings.Fields(lines[i]); len(f) > 0 && strings.Contains(lines[i], a) && strings.Contains(lines[i], c) {
			at, err := time.Parse(time.RFC3339Nano, strings.TrimPrefix(f[0], "time="))
			if err != nil {
				b.Fatalf("%s: %v", file, err)
			}
			return at
		}
	}
	b.Fatalf("%s: no line with %s and %s", file, a, c)
	return time.Time{}
}

// BenchmarkAgentPeers: one agent of a wireguard lab starts with 1,000 synthetic peer
// leases (WireGuard keys, endpoints nobody answers on) in etcd; reported is the time from
// its start to all 1,000 peers on its device and their routes in the kernel, next to the
// same 1,000 peers written to a fresh upstream wireguard-go device in one wgctrl request
// (the floor: no store, plan, diff or routes) in the same run.
//
//	go test -run '^$' -bench AgentPeers -benchtime 3x ./test/wireguard
func BenchmarkAgentPeers(b *testing.B) {
	const peers = 1000
	l := labtest.Up(b, lab.Options{Backend: "wireguard", Nodes: 1, Network: "10.0.0.0/8", LeaseTTL: 30 * time.Second}, wgLabLogs)
	n := l.Nodes[0]
	ctx := context.Background()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{l.EtcdEndpoint()}, DialTimeout: 5 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cli.Close() })
	grant, err := cli.Grant(ctx, 3600)
	if err != nil {
		b.Fatal(err)
	}
	var cfgs []wgtypes.PeerConfig
	for i := range peers {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			b.Fatal(err)
		}
		p := lease.Lease{
			Node:        fmt.Sprintf("synthetic-%04d", i),
			Subnet:      netip.MustParsePrefix(fmt.Sprintf("10.%d.%d.0/24", 200+i/256, i%256)),
			PublicIP:    netip.MustParseAddr(fmt.Sprintf("198.18.%d.%d", i/250, 1+i%250)), // as test/cluster's scale benchmark
			Backend:     "wireguard",
			WGPublicKey: k.PublicKey().String(),
			WGPort:      51820,
		}
		if _, err := cli.Put(ctx, "/netagent/subnets/"+lease.SubnetKey(p.Subnet), string(p.Encode()), clientv3.WithLease(grant.ID)); err != nil {
			b.Fatal(err)
		}
		cfgs = append(cfgs, wgtypes.PeerConfig{PublicKey: k.PublicKey(), Endpoint: &net.UDPAddr{IP: p.PublicIP.AsSlice(), Port: 51820},
			ReplaceAllowedIPs: true, AllowedIPs: []net.IPNet{*netipx.IPNet(p.Subnet)}})
	}
	wg, err := wgctrl.New()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { wg.Close() })
	h, err := l.NodeNS(n).Handle()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(h.Close)
	programmed := func() bool {
		d, err := wg.Device(l.WGDevice(n))
		if err != nil || len(d.Peers) < peers {
			return false
		}
		rs, err := h.RouteListFiltered(unix.AF_INET, &netlink.Route{Protocol: rtProto, Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
		return err == nil && len(rs) >= peers
	}
	var agent, raw time.Duration
	for range b.N {
		if err := l.StopAgent(n, false); err != nil {
			b.Fatal(err)
		}
		// The device goes with its peers, so the agent programs them all again (its
		// daemon, started anew, is part of the cold start, as on a node's first boot).
		l.NodeNS(n).MustRun(b, "ip", "link", "del", l.WGDevice(n))
		t0 := time.Now()
		if err := l.StartAgent(n); err != nil {
			b.Fatal(err)
		}
		for !programmed() {
			if time.Since(t0) > 2*time.Minute {
				b.Fatal("1,000 peers not programmed within 2 minutes")
			}
			time.Sleep(5 * time.Millisecond)
		}
		agent += time.Since(t0)
		raw += rawPeers(b, cfgs)
	}
	b.ReportMetric(float64(agent.Milliseconds())/float64(b.N), "ms/agent-1000")
	b.ReportMetric(float64(raw.Milliseconds())/float64(b.N), "ms/raw-1000")
	b.ReportMetric(float64(agent)/float64(raw), "agent/raw")
}

// rawPeers starts upstream wireguard-go in a scratch namespace and times one wgctrl request
// adding cfgs to it.
func rawPeers(b *testing.B, cfgs []wgtypes.PeerConfig) time.Duration {
	b.Helper()
	ns := netns.New(b, "wgraw")
	bin := testbin.Build(b, "golang.zx2c4.com/wireguard", "wireguard-go")
	devSeq++
	dev := fmt.Sprintf("rwg%d-%d", os.Getpid()%1000000, devSeq)
	b.Cleanup(func() { _ = os.Remove(device.SocketPath(dev)) })
	cmd := ns.Command(context.Background(), bin, "-f", dev)
	cmd.Env = append(os.Environ(), "LOG_LEVEL=error")
	if err := ns.Start(cmd); err != nil {
		b.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); !device.SocketLive(dev); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			b.Fatalf("wireguard-go %s did not start", dev)
		}
	}
	ns.MustRun(b, "ip", "link", "set", dev, "up")
	wg, err := wgctrl.New()
	if err != nil {
		b.Fatal(err)
	}
	defer wg.Close()
	k, _ := wgtypes.GeneratePrivateKey()
	p := port + 2
	t0 := time.Now()
	if err := wg.ConfigureDevice(dev, wgtypes.Config{PrivateKey: &k, ListenPort: &p, Peers: cfgs}); err != nil {
		b.Fatal(err)
	}
	return time.Since(t0)
}

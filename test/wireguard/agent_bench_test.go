package wireguard_test

import (
	"context"
	"net/netip"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.zx2c4.com/wireguard/wgctrl"

	"github.com/netagent/netagent/pkg/lab"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/test/labtest"
	"github.com/netagent/netagent/test/netns"
)

// The benchmarks here run the wireguard backend as users get it: a lab of real agents
// (etcd, CNI plugin, bridge and veth pods, the underlay guard, netagent-wireguard daemons
// configured by the agents), next to references measured in the same run.

func wgLabLogs(l *lab.Lab, n *lab.Node) []string {
	return []string{"state/netagent-wireguard-" + l.WGDevice(n) + ".log"}
}

// BenchmarkAgentThroughput: pod to pod across two nodes of a wireguard lab (one iperf3
// TCP stream), against a bare upstream wireguard-go tunnel between the same two node
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
	throughput(b, []iperfPath{
		{"underlay", l.NodeNS(n1), l.NodeNS(n2), n2.IP.String()},
		{"bare-wireguard-go", l.NodeNS(n1), l.NodeNS(n2), bare},
		{"agent-pods", p1, p2, n2.Pods[0].IP.String()},
	}, []ratio{{"pods/bare", 2, 1}, {"pods/underlay", 2, 0}, {"bare/underlay", 1, 0}})
}

// BenchmarkAgentJoin: node3 of a 3-node wireguard lab leaves (its agent killed, `netagent
// leave`: its peer goes from the other nodes' devices) and its agent starts again, with a
// 2 ms ping running both ways between its pod and each other node's pod. Reported: from
// the moment a watch on etcd sees node3's new lease to the first reply on the slowest of
// the four pings (every node's traffic flows, handshakes included), and the agent's start
// to that lease.
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
	var join, start time.Duration
	for range b.N {
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
		pings := []*pinger{
			startPingEvery(b, pod(n1), ip(n3), 2*time.Millisecond), startPingEvery(b, pod(n2), ip(n3), 2*time.Millisecond),
			startPingEvery(b, pod(n3), ip(n1), 2*time.Millisecond), startPingEvery(b, pod(n3), ip(n2), 2*time.Millisecond),
		}
		wctx, cancel := context.WithCancel(ctx)
		seen := make(chan time.Time, 1)
		w := cli.Watch(wctx, "/netagent/subnets/", clientv3.WithPrefix())
		go func() {
			for r := range w {
				for _, ev := range r.Events {
					if l, err := lease.Decode(ev.Kv.Value); ev.Type == clientv3.EventTypePut && err == nil && l.Node == n3.Name {
						seen <- time.Now()
						return
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
		join += last.Sub(leased)
		start += leased.Sub(t0)
		if err := l.WaitConverged(ctx, 10*time.Second); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(join.Microseconds())/1000/float64(b.N), "ms/lease-to-flow")
	b.ReportMetric(float64(start.Microseconds())/1000/float64(b.N), "ms/start-to-lease")
}

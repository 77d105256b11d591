package cluster_test

import (
	"context"
	"fmt"
	"math"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/lab"
	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

// BenchmarkThroughput compares pod-to-pod TCP throughput across nodes with node-to-node
// throughput over the underlay, in the same run, per backend (one iperf3 TCP stream, 5
// interleaved rounds of 2 s each); for hybrid it measures a directly routed peer and a
// VXLAN peer. Each IP family: ipv4 measures IPv4 pods over the IPv4 underlay; ipv6 IPv6
// pods over the IPv6 underlay (an IPv6-only lab: VXLAN runs over IPv6 too). The -routed
// cases wire the pods with the plugin's podInterface routed (no bridge).
//
//	go test -run '^$' -bench Throughput -benchtime 1x ./test/cluster
//	go test -run '^$' -bench 'Throughput/ipv6' -benchtime 1x ./test/cluster
func BenchmarkThroughput(b *testing.B) {
	netns.RequireRoot(b)
	bin := testbin.Build(b, "./cmd/netagent", "netagent")
	testbin.Build(b, "./cmd/netagent-etcd", "netagent-etcd")
	testbin.Build(b, "./cmd/cni-plugin", "netagent-cni")
	for _, family := range []string{"ipv4", "ipv6"} {
		b.Run(family, func(b *testing.B) { throughput(b, bin, family) })
	}
}

func throughput(b *testing.B, bin, family string) {
	const d, rounds = 2 * time.Second, 5
	addr := func(v4, v6 netip.Addr) string {
		if family == "ipv6" {
			return v6.String()
		}
		return v4.String()
	}
	for _, tc := range []struct {
		backend       string
		nodes, remote int
		podIface      string // the plugin's podInterface: bridge, or routed (no bridge)
	}{{"host-gw", 2, 0, "bridge"}, {"vxlan", 2, 0, "bridge"}, {"hybrid", 3, 1, "bridge"}, {"host-gw", 2, 0, "routed"}, {"vxlan", 2, 0, "routed"}} {
		name := tc.backend
		if tc.podIface != "bridge" {
			name += "-" + tc.podIface
		}
		b.Run(name, func(b *testing.B) {
			l, err := lab.Up(context.Background(), lab.Options{
				Prefix: fmt.Sprintf("%s%d-tput-%s%s%.1s-", netns.Prefix, os.Getpid(), family[3:], tc.backend[:2], tc.podIface), Dir: b.TempDir(),
				Nodes: tc.nodes, Remote: tc.remote, Backend: tc.backend, PodsPerNode: 1, IPFamily: family,
				Netagent: bin, CNIBinDir: testbin.Dir(), PodInterface: tc.podIface,
			})
			if err != nil {
				b.Fatal(err)
			}
			defer l.Down()
			pairs := []struct {
				name string
				a, z *lab.Node
			}{{"peer", l.Nodes[0], l.Nodes[1]}}
			if tc.backend == "hybrid" {
				pairs = []struct {
					name string
					a, z *lab.Node
				}{{"direct-peer", l.Nodes[0], l.Nodes[1]}, {"vxlan-peer", l.Nodes[0], l.Nodes[2]}}
			}
			for range b.N {
				for _, p := range pairs {
					under := netns.ServeIperf3(b, l.NodeNS(p.z), addr(p.z.IP, p.z.IP6), 5201)
					pods := netns.ServeIperf3(b, l.PodNS(p.z.Pods[0]), addr(p.z.Pods[0].IP, p.z.Pods[0].IP6), 5202)
					// Interleave underlay and pod rounds; the ratio uses the sums, and the
					// spread of the per-round ratios shows this machine's noise.
					var u, q float64
					lo, hi := math.Inf(1), 0.0
					for range rounds {
						x := under.From(b, l.NodeNS(p.a), d)
						y := pods.From(b, l.PodNS(p.a.Pods[0]), d)
						u, q = u+x, q+y
						lo, hi = min(lo, y/x), max(hi, y/x)
					}
					b.ReportMetric(q/u, p.name+"-pods/underlay")
					b.ReportMetric(lo, p.name+"-round-min")
					b.ReportMetric(hi, p.name+"-round-max")
					b.ReportMetric(q/rounds/1e9, p.name+"-pods-Gbit/s")
					b.ReportMetric(u/rounds/1e9, p.name+"-underlay-Gbit/s")
					under.Stop()
					pods.Stop()
				}
			}
		})
	}
}

package cluster_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/lab"
	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

// tcpThroughput sends for d from src to dst (an address in dstNS) over one TCP connection
// and returns bytes per second as the receiver counted them.
func tcpThroughput(b *testing.B, src, dstNS *netns.NS, dst string, d time.Duration) float64 {
	b.Helper()
	var ln net.Listener
	if err := dstNS.Do(func() error {
		var err error
		ln, err = net.Listen("tcp4", dst+":0")
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	got := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- 0
			return
		}
		n, _ := io.Copy(io.Discard, c)
		got <- n
	}()
	var conn net.Conn
	if err := src.Do(func() error {
		var err error
		conn, err = net.DialTimeout("tcp4", ln.Addr().String(), 3*time.Second)
		return err
	}); err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 256<<10)
	start := time.Now()
	for time.Since(start) < d {
		if _, err := conn.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	conn.Close()
	n := <-got
	return float64(n) / time.Since(start).Seconds()
}

// BenchmarkThroughput compares pod-to-pod TCP throughput across nodes with node-to-node
// throughput over the underlay, in the same run, per backend; for hybrid it measures a
// directly routed peer and a VXLAN peer.
//
//	go test -run '^$' -bench Throughput -benchtime 1x ./test/cluster
func BenchmarkThroughput(b *testing.B) {
	netns.RequireRoot(b)
	bin := testbin.Build(b, "./cmd/netagent", "netagent")
	testbin.Build(b, "./cmd/netagent-etcd", "netagent-etcd")
	testbin.Build(b, "./cmd/cni-plugin", "netagent-cni")
	const d = 2 * time.Second
	for _, tc := range []struct {
		backend       string
		nodes, remote int
	}{{"host-gw", 2, 0}, {"vxlan", 2, 0}, {"hybrid", 3, 1}} {
		b.Run(tc.backend, func(b *testing.B) {
			l, err := lab.Up(context.Background(), lab.Options{
				Prefix: fmt.Sprintf("%s%d-tput-%s-", netns.Prefix, os.Getpid(), tc.backend[:2]), Dir: b.TempDir(),
				Nodes: tc.nodes, Remote: tc.remote, Backend: tc.backend, PodsPerNode: 1,
				Netagent: bin, CNIBinDir: testbin.Dir(),
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
					// Interleave: underlay, pods, underlay, pods; the ratio uses the sums.
					var under, pods float64
					for range 2 {
						under += tcpThroughput(b, l.NodeNS(p.a), l.NodeNS(p.z), p.z.IP.String(), d)
						pods += tcpThroughput(b, l.PodNS(p.a.Pods[0]), l.PodNS(p.z.Pods[0]), p.z.Pods[0].IP.String(), d)
					}
					b.ReportMetric(pods/under, p.name+"-pods/underlay")
					b.ReportMetric(pods/2/1e9*8, p.name+"-pods-Gbit/s")
					b.ReportMetric(under/2/1e9*8, p.name+"-underlay-Gbit/s")
				}
			}
		})
	}
}

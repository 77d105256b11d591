package cluster_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/lab"
	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

// iperf3 measures with iperf3, the usual tool for this, as a separate client and server
// process: a Go loop in the test process puts both ends of the flow on one Go scheduler
// with two cores, and that scheduling latency, not the dataplane, then decides a share of
// the result (it gave 0.76-0.86 for host-gw where iperf3 gave 0.89-0.94 in the same lab).
type iperf3 struct {
	srv *exec.Cmd
	dst string
}

// serveIperf3 starts an iperf3 server on addr:port inside ns.
func serveIperf3(b *testing.B, ns *netns.NS, addr string, port int) *iperf3 {
	b.Helper()
	if _, err := exec.LookPath("iperf3"); err != nil {
		b.Fatal("iperf3 is not installed (scripts/deps.sh installs it, or apt-get install iperf3)")
	}
	srv := ns.Command(context.Background(), "iperf3", "-s", "-B", addr, "-p", strconv.Itoa(port))
	if err := srv.Start(); err != nil {
		b.Fatal(err)
	}
	s := &iperf3{srv: srv, dst: net.JoinHostPort(addr, strconv.Itoa(port))}
	b.Cleanup(s.stop) // on a failed run; stop is idempotent
	// Ready when it accepts connections.
	for deadline := time.Now().Add(5 * time.Second); ; {
		var c net.Conn
		err := ns.Do(func() error {
			var err error
			c, err = net.DialTimeout("tcp4", net.JoinHostPort(addr, strconv.Itoa(port)), time.Second)
			return err
		})
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("iperf3 server on %s:%d: %v", addr, port, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return s
}

func (s *iperf3) stop() {
	if s.srv.ProcessState == nil {
		_ = s.srv.Process.Kill()
		_ = s.srv.Wait()
	}
}

// from runs one TCP stream for d from ns and returns bits per second as the receiver
// counted them.
func (s *iperf3) from(b *testing.B, ns *netns.NS, d time.Duration) float64 {
	b.Helper()
	host, port, _ := net.SplitHostPort(s.dst)
	ctx, cancel := context.WithTimeout(context.Background(), d+30*time.Second)
	defer cancel()
	for attempt := 0; ; attempt++ {
		out, err := ns.Command(ctx, "iperf3", "-c", host, "-p", port, "-t", strconv.FormatFloat(d.Seconds(), 'f', -1, 64), "-J").Output()
		var r struct {
			End struct {
				SumReceived struct {
					BitsPerSecond float64 `json:"bits_per_second"`
				} `json:"sum_received"`
			} `json:"end"`
			Error string `json:"error"`
		}
		if jerr := json.Unmarshal(out, &r); jerr == nil && err == nil && r.End.SumReceived.BitsPerSecond > 0 {
			return r.End.SumReceived.BitsPerSecond
		}
		// The server takes one test at a time and can still be finishing the last one.
		if attempt < 3 && strings.Contains(r.Error, "busy") {
			time.Sleep(200 * time.Millisecond)
			continue
		}
		b.Fatalf("iperf3 -c %s: %v %s %s", s.dst, err, r.Error, bytes.TrimSpace(out))
	}
}

// BenchmarkThroughput compares pod-to-pod TCP throughput across nodes with node-to-node
// throughput over the underlay, in the same run, per backend (one iperf3 TCP stream, 5
// interleaved rounds of 2 s each); for hybrid it measures a directly routed peer and a
// VXLAN peer.
//
//	go test -run '^$' -bench Throughput -benchtime 1x ./test/cluster
func BenchmarkThroughput(b *testing.B) {
	netns.RequireRoot(b)
	bin := testbin.Build(b, "./cmd/netagent", "netagent")
	testbin.Build(b, "./cmd/netagent-etcd", "netagent-etcd")
	testbin.Build(b, "./cmd/cni-plugin", "netagent-cni")
	const d, rounds = 2 * time.Second, 5
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
					under := serveIperf3(b, l.NodeNS(p.z), p.z.IP.String(), 5201)
					pods := serveIperf3(b, l.PodNS(p.z.Pods[0]), p.z.Pods[0].IP.String(), 5202)
					// Interleave underlay and pod rounds; the ratio uses the sums, and the
					// spread of the per-round ratios shows this machine's noise.
					var u, q float64
					lo, hi := math.Inf(1), 0.0
					for range rounds {
						x := under.from(b, l.NodeNS(p.a), d)
						y := pods.from(b, l.PodNS(p.a.Pods[0]), d)
						u, q = u+x, q+y
						lo, hi = min(lo, y/x), max(hi, y/x)
					}
					b.ReportMetric(q/u, p.name+"-pods/underlay")
					b.ReportMetric(lo, p.name+"-round-min")
					b.ReportMetric(hi, p.name+"-round-max")
					b.ReportMetric(q/rounds/1e9, p.name+"-pods-Gbit/s")
					b.ReportMetric(u/rounds/1e9, p.name+"-underlay-Gbit/s")
					under.stop()
					pods.stop()
				}
			}
		})
	}
}

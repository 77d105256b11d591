package wireguard_test

import (
	"context"
	"fmt"
	"math"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/wireguard/device"
	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// BenchmarkThroughput: TCP throughput (one iperf3 stream) through two netagent-wireguard
// devices configured by pkg/wireguard, pod to pod and node to node, against a bare
// upstream wireguard-go tunnel between the same two node namespaces (the floor for the
// userspace implementation) and the plain underlay, 5 interleaved rounds of 2 s; ratios
// use the sums, the per-round spread shows the machine's noise.
//
//	go test -run '^$' -bench Throughput -benchtime 1x ./test/wireguard
func BenchmarkThroughput(b *testing.B) {
	a, z := newNodes(b)
	a.reconcile(z)
	z.reconcile(a)
	a.waitPing(z.podIP)
	bare := bareTunnel(b, a, z)
	const d, rounds = 2 * time.Second, 5
	paths := []struct {
		name     string
		from, to *netns.NS
		addr     string
	}{
		{"underlay", a.ns, z.ns, z.underlay.String()},
		{"bare-wireguard-go", a.ns, z.ns, bare},
		{"netagent-nodes", a.ns, z.ns, z.gw.String()}, // node to node through our device (source a.gw by route)
		{"netagent-pods", a.pod, z.pod, z.podIP.String()},
	}
	for range b.N {
		sum := make([]float64, len(paths))
		lo, hi := math.Inf(1), 0.0
		for range rounds {
			got := make([]float64, len(paths))
			for i, p := range paths {
				srv := netns.ServeIperf3(b, p.to, p.addr, 5201+i)
				got[i] = srv.From(b, p.from, d)
				srv.Stop()
				sum[i] += got[i]
			}
			lo, hi = min(lo, got[3]/got[1]), max(hi, got[3]/got[1])
		}
		for i, p := range paths {
			b.ReportMetric(sum[i]/rounds/1e9, p.name+"-Gbit/s")
		}
		b.ReportMetric(sum[3]/sum[1], "pods/bare")
		b.ReportMetric(lo, "pods/bare-round-min")
		b.ReportMetric(hi, "pods/bare-round-max")
		b.ReportMetric(sum[2]/sum[1], "nodes/bare")
		b.ReportMetric(sum[3]/sum[0], "pods/underlay")
		b.ReportMetric(sum[1]/sum[0], "bare/underlay")
	}
}

// bareTunnel runs upstream wireguard-go (its own main, foreground) in both node namespaces
// on port+1 with tunnel addresses 10.99.0.1 and .2, configured with wgctrl directly, and
// returns z's tunnel address.
func bareTunnel(b *testing.B, a, z *node) string {
	b.Helper()
	bin := testbin.Build(b, "golang.zx2c4.com/wireguard", "wireguard-go")
	var keys [2]wgtypes.Key
	var devs [2]string
	for i, n := range []*node{a, z} {
		devSeq++
		devs[i] = fmt.Sprintf("bwg%d-%d", os.Getpid()%1000000, devSeq)
		b.Cleanup(func() { _ = os.Remove(device.SocketPath(devs[i])) })
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			b.Fatal(err)
		}
		keys[i] = k
		cmd := n.ns.Command(context.Background(), bin, "-f", devs[i])
		cmd.Env = append(os.Environ(), "LOG_LEVEL=error")
		if err := n.ns.Start(cmd); err != nil {
			b.Fatal(err)
		}
		for deadline := time.Now().Add(5 * time.Second); !device.SocketLive(devs[i]); {
			if time.Now().After(deadline) {
				b.Fatalf("wireguard-go %s did not start", devs[i])
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	for i, n := range []*node{a, z} {
		o := 1 - i
		other := []*node{a, z}[o]
		p := port + 1
		_, allowed, _ := net.ParseCIDR(fmt.Sprintf("10.99.0.%d/32", o+1))
		if err := n.wg.ConfigureDevice(devs[i], wgtypes.Config{PrivateKey: &keys[i], ListenPort: &p, Peers: []wgtypes.PeerConfig{{
			PublicKey: keys[o].PublicKey(), Endpoint: &net.UDPAddr{IP: other.underlay.AsSlice(), Port: port + 1}, AllowedIPs: []net.IPNet{*allowed},
		}}}); err != nil {
			b.Fatal(err)
		}
		n.ns.MustRun(b, "ip", "link", "set", devs[i], "mtu", fmt.Sprint(mtu), "up")
		n.ns.MustRun(b, "ip", "addr", "add", fmt.Sprintf("10.99.0.%d/24", i+1), "dev", devs[i])
	}
	pingUntil(b, a.ns, netip.MustParseAddr("10.99.0.2"))
	return "10.99.0.2"
}

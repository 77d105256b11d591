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
	"golang.zx2c4.com/wireguard/wgctrl"
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
	bare := bareTunnel(b, tunnelEnd{a.ns, a.underlay}, tunnelEnd{z.ns, z.underlay})
	throughput(b, []iperfPath{
		{"underlay", a.ns, z.ns, z.underlay.String()},
		{"bare-wireguard-go", a.ns, z.ns, bare},
		{"netagent-nodes", a.ns, z.ns, z.gw.String()}, // node to node through our device (source a.gw by route)
		{"netagent-pods", a.pod, z.pod, z.podIP.String()},
	}, []ratio{{"pods/bare", 3, 1}, {"nodes/bare", 2, 1}, {"pods/underlay", 3, 0}, {"bare/underlay", 1, 0}})
}

// iperfPath is one path an iperf3 stream is measured on.
type iperfPath struct {
	name     string
	from, to *netns.NS
	addr     string
}

// ratio is a reported ratio of two paths' throughput (indexes into the paths).
type ratio struct {
	name     string
	num, den int
}

// throughput measures one iperf3 TCP stream on each path, 5 interleaved rounds of 2 s, and
// reports each path's mean and the ratios of the sums; for the first ratio also its
// smallest and largest per-round value (the machine's noise).
func throughput(b *testing.B, paths []iperfPath, ratios []ratio) {
	b.Helper()
	const d, rounds = 2 * time.Second, 5
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
			r := ratios[0]
			lo, hi = min(lo, got[r.num]/got[r.den]), max(hi, got[r.num]/got[r.den])
		}
		for i, p := range paths {
			b.ReportMetric(sum[i]/rounds/1e9, p.name+"-Gbit/s")
		}
		for _, r := range ratios {
			b.ReportMetric(sum[r.num]/sum[r.den], r.name)
		}
		b.ReportMetric(lo, ratios[0].name+"-round-min")
		b.ReportMetric(hi, ratios[0].name+"-round-max")
	}
}

// tunnelEnd is a namespace a bare tunnel ends in, and its underlay address.
type tunnelEnd struct {
	ns       *netns.NS
	underlay netip.Addr
}

// bareTunnel runs upstream wireguard-go (its own main, foreground) in both namespaces on
// port+1 with tunnel addresses 10.99.0.1 and .2, configured with wgctrl directly, and
// returns z's tunnel address.
func bareTunnel(b *testing.B, a, z tunnelEnd) string {
	b.Helper()
	bin := testbin.Build(b, "golang.zx2c4.com/wireguard", "wireguard-go")
	wg, err := wgctrl.New() // userspace devices: reached through the socket directory
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { wg.Close() })
	ends := []tunnelEnd{a, z}
	var keys [2]wgtypes.Key
	var devs [2]string
	for i, n := range ends {
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
	for i, n := range ends {
		o := 1 - i
		p := port + 1
		_, allowed, _ := net.ParseCIDR(fmt.Sprintf("10.99.0.%d/32", o+1))
		if err := wg.ConfigureDevice(devs[i], wgtypes.Config{PrivateKey: &keys[i], ListenPort: &p, Peers: []wgtypes.PeerConfig{{
			PublicKey: keys[o].PublicKey(), Endpoint: &net.UDPAddr{IP: ends[o].underlay.AsSlice(), Port: port + 1}, AllowedIPs: []net.IPNet{*allowed},
		}}}); err != nil {
			b.Fatal(err)
		}
		n.ns.MustRun(b, "ip", "link", "set", devs[i], "mtu", fmt.Sprint(mtu), "up")
		n.ns.MustRun(b, "ip", "addr", "add", fmt.Sprintf("10.99.0.%d/24", i+1), "dev", devs[i])
	}
	pingUntil(b, a.ns, netip.MustParseAddr("10.99.0.2"))
	return "10.99.0.2"
}

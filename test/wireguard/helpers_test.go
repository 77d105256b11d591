// Package wireguard_test proves pkg/wireguard and netagent-wireguard in network namespaces:
// two nodes on a documentation-range underlay (192.0.2.0/24), each with a pod namespace
// behind a veth, their pod subnets routed through a userspace WireGuard device that
// pkg/wireguard configures. The routes stand in for the route reconciler (proto 180, like
// every netagent route), which is not wired to WireGuard yet.
package wireguard_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/netipx"
	"github.com/netagent/netagent/pkg/wgguard"
	"github.com/netagent/netagent/pkg/wireguard"
	"github.com/netagent/netagent/pkg/wireguard/device"
	"github.com/netagent/netagent/pkg/wireguard/key"
	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		os.Exit(helperMain())
	}
	netns.Sweep()
	code := m.Run()
	testbin.Cleanup()
	os.Exit(code)
}

const (
	port    = 51820
	mtu     = 1500 - 60 // the veth underlay's MTU minus wireguard.Overhead(false)
	network = "10.244.0.0/16"
	rtProto = 180 // netagent's route protocol
)

// node is one node namespace with a pod namespace behind it and its WireGuard device.
type node struct {
	t         testing.TB
	idx       int
	ns, pod   *netns.NS
	dev       string // the WireGuard interface; unique per test process (sockets share one dir)
	underlay  netip.Addr
	subnet    netip.Prefix
	gw, podIP netip.Addr
	keyDir    string
	psk       *wgtypes.Key   // the cluster's pre-shared key, if any
	endpoint  netip.AddrPort // where peers send to reach its device (zero: underlay:port)
	daemon    *device.Daemon
	h         *netlink.Handle
	wg        *wgctrl.Client
	rec       *wireguard.Reconciler
}

var devSeq int

// newNodes builds count nodes on one underlay (veths to a bridge namespace would be needed
// for more than two; two are enough here).
func newNodes(t testing.TB) (*node, *node) {
	t.Helper()
	netns.RequireRoot(t)
	bin := testbin.Build(t, "./cmd/netagent-wireguard", "netagent-wireguard")
	var ns [2]*node
	for i := range ns {
		ns[i] = newNode(t, i+1, bin)
	}
	if err := netns.Veth(ns[0].ns, "eth0", ns[1].ns, "eth0"); err != nil {
		t.Fatal(err)
	}
	for _, n := range ns {
		if err := n.ns.AddrAdd("eth0", n.underlay.String()+"/24"); err != nil {
			t.Fatal(err)
		}
	}
	return ns[0], ns[1]
}

func newNode(t testing.TB, i int, bin string) *node {
	t.Helper()
	devSeq++
	n := &node{
		t:        t,
		idx:      i,
		dev:      fmt.Sprintf("nwg%d-%d", os.Getpid()%1000000, devSeq),
		underlay: netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}),
		subnet:   netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i), 0}), 24),
		gw:       netip.AddrFrom4([4]byte{10, 244, byte(i), 1}),
		podIP:    netip.AddrFrom4([4]byte{10, 244, byte(i), 2}),
		keyDir:   filepath.Join(t.TempDir(), "state"),
	}
	// Runs after the namespace is gone (cleanups run last-in first-out): a daemon killed
	// with the namespace cannot remove its socket file.
	t.Cleanup(func() { _ = os.Remove(device.SocketPath(n.dev)) })
	n.ns = netns.New(t, fmt.Sprintf("wgn%d", i))
	n.pod = netns.New(t, fmt.Sprintf("wgp%d", i))
	for _, s := range []*netns.NS{n.ns, n.pod} {
		// No IPv6: the capture then sees only what the tunnel and ARP send.
		s.MustRun(t, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
	}
	n.ns.MustRun(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	if err := netns.Veth(n.ns, "pod0", n.pod, "eth0"); err != nil {
		t.Fatal(err)
	}
	if err := n.ns.AddrAdd("pod0", n.gw.String()+"/24"); err != nil {
		t.Fatal(err)
	}
	if err := n.pod.AddrAdd("eth0", n.podIP.String()+"/24"); err != nil {
		t.Fatal(err)
	}
	n.pod.MustRun(t, "ip", "route", "add", "default", "via", n.gw.String())
	h, err := n.ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	n.h = h
	// wgctrl's kernel client binds its generic netlink socket to the namespace it is opened
	// in, so open it in the node's (the userspace client only uses the socket directory).
	if err := n.ns.Do(func() error {
		var err error
		n.wg, err = wgctrl.New()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.wg.Close() })
	n.daemon = &device.Daemon{Binary: bin, Name: n.dev, MTU: mtu, NetNS: n.ns.Path, LogPath: filepath.Join(t.TempDir(), "daemon.log")}
	n.rec = &wireguard.Reconciler{Client: n.wg, Links: h, Device: n.daemon}
	if os.Getenv("WGDEBUG") != "" { // the reconcilers' handshake follow-ups, on stderr
		n.rec.Log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("node", n.dev)
	}
	// The agent's record of handshake messages (without its drop rule: tests here send
	// unencrypted pod traffic on purpose).
	if err := n.ns.Do(func() error {
		g, err := wgguard.New()
		if err == nil {
			err = g.Set(wgguard.Spec{Underlay: "eth0", Port: port})
		}
		n.rec.Handshakes = g
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(n.daemon.LogPath)
			t.Logf("%s daemon log:\n%s", n.dev, b)
		}
	})
	return n
}

// publicKey is what the node would publish in its lease.
func (n *node) publicKey() string {
	n.t.Helper()
	k, _, err := key.LoadOrCreate(n.keyDir)
	if err != nil {
		n.t.Fatal(err)
	}
	return k.PublicKey().String()
}

// desired is the state the plan would compute for n, peers read as the store shows them.
func desired(n *node, peers ...*node) (wireguard.Config, error) {
	priv, _, err := key.LoadOrCreate(n.keyDir)
	if err != nil {
		return wireguard.Config{}, err
	}
	var specs []wireguard.PeerSpec
	for _, p := range peers {
		pk, _, err := key.LoadOrCreate(p.keyDir)
		if err != nil {
			return wireguard.Config{}, err
		}
		ep := p.endpoint
		if !ep.IsValid() {
			ep = netip.AddrPortFrom(p.underlay, port)
		}
		specs = append(specs, wireguard.PeerSpec{
			Node:       fmt.Sprintf("node%d", p.idx),
			PublicKey:  pk.PublicKey().String(),
			Endpoint:   ep.String(),
			AllowedIPs: []string{p.subnet.String()},
		})
	}
	ps, err := wireguard.Peers(wireguard.Self{PublicKey: priv.PublicKey(), Network: netip.MustParsePrefix(network), Subnet: n.subnet}, specs)
	if err != nil {
		return wireguard.Config{}, err
	}
	return wireguard.Config{Name: n.dev, PrivateKey: priv, ListenPort: port, MTU: mtu, PresharedKey: n.psk, Peers: ps}, nil
}

// reconcile runs one pass for n and puts the routes to the peers' subnets on the device.
func (n *node) reconcile(peers ...*node) wireguard.Changes {
	n.t.Helper()
	c, err := desired(n, peers...)
	if err != nil {
		n.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ch, err := n.rec.Set(ctx, c)
	if err != nil {
		n.t.Fatalf("%s: Set: %v", n.dev, err)
	}
	n.routes(peers...)
	return ch
}

// routes stands in for the route reconciler: each peer subnet via the device, from our
// gateway address (a source inside our own subnet, the only one the peer's allowed IPs for
// us accept, so that node-originated traffic works too).
func (n *node) routes(peers ...*node) {
	n.t.Helper()
	l, err := n.h.LinkByName(n.dev)
	if err != nil {
		n.t.Fatal(err)
	}
	for _, p := range peers {
		r := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: netipx.IPNet(p.subnet), Src: n.gw.AsSlice(), Protocol: rtProto, Scope: netlink.SCOPE_LINK}
		if err := n.h.RouteReplace(r); err != nil {
			n.t.Fatalf("%s: route %s dev %s: %v", n.ns.Name, p.subnet, n.dev, err)
		}
	}
}

// device reads the device back.
func (n *node) device() *wgtypes.Device {
	n.t.Helper()
	d, err := n.wg.Device(n.dev)
	if err != nil {
		n.t.Fatal(err)
	}
	return d
}

// waitPing pings dst from the pod until a reply comes (the first packet starts a handshake).
func (n *node) waitPing(dst netip.Addr) {
	n.t.Helper()
	pingUntil(n.t, n.pod, dst)
}

func pingUntil(t testing.TB, from *netns.NS, dst netip.Addr) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := from.Run("ping", "-c", "1", "-W", "1", dst.String())
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("ping %s from %s: %v", dst, from.Name, err)
		}
	}
}

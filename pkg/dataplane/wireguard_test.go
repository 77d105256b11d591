package dataplane

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/pkg/wireguard/device"
	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

// TestWireGuardPrune: a dual-stack node with the wireguard backend has its device with an
// address of each family, routes of both families through it, the peer with both subnets
// as allowed IPs and the underlay guard for both. When
// its backend changes from wireguard to vxlan (config set, in the same run or across an
// agent restart) it is left with no WireGuard device, no daemon answering on its socket, no
// socket file and no underlay guard table, and its routes move to the VXLAN device; a link
// of the device's name that is not WireGuard stays.
func TestWireGuardPrune(t *testing.T) {
	netns.RequireRoot(t)
	bin := testbin.Build(t, "./cmd/netagent-wireguard", "netagent-wireguard")
	t.Cleanup(testbin.Cleanup)
	peerKey, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	for i, tt := range []struct {
		name    string
		restart bool // a new dataplane (an agent restart) gets the vxlan plan
	}{
		{"same run", false},
		{"after a restart", true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dev := fmt.Sprintf("nadp%d-%d", os.Getpid()%100000, i)
			t.Cleanup(func() { _ = os.Remove(device.SocketPath(dev)) }) // after the namespace
			n := netns.New(t, "dpwg")
			n.MustRun(t, "ip", "link", "add", "eth0", "type", "bridge")
			n.MustRun(t, "ip", "addr", "add", "192.0.2.11/24", "dev", "eth0")
			n.MustRun(t, "ip", "link", "set", "eth0", "up")
			log := slog.New(slog.NewTextHandler(t.Output(), nil))
			opt := WireGuardOptions{KeyDir: t.TempDir(), Impl: "userspace", Daemon: bin, Device: dev}
			open := func() *Linux {
				t.Helper()
				var d *Linux
				if err := n.Do(func() (err error) {
					d, err = New(log, nsIPTables{n})
					return err
				}); err != nil {
					t.Fatal(err)
				}
				d.UseWireGuard(opt)
				return d
			}
			set := func(d *Linux, p plan.Plan) (Stats, error) {
				// In the namespace: the daemon is started from here and inherits it.
				var st Stats
				var setErr error
				err := n.Do(func() error { st, setErr = d.Set(t.Context(), p); return nil })
				return st, errors.Join(err, setErr)
			}
			input := func(backend string) plan.Input {
				v6 := `,"ipv6Network":"fd00:10:244::/48"` // wireguard's dual stack is what matters here
				if backend != config.WireGuard {
					v6 = ""
				}
				cfg, err := config.Parse([]byte(`{"network":"10.244.0.0/16"` + v6 + `,"backend":{"type":"` + backend + `"}}`))
				if err != nil {
					t.Fatal(err)
				}
				p2 := peer("n2", "10.244.2.0/24", "198.51.100.12")
				p2.WGPublicKey, p2.WGPort = peerKey.PublicKey().String(), 51820
				p2.Subnet6 = netip.MustParsePrefix("fd00:10:244:2::/64")
				self := peer("n1", "10.244.1.0/24", "192.0.2.11")
				self.Subnet6 = netip.MustParsePrefix("fd00:10:244:1::/64")
				return plan.Input{Config: cfg, Self: self, WGDev: dev,
					Underlay: plan.Underlay{Dev: "eth0", MTU: 1500, Connected: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}},
					Peers:    refs(p2)}
			}
			routes := func() string {
				return n.MustRun(t, "ip", "route", "show", "proto", "180") + n.MustRun(t, "ip", "-6", "route", "show", "proto", "180")
			}

			d := open()
			_, wg := plan.NewPlanner(input("wireguard"))
			if _, err := set(d, wg); err != nil {
				t.Fatalf("wireguard plan: %v", err)
			}
			if got := n.MustRun(t, "ip", "-d", "link", "show", dev); !strings.Contains(got, "tun") {
				t.Fatalf("wireguard plan: %s is not a TUN device:\n%s", dev, got)
			}
			if !device.SocketLive(dev) {
				t.Fatalf("wireguard plan: no daemon answers on %s", device.SocketPath(dev))
			}
			n.MustRun(t, "nft", "list", "table", "ip", "netagent-wg")
			if got := n.MustRun(t, "nft", "list", "table", "ip6", "netagent-wg"); !strings.Contains(got, `iifname "eth0" ip6 daddr fd00:10:244::/48 counter`) {
				t.Errorf("wireguard plan: the IPv6 underlay guard:\n%s", got)
			}
			if got := routes(); !strings.Contains(got, "10.244.2.0/24 dev "+dev) || !strings.Contains(got, "fd00:10:244:2::/64 dev "+dev) {
				t.Fatalf("wireguard plan: no route of each family through %s:\n%s", dev, got)
			}
			if got := n.MustRun(t, "ip", "addr", "show", "dev", dev); !strings.Contains(got, "inet 10.244.1.0/32") || !strings.Contains(got, "inet6 fd00:10:244:1::/128") {
				t.Errorf("wireguard plan: the device's addresses:\n%s", got)
			}
			if got := allowedIPs(t, dev); got != "10.244.2.0/24 fd00:10:244:2::/64" {
				t.Errorf("wireguard plan: the peer's allowed IPs %q, want both its subnets", got)
			}

			if tt.restart {
				d = open() // the old one is dropped as a killed agent's would be
			}
			_, vx := plan.NewPlanner(input("vxlan"))
			st, err := set(d, vx)
			if err != nil {
				t.Fatalf("vxlan plan: %v", err)
			}
			if !st.WireGuard.Pruned {
				t.Errorf("vxlan plan: stats %+v, want the WireGuard device pruned", st.WireGuard)
			}
			if out, err := n.Run("ip", "link", "show", dev); err == nil {
				t.Errorf("vxlan plan: %s still there:\n%s", dev, out)
			}
			if device.SocketLive(dev) {
				t.Errorf("vxlan plan: a daemon still answers on %s", device.SocketPath(dev))
			}
			if _, err := os.Stat(device.SocketPath(dev)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("vxlan plan: socket file %s: %v, want it gone", device.SocketPath(dev), err)
			}
			for _, family := range []string{"ip", "ip6"} {
				if out, err := n.Run("nft", "list", "table", family, "netagent-wg"); err == nil {
					t.Errorf("vxlan plan: the %s underlay guard table is still there:\n%s", family, out)
				}
			}
			if got := routes(); !strings.Contains(got, "10.244.2.0/24 via 10.244.2.0 dev netagent.1 onlink") || strings.Contains(got, dev) {
				t.Errorf("vxlan plan: routes, want n2's through netagent.1 only:\n%s", got)
			}
			if st, err := set(d, vx); err != nil || st.WireGuard.Pruned {
				t.Errorf("vxlan plan again: %+v, %v; want nothing pruned", st.WireGuard, err)
			}

			// A link of the device's name that is not WireGuard is not netagent's.
			n.MustRun(t, "ip", "link", "add", dev, "type", "bridge")
			if st, err := set(d, vx); err != nil || st.WireGuard.Pruned {
				t.Errorf("vxlan plan with a bridge %s: %+v, %v; want it left alone", dev, st.WireGuard, err)
			}
			n.MustRun(t, "ip", "link", "show", dev)
		})
	}
}

// TestDeltaWithoutVXLAN: on a node whose plan has no VXLAN device (host-gw, wireguard), a
// lease event is applied as the delta it is: the new peer's route (and WireGuard peer) in
// one step, not refused as stale. It was refused because the VXLAN mirror, with no device
// to mirror, never became valid: every lease event became a full pass, which on a
// wireguard node re-read the device and set its peer again before adding the route.
func TestDeltaWithoutVXLAN(t *testing.T) {
	netns.RequireRoot(t)
	bin := testbin.Build(t, "./cmd/netagent-wireguard", "netagent-wireguard")
	t.Cleanup(testbin.Cleanup)
	for i, backend := range []string{"host-gw", "wireguard"} {
		t.Run(backend, func(t *testing.T) {
			dev := fmt.Sprintf("nadd%d-%d", os.Getpid()%100000, i)
			n, open, _ := wgNode(t, "dpdelta", WireGuardOptions{KeyDir: t.TempDir(), Impl: "userspace", Daemon: bin, Device: dev})
			d := open()
			cfg, err := config.Parse([]byte(`{"network":"10.244.0.0/16","backend":{"type":"` + backend + `"}}`))
			if err != nil {
				t.Fatal(err)
			}
			leaseOf := func(node, subnet, ip string) lease.Lease {
				l := peer(node, subnet, ip)
				if backend == "wireguard" {
					k, err := wgtypes.GeneratePrivateKey()
					if err != nil {
						t.Fatal(err)
					}
					l.WGPublicKey, l.WGPort, l.VTEPMAC = k.PublicKey().String(), 51820, ""
				}
				return l
			}
			set := func(p plan.Plan) error {
				var setErr error
				err := n.Do(func() error { _, setErr = d.Set(t.Context(), p); return nil })
				return errors.Join(err, setErr)
			}
			planner, full := plan.NewPlanner(plan.Input{Config: cfg, Self: peer("n1", "10.244.1.0/24", "192.0.2.11"), WGDev: dev,
				Underlay: plan.Underlay{Dev: "eth0", MTU: 1500, Connected: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}},
				Peers:    refs(leaseOf("n2", "10.244.2.0/24", "192.0.2.12"))})
			if full.VXLAN != nil {
				t.Fatalf("%s plan with a VXLAN device", backend)
			}
			if err := set(full); err != nil {
				t.Fatalf("full plan: %v", err)
			}
			next := planner.Update(refs(leaseOf("n3", "10.244.3.0/24", "192.0.2.13")))
			if next.Delta == nil || len(next.Delta.Routes) != 1 {
				t.Fatalf("n3's lease: plan %+v, want a delta with its route", next.Delta)
			}
			if err := set(next); err != nil {
				t.Fatalf("n3's lease as a delta: %v", err)
			}
			if got := n.MustRun(t, "ip", "route", "show", "proto", "180"); !strings.Contains(got, "10.244.3.0/24") {
				t.Errorf("n3's lease as a delta: no route to its subnet:\n%s", got)
			}
		})
	}
}

// wgNode is a namespace with an underlay (eth0, 192.0.2.11/24) and a function making a
// dataplane in it with WireGuard options o (one per call: a restart). The daemon outlives
// the test (it goes with the namespace) and logs its exit, so the dataplanes log to a
// buffer, shown if the test failed.
func wgNode(t *testing.T, name string, o WireGuardOptions) (*netns.NS, func() *Linux, *lockedBuffer) {
	t.Helper()
	t.Cleanup(func() { _ = os.Remove(device.SocketPath(o.Device)) }) // after the namespace
	n := netns.New(t, name)
	n.MustRun(t, "ip", "link", "add", "eth0", "type", "bridge")
	n.MustRun(t, "ip", "addr", "add", "192.0.2.11/24", "dev", "eth0")
	n.MustRun(t, "ip", "link", "set", "eth0", "up")
	logs := &lockedBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(logs.String())
		}
	})
	open := func() *Linux {
		t.Helper()
		var d *Linux
		if err := n.Do(func() (err error) {
			d, err = New(slog.New(slog.NewTextHandler(logs, nil)), nsIPTables{n})
			return err
		}); err != nil {
			t.Fatal(err)
		}
		d.UseWireGuard(o)
		return d
	}
	return n, open, logs
}

// lockedBuffer is a log destination that stays valid after its test ended.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestPrepareWireGuard: the device made ahead of the first Set (a new node's daemon
// started while its lease is acquired) is the one that Set then configures, not a second
// daemon; and on a restart, preparing an existing device leaves its peers alone.
func TestPrepareWireGuard(t *testing.T) {
	netns.RequireRoot(t)
	bin := testbin.Build(t, "./cmd/netagent-wireguard", "netagent-wireguard")
	t.Cleanup(testbin.Cleanup)
	dev := fmt.Sprintf("naprep%d", os.Getpid()%100000)
	// The state directory does not exist yet, as on a new node.
	n, open, logs := wgNode(t, "dpprep", WireGuardOptions{KeyDir: filepath.Join(t.TempDir(), "state"), Impl: "userspace", Daemon: bin, Device: dev})
	cfg, err := config.Parse([]byte(`{"network":"10.244.0.0/16","backend":{"type":"wireguard"}}`))
	if err != nil {
		t.Fatal(err)
	}
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	p2 := peer("n2", "10.244.2.0/24", "192.0.2.12")
	p2.WGPublicKey, p2.WGPort, p2.VTEPMAC = k.PublicKey().String(), 51820, ""
	in := plan.Input{Config: cfg, Self: peer("n1", "10.244.1.0/24", "192.0.2.11"), WGDev: dev,
		Underlay: plan.Underlay{Dev: "eth0", MTU: 1500, Connected: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}}}
	early := plan.Build(plan.Input{Config: in.Config, WGDev: dev, Underlay: in.Underlay}) // no lease yet
	prepare := func(d *Linux) {
		t.Helper()
		if err := n.Do(func() error { d.PrepareWireGuard(t.Context(), early.WireGuard); return nil }); err != nil {
			t.Fatal(err)
		}
		if !device.SocketLive(dev) {
			t.Fatalf("no daemon answers on %s after PrepareWireGuard", device.SocketPath(dev))
		}
	}
	wg, err := wgctrl.New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { wg.Close() })
	peers := func() string {
		got, err := wg.Device(dev)
		if err != nil {
			return err.Error()
		}
		return fmt.Sprint(got.Peers)
	}

	d := open()
	prepare(d)
	in.Peers = refs(p2)
	var st Stats
	if err := n.Do(func() (err error) { st, err = d.Set(t.Context(), plan.Build(in)); return err }); err != nil {
		t.Fatalf("first Set: %v", err)
	}
	if st.WireGuard.Created || !slices.Contains(st.WireGuard.Added, "n2") {
		t.Errorf("first Set after PrepareWireGuard: %s; want n2 added to the prepared device, none created", st.WireGuard)
	}
	if got := strings.Count(logs.String(), `msg="wireguard daemon started"`); got != 1 {
		t.Errorf("%d daemons started, want 1", got)
	}
	// A restart: the device and its peer exist; preparing them changes nothing.
	d = open()
	prepare(d)
	if got := peers(); !strings.Contains(got, k.PublicKey().String()) {
		t.Errorf("after a restart's PrepareWireGuard, peers %q; want n2's kept", got)
	}
}

// allowedIPs are the allowed IPs of the one peer of userspace device dev (reached through
// the socket directory, from any namespace).
func allowedIPs(t *testing.T, dev string) string {
	t.Helper()
	c, err := wgctrl.New()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	d, err := c.Device(dev)
	if err != nil || len(d.Peers) != 1 {
		t.Fatalf("device %s: %v, %+v", dev, err, d)
	}
	var out []string
	for _, n := range d.Peers[0].AllowedIPs {
		out = append(out, n.String())
	}
	return strings.Join(out, " ")
}

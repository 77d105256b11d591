package vxlan

import (
	"bytes"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/test/netns"
)

func TestSyncTransitions(t *testing.T) {
	netns.RequireRoot(t)
	n := netns.New(t, "vxlan")
	n.MustRun(t, "ip", "link", "add", "eth0", "type", "bridge")
	n.MustRun(t, "ip", "addr", "add", "192.0.2.1/24", "dev", "eth0")
	n.MustRun(t, "ip", "link", "set", "eth0", "up")
	h, err := n.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	var logs bytes.Buffer
	r := New(h, slog.New(slog.NewTextHandler(&logs, nil)))
	mac := plan.VTEPMAC("self")
	dev := &plan.VXLANDevice{Name: "na.1", VNI: 1, Port: 8472, Underlay: "eth0", Local: netip.MustParseAddr("192.0.2.1"), Addr: netip.MustParsePrefix("10.244.1.0/32"), MAC: mac.String(), MTU: 1450}
	macB, macC := plan.VTEPMAC("b").String(), plan.VTEPMAC("c").String()
	neighs := []plan.Neigh{{IP: netip.MustParseAddr("10.244.2.0"), MAC: macB}, {IP: netip.MustParseAddr("10.244.3.0"), MAC: macC}}
	fdb := []plan.FDB{{MAC: macB, Dst: netip.MustParseAddr("192.0.2.2")}, {MAC: macC, Dst: netip.MustParseAddr("198.51.100.3")}}

	check := func(step string, wantStats Stats, gotStats Stats, wantFDB, wantNeigh []string) {
		t.Helper()
		if gotStats != wantStats {
			t.Errorf("%s: stats %+v, want %+v", step, gotStats, wantStats)
		}
		f := n.MustRun(t, "bridge", "fdb", "show", "dev", "na.1")
		for _, w := range wantFDB {
			if !strings.Contains(f, w) {
				t.Errorf("%s: fdb lacks %q:\n%s", step, w, f)
			}
		}
		if got := strings.Count(strings.TrimSpace(f), "\n") + 1; strings.TrimSpace(f) != "" && got != len(wantFDB) {
			t.Errorf("%s: %d fdb entries, want %d:\n%s", step, got, len(wantFDB), f)
		}
		nb := n.MustRun(t, "ip", "neigh", "show", "dev", "na.1")
		for _, w := range wantNeigh {
			if !strings.Contains(nb, w) {
				t.Errorf("%s: neighbours lack %q:\n%s", step, w, nb)
			}
		}
		link := n.MustRun(t, "ip", "-d", "link", "show", "na.1")
		for _, w := range []string{mac.String(), "vxlan id 1", "dstport 8472", "nolearning", "mtu 1450", "UP"} {
			if !strings.Contains(link, w) {
				t.Errorf("%s: device lacks %q:\n%s", step, w, link)
			}
		}
	}
	fdbLines := []string{macB + " dst 192.0.2.2 self permanent", macC + " dst 198.51.100.3 self permanent"}
	neighLines := []string{"10.244.2.0 lladdr " + macB + " PERMANENT", "10.244.3.0 lladdr " + macC + " PERMANENT"}

	st, err := r.Sync(dev, "na.1", neighs, fdb)
	if err != nil {
		t.Fatal(err)
	}
	check("create", Stats{DeviceCreated: true, NeighSet: 2, FDBSet: 2}, st, fdbLines, neighLines)
	if a := n.MustRun(t, "ip", "-br", "addr", "show", "na.1"); !strings.Contains(a, "10.244.1.0/32") {
		t.Errorf("device address: %s", a)
	}

	st, err = r.Sync(dev, "na.1", neighs, fdb)
	check("again", Stats{}, st, fdbLines, neighLines)

	n.MustRun(t, "bridge", "fdb", "del", macC, "dev", "na.1", "dst", "198.51.100.3", "self")
	n.MustRun(t, "ip", "neigh", "del", "10.244.2.0", "dev", "na.1")
	st, err = r.Sync(dev, "na.1", neighs, fdb)
	if err != nil {
		t.Fatal(err)
	}
	check("repair entries", Stats{NeighSet: 1, FDBSet: 1}, st, fdbLines, neighLines)

	n.MustRun(t, "ip", "link", "del", "na.1")
	st, err = r.Sync(dev, "na.1", neighs, fdb)
	if err != nil {
		t.Fatal(err)
	}
	check("device re-created with the same MAC", Stats{DeviceCreated: true, NeighSet: 2, FDBSet: 2}, st, fdbLines, neighLines)

	n.MustRun(t, "ip", "link", "set", "na.1", "address", "02:00:00:00:00:01")
	n.MustRun(t, "ip", "link", "set", "na.1", "down")
	st, err = r.Sync(dev, "na.1", neighs, fdb)
	if err != nil {
		t.Fatal(err)
	}
	// Setting the link down flushes its neighbour entries; the next Sync restores them.
	check("mac and state repaired", Stats{DeviceFixed: 2, NeighSet: 2}, st, fdbLines, neighLines)

	logs.Reset()
	n.MustRun(t, "ip", "link", "set", "na.1", "mtu", "1400")
	st, err = r.Sync(dev, "na.1", neighs, fdb)
	if err != nil {
		t.Fatal(err)
	}
	check("mtu repaired", Stats{DeviceFixed: 1}, st, fdbLines, neighLines)
	if !strings.Contains(logs.String(), `msg="vxlan device repaired" dev=na.1 attr=mtu from=1400 to=1450`) {
		t.Errorf("mtu repair not logged:\n%s", logs.String())
	}

	st, err = r.Sync(dev, "na.1", neighs[:1], fdb[:1])
	if err != nil {
		t.Fatal(err)
	}
	check("peer c leaves", Stats{NeighDel: 1, FDBDel: 1}, st, fdbLines[:1], neighLines[:1])

	moved := []plan.FDB{{MAC: macB, Dst: netip.MustParseAddr("192.0.2.22")}}
	st, err = r.Sync(dev, "na.1", neighs[:1], moved)
	if err != nil {
		t.Fatal(err)
	}
	if f := n.MustRun(t, "bridge", "fdb", "show", "dev", "na.1"); !strings.Contains(f, "dst 192.0.2.22") || strings.Contains(f, "dst 192.0.2.2 ") {
		t.Errorf("peer b moved: fdb\n%s", f)
	}

	dev2 := *dev
	dev2.VNI = 7
	st, err = r.Sync(&dev2, "na.1", nil, nil)
	if err != nil || !st.DeviceCreated {
		t.Fatalf("VNI change: %+v, %v; want a re-created device", st, err)
	}
	if l := n.MustRun(t, "ip", "-d", "link", "show", "na.1"); !strings.Contains(l, "vxlan id 7") {
		t.Errorf("VNI not applied:\n%s", l)
	}
	if _, err := r.Sync(nil, "na.1", nil, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := n.Run("ip", "link", "show", "na.1"); err == nil {
		t.Error("device still present after Sync(nil)")
	}
}

func TestMirrorEntries(t *testing.T) {
	mac := planMAC("0A:58:0A:F4:06:01")
	if net.HardwareAddr(mac[:]).String() != "0a:58:0a:f4:06:01" {
		t.Fatalf("planMAC: %v", net.HardwareAddr(mac[:]))
	}
	n := netlink.Neigh{State: netlink.NUD_PERMANENT, HardwareAddr: net.HardwareAddr(mac[:])}
	e := toEntry(n)
	if !e.permanentWith(mac) {
		t.Fatalf("entry %+v should be permanent with %v", e, mac)
	}
	if e.permanentWith(planMAC("0a:58:0a:f4:06:02")) {
		t.Fatal("another MAC must not match")
	}
	if toEntry(netlink.Neigh{State: netlink.NUD_REACHABLE, HardwareAddr: n.HardwareAddr}).permanentWith(mac) {
		t.Fatal("a learned entry must not count as ours")
	}
	if toEntry(netlink.Neigh{State: netlink.NUD_PERMANENT}).permanentWith([6]byte{}) {
		t.Fatal("an entry without a MAC must not match the zero MAC")
	}
	k, ok := fdbKeyOf(n.HardwareAddr, net.ParseIP("192.0.2.12"))
	if !ok || k.mac != mac || k.dst != netip.MustParseAddr("192.0.2.12") {
		t.Fatalf("fdbKeyOf: %+v %v", k, ok)
	}
	if _, ok := fdbKeyOf(net.HardwareAddr{1, 2, 3}, net.ParseIP("192.0.2.12")); ok {
		t.Fatal("a 3-byte MAC is no FDB key")
	}
	d := delFDB(5, k)
	if d.LinkIndex != 5 || d.Family != unix.AF_BRIDGE || d.Flags&netlink.NTF_SELF == 0 || d.HardwareAddr.String() != "0a:58:0a:f4:06:01" || !d.IP.Equal(net.ParseIP("192.0.2.12")) {
		t.Fatalf("delFDB: %+v", d)
	}
}

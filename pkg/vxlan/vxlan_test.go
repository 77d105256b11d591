package vxlan

import (
	"bytes"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
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

	st, err := r.Sync(dev, neighs, fdb)
	if err != nil {
		t.Fatal(err)
	}
	check("create", Stats{DeviceCreated: true, NeighSet: 2, FDBSet: 2}, st, fdbLines, neighLines)
	if a := n.MustRun(t, "ip", "-br", "addr", "show", "na.1"); !strings.Contains(a, "10.244.1.0/32") {
		t.Errorf("device address: %s", a)
	}

	st, err = r.Sync(dev, neighs, fdb)
	check("again", Stats{}, st, fdbLines, neighLines)

	n.MustRun(t, "bridge", "fdb", "del", macC, "dev", "na.1", "dst", "198.51.100.3", "self")
	n.MustRun(t, "ip", "neigh", "del", "10.244.2.0", "dev", "na.1")
	st, err = r.Sync(dev, neighs, fdb)
	if err != nil {
		t.Fatal(err)
	}
	check("repair entries", Stats{NeighSet: 1, FDBSet: 1}, st, fdbLines, neighLines)

	n.MustRun(t, "ip", "link", "del", "na.1")
	st, err = r.Sync(dev, neighs, fdb)
	if err != nil {
		t.Fatal(err)
	}
	check("device re-created with the same MAC", Stats{DeviceCreated: true, NeighSet: 2, FDBSet: 2}, st, fdbLines, neighLines)

	n.MustRun(t, "ip", "link", "set", "na.1", "address", "02:00:00:00:00:01")
	n.MustRun(t, "ip", "link", "set", "na.1", "down")
	st, err = r.Sync(dev, neighs, fdb)
	if err != nil {
		t.Fatal(err)
	}
	// Setting the link down flushes its neighbour entries; the next Sync restores them.
	check("mac and state repaired", Stats{DeviceFixed: 2, NeighSet: 2}, st, fdbLines, neighLines)

	logs.Reset()
	n.MustRun(t, "ip", "link", "set", "na.1", "mtu", "1400")
	st, err = r.Sync(dev, neighs, fdb)
	if err != nil {
		t.Fatal(err)
	}
	check("mtu repaired", Stats{DeviceFixed: 1}, st, fdbLines, neighLines)
	if !strings.Contains(logs.String(), `msg="vxlan device repaired" dev=na.1 attr=mtu from=1400 to=1450`) {
		t.Errorf("mtu repair not logged:\n%s", logs.String())
	}

	st, err = r.Sync(dev, neighs[:1], fdb[:1])
	if err != nil {
		t.Fatal(err)
	}
	check("peer c leaves", Stats{NeighDel: 1, FDBDel: 1}, st, fdbLines[:1], neighLines[:1])

	moved := []plan.FDB{{MAC: macB, Dst: netip.MustParseAddr("192.0.2.22")}}
	st, err = r.Sync(dev, neighs[:1], moved)
	if err != nil {
		t.Fatal(err)
	}
	if f := n.MustRun(t, "bridge", "fdb", "show", "dev", "na.1"); !strings.Contains(f, "dst 192.0.2.22") || strings.Contains(f, "dst 192.0.2.2 ") {
		t.Errorf("peer b moved: fdb\n%s", f)
	}

	dev2 := *dev
	dev2.VNI = 7
	st, err = r.Sync(&dev2, nil, nil)
	if err != nil || !st.DeviceCreated {
		t.Fatalf("VNI change: %+v, %v; want a re-created device", st, err)
	}
	if l := n.MustRun(t, "ip", "-d", "link", "show", "na.1"); !strings.Contains(l, "vxlan id 7") {
		t.Errorf("VNI not applied:\n%s", l)
	}
	// No VXLAN in the plan: Sync ensures nothing and leaves the device to Prune, which the
	// dataplane runs once the routes left it.
	if _, err := r.Sync(nil, nil, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := n.Run("ip", "link", "show", "na.1"); err != nil {
		t.Errorf("Sync(nil) removed the device before the routes could move: %v", err)
	}
	if gone, err := r.Prune(""); err != nil || !slices.Equal(gone, []string{"na.1"}) {
		t.Errorf("Prune(\"\") = %v, %v; want [na.1]", gone, err)
	}
	if _, err := n.Run("ip", "link", "show", "na.1"); err == nil {
		t.Error("device still present after Prune")
	}
}

// underlay is a namespace whose bridge eth0 (192.0.2.1/24) is the underlay, and a netlink
// handle in it.
func underlay(t *testing.T, label string) (*netns.NS, *netlink.Handle) {
	t.Helper()
	netns.RequireRoot(t)
	n := netns.New(t, label)
	n.MustRun(t, "ip", "link", "add", "eth0", "type", "bridge")
	n.MustRun(t, "ip", "addr", "add", "192.0.2.1/24", "dev", "eth0")
	n.MustRun(t, "ip", "link", "set", "eth0", "up")
	h, err := n.Handle()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return n, h
}

// TestPrune: a VNI change or a move to host-gw leaves a device of netagent's naming that
// the plan no longer names; Prune removes those and nothing else.
func TestPrune(t *testing.T) {
	n, h := underlay(t, "vxprune")
	for _, d := range []struct{ name, vni string }{{"netagent.1", "1"}, {"netagent.7", "7"}, {"na.16777215", "16777215"}, {"vx0", "9"}} {
		n.MustRun(t, "ip", "link", "add", d.name, "type", "vxlan", "id", d.vni, "dstport", "4789", "local", "192.0.2.1", "dev", "eth0")
	}
	n.MustRun(t, "ip", "link", "add", "netagent.9", "type", "bridge") // not a VXLAN device
	r := New(h, slog.New(slog.DiscardHandler))
	for _, tt := range []struct {
		keep       string
		gone, left []string
	}{
		{"netagent.7", []string{"na.16777215", "netagent.1"}, []string{"netagent.7", "vx0", "netagent.9"}},
		{"netagent.7", nil, []string{"netagent.7", "vx0", "netagent.9"}},
		{"", []string{"netagent.7"}, []string{"vx0", "netagent.9"}},
	} {
		gone, err := r.Prune(tt.keep)
		slices.Sort(gone)
		if err != nil || !slices.Equal(gone, tt.gone) {
			t.Errorf("Prune(%q) = %v, %v; want %v", tt.keep, gone, err, tt.gone)
		}
		for _, name := range tt.left {
			if _, err := n.Run("ip", "link", "show", name); err != nil {
				t.Errorf("Prune(%q) removed %s", tt.keep, name)
			}
		}
	}
}

// TestDeferDeletes: with DeferDeletes, a peer's entries outlive the Sync or Apply that
// drops them until Commit, so the dataplane moves the peer's route first (a peer going to
// direct routing lost packets while its route still pointed at entries already gone).
func TestDeferDeletes(t *testing.T) {
	n, h := underlay(t, "vxdefer")
	r := New(h, slog.New(slog.DiscardHandler))
	r.Mirror()
	r.DeferDeletes()
	dev := &plan.VXLANDevice{Name: "na.1", VNI: 1, Port: 8472, Underlay: "eth0", Local: netip.MustParseAddr("192.0.2.1"), Addr: netip.MustParsePrefix("10.244.1.0/32"), MAC: plan.VTEPMAC("self").String(), MTU: 1450}
	macB, macC := plan.VTEPMAC("b").String(), plan.VTEPMAC("c").String()
	neighB, neighC := plan.Neigh{IP: netip.MustParseAddr("10.244.2.0"), MAC: macB}, plan.Neigh{IP: netip.MustParseAddr("10.244.3.0"), MAC: macC}
	fdbB, fdbC := plan.FDB{MAC: macB, Dst: netip.MustParseAddr("192.0.2.2")}, plan.FDB{MAC: macC, Dst: netip.MustParseAddr("192.0.2.3")}
	has := func(step, peer string, want bool) {
		t.Helper()
		e := n.MustRun(t, "ip", "neigh", "show", "dev", "na.1") + n.MustRun(t, "bridge", "fdb", "show", "dev", "na.1")
		if got := strings.Contains(e, peer); got != want {
			t.Errorf("%s: entries of %s present = %v, want %v:\n%s", step, peer, got, want, e)
		}
	}
	if _, err := r.Sync(dev, []plan.Neigh{neighB, neighC}, []plan.FDB{fdbB, fdbC}); err != nil {
		t.Fatal(err)
	}
	// b leaves the full plan: Sync keeps its entries, Commit removes them.
	st, err := r.Sync(dev, []plan.Neigh{neighC}, []plan.FDB{fdbC})
	if err != nil || st.NeighDel+st.FDBDel != 0 {
		t.Fatalf("Sync = %+v, %v; want no deletion before Commit", st, err)
	}
	has("after Sync", macB, true)
	if st, err := r.Commit(); err != nil || st.NeighDel != 1 || st.FDBDel != 1 {
		t.Fatalf("Commit = %+v, %v; want b's neighbour and FDB entry removed", st, err)
	}
	has("after Commit", macB, false)
	has("after Commit", macC, true)
	// c goes on the incremental path: the same.
	st, err = r.Apply([]plan.NeighChange{{IP: neighC.IP, Del: true}}, []plan.FDBChange{{FDB: fdbC, Del: true}})
	if err != nil || st.NeighDel+st.FDBDel != 0 {
		t.Fatalf("Apply = %+v, %v; want no deletion before Commit", st, err)
	}
	has("after Apply", macC, true)
	if st, err := r.Commit(); err != nil || st.NeighDel != 1 || st.FDBDel != 1 {
		t.Fatalf("Commit = %+v, %v; want c's neighbour and FDB entry removed", st, err)
	}
	has("after the second Commit", macC, false)
	if st, err := r.Commit(); err != nil || st.Changed() {
		t.Errorf("a Commit with nothing deferred = %+v, %v; want nothing", st, err)
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
	if !ok || k.mac != mac || k.dst.Addr() != netip.MustParseAddr("192.0.2.12") {
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

// Over an IPv6 underlay (an IPv6-only cluster): the device's local address, FDB
// destinations and neighbour entries are IPv6, it has no IPv4 address, drifted entries are
// repaired, and a new reconciler (a restart) adopts everything unchanged.
func TestSyncIPv6(t *testing.T) {
	netns.RequireRoot(t)
	n := netns.New(t, "vxlan6")
	n.MustRun(t, "ip", "link", "add", "eth0", "type", "bridge")
	n.MustRun(t, "ip", "addr", "add", "2001:db8::1/64", "dev", "eth0", "nodad")
	n.MustRun(t, "ip", "link", "set", "eth0", "up")
	h, err := n.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	log := slog.New(slog.DiscardHandler)
	r := New(h, log)
	dev := &plan.VXLANDevice{Name: "na.1", VNI: 1, Port: 8472, Underlay: "eth0", Local: netip.MustParseAddr("2001:db8::1"), MAC: plan.VTEPMAC("self").String(), MTU: 1430}
	macB, macC := plan.VTEPMAC("b").String(), plan.VTEPMAC("c").String()
	neighs := []plan.Neigh{{IP: netip.MustParseAddr("fd00:0:0:2::"), MAC: macB}, {IP: netip.MustParseAddr("10.244.3.0"), MAC: macC}, {IP: netip.MustParseAddr("fd00:0:0:3::"), MAC: macC}}
	fdb := []plan.FDB{{MAC: macB, Dst: netip.MustParseAddr("2001:db8::2")}, {MAC: macC, Dst: netip.MustParseAddr("2001:db8:9::3")}}
	want := []string{"fd00:0:0:2:: lladdr " + macB + " PERMANENT", "fd00:0:0:3:: lladdr " + macC + " PERMANENT", "10.244.3.0 lladdr " + macC + " PERMANENT"}
	wantFDB := []string{macB + " dst 2001:db8::2 self permanent", macC + " dst 2001:db8:9::3 self permanent"}
	check := func(step string) {
		t.Helper()
		nb := n.MustRun(t, "ip", "neigh", "show", "dev", "na.1") + n.MustRun(t, "ip", "-6", "neigh", "show", "dev", "na.1")
		for _, w := range want {
			if !strings.Contains(nb, w) {
				t.Errorf("%s: neighbours lack %q:\n%s", step, w, nb)
			}
		}
		f := n.MustRun(t, "bridge", "fdb", "show", "dev", "na.1")
		for _, w := range wantFDB {
			if !strings.Contains(f, w) {
				t.Errorf("%s: fdb lacks %q:\n%s", step, w, f)
			}
		}
	}
	st, err := r.Sync(dev, neighs, fdb)
	if err != nil || st != (Stats{DeviceCreated: true, NeighSet: 3, FDBSet: 2}) {
		t.Fatalf("create: %+v, %v", st, err)
	}
	check("create")
	if l := n.MustRun(t, "ip", "-d", "link", "show", "na.1"); !strings.Contains(l, "local 2001:db8::1") {
		t.Errorf("device not over the IPv6 underlay:\n%s", l)
	}
	if a := n.MustRun(t, "ip", "-4", "addr", "show", "dev", "na.1"); strings.TrimSpace(a) != "" {
		t.Errorf("IPv6-only device has an IPv4 address:\n%s", a)
	}
	n.MustRun(t, "ip", "-6", "neigh", "del", "fd00:0:0:2::", "dev", "na.1")
	n.MustRun(t, "ip", "-6", "neigh", "replace", "fd00:0:0:3::", "lladdr", "02:00:00:00:00:99", "dev", "na.1", "nud", "permanent")
	n.MustRun(t, "bridge", "fdb", "del", macB, "dev", "na.1", "dst", "2001:db8::2", "self")
	st, err = r.Sync(dev, neighs, fdb)
	if err != nil || st != (Stats{NeighSet: 2, FDBSet: 1}) {
		t.Fatalf("repair: %+v, %v; want 2 neighbours and 1 FDB entry set", st, err)
	}
	check("repair")
	if st, err := New(h, log).Sync(dev, neighs, fdb); err != nil || st != (Stats{}) {
		t.Errorf("a new reconciler's Sync = %+v, %v; want nothing changed", st, err)
	}
	// A peer leaves: its entries of both families go.
	st, err = r.Sync(dev, neighs[:1], fdb[:1])
	if err != nil || st != (Stats{NeighDel: 2, FDBDel: 1}) {
		t.Fatalf("leave: %+v, %v", st, err)
	}
}

// TestNoDeviceWanted: once a Sync wanted no device (host-gw, wireguard), another device's
// neighbour notification (a pod's or the underlay's ARP) is none of the mirror's business,
// and a delta without neighbour or FDB changes applies; before any Sync, an invalid mirror
// still asks for a pass on every notification. Both used to ask for a full pass on every
// ARP exchange and lease event of such a node.
func TestNoDeviceWanted(t *testing.T) {
	arp := netlink.NeighUpdate{Type: unix.RTM_NEWNEIGH, Neigh: netlink.Neigh{LinkIndex: 7, Family: unix.AF_INET, IP: net.ParseIP("192.0.2.13"), State: netlink.NUD_REACHABLE}}
	for _, tt := range []struct {
		name        string
		synced      bool // Sync(nil) ran
		wantObserve bool
		wantApply   error
	}{
		{"before a Sync", false, true, nil},
		{"no device wanted", true, false, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := New(nil, slog.New(slog.DiscardHandler))
			r.Mirror()
			if tt.synced {
				if _, err := r.Sync(nil, nil, nil); err != nil {
					t.Fatal(err)
				}
			}
			if got := r.Observe(arp); got != tt.wantObserve {
				t.Errorf("Observe(another device's ARP) = %v, want %v", got, tt.wantObserve)
			}
			if _, err := r.Apply(nil, nil); err != tt.wantApply {
				t.Errorf("Apply(no changes) = %v, want %v", err, tt.wantApply)
			}
			if _, err := r.Apply([]plan.NeighChange{{IP: netip.MustParseAddr("10.244.3.0")}}, nil); err != ErrNoMirror {
				t.Errorf("Apply(a neighbour) = %v, want ErrNoMirror: there is no device to put it on", err)
			}
		})
	}
}

// TestApplyMovedVTEP: a peer's new underlay address arrives as the planner's delta puts it
// (its old FDB entry deleted, the new one set, one MAC). The kernel keeps one destination
// per MAC, so setting the new one replaces the old and the deletion finds nothing; the
// device must end with the new entry alone, and the mirror must agree (the next full pass
// changes nothing).
func TestApplyMovedVTEP(t *testing.T) {
	for _, deferred := range []bool{false, true} {
		t.Run(fmt.Sprintf("deferred=%v", deferred), func(t *testing.T) {
			n, h := underlay(t, "vxmove")
			r := New(h, slog.New(slog.DiscardHandler))
			r.Mirror()
			if deferred {
				r.DeferDeletes()
			}
			dev := &plan.VXLANDevice{Name: "na.1", VNI: 1, Port: 8472, Underlay: "eth0", Local: netip.MustParseAddr("192.0.2.1"), Addr: netip.MustParsePrefix("10.244.1.0/32"), MAC: plan.VTEPMAC("self").String(), MTU: 1450}
			macB := plan.VTEPMAC("b").String()
			neigh := plan.Neigh{IP: netip.MustParseAddr("10.244.2.0"), MAC: macB}
			from, to := plan.FDB{MAC: macB, Dst: netip.MustParseAddr("192.0.2.2")}, plan.FDB{MAC: macB, Dst: netip.MustParseAddr("198.51.100.2")}
			if _, err := r.Sync(dev, []plan.Neigh{neigh}, []plan.FDB{from}); err != nil {
				t.Fatal(err)
			}
			st, err := r.Apply(nil, []plan.FDBChange{{FDB: from, Del: true}, {FDB: to}})
			if err != nil {
				t.Fatalf("Apply: %v", err)
			}
			c, err := r.Commit()
			if err != nil {
				t.Fatalf("Commit: %v", err)
			}
			st.Add(c)
			if st.FDBSet != 1 || st.FDBDel != 1 {
				t.Errorf("Apply and Commit = %+v, want one FDB entry set and one deleted", st)
			}
			f := strings.TrimSpace(n.MustRun(t, "bridge", "fdb", "show", "dev", "na.1"))
			if want := macB + " dst 198.51.100.2 self permanent"; !strings.Contains(f, want) || strings.Count(f, "\n") != 0 {
				t.Errorf("fdb:\n%s\nwant %q alone", f, want)
			}
			if st, err := r.Sync(dev, []plan.Neigh{neigh}, []plan.FDB{to}); err != nil || st.Changed() {
				t.Errorf("the next full pass = %+v, %v; want nothing to do", st, err)
			}
		})
	}
}

package route

import (
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/test/netns"
)

// step is one Sync of a transition test: before it, the want it is given, what it should
// change, and lines the table should then show.
type step struct {
	name   string
	before func()
	want   []plan.Route
	stats  Stats
	table  []string // lines expected in the table
}

// runSteps applies steps in order, checking each against show(), our routes as ip lists
// them.
func runSteps(t *testing.T, r *Reconciler, steps []step, show func() string) {
	t.Helper()
	for _, s := range steps {
		if s.before != nil {
			s.before()
		}
		st, err := r.Sync(s.want)
		if err != nil {
			t.Fatalf("%s: Sync: %v", s.name, err)
		}
		if st != s.stats {
			t.Errorf("%s: Sync stats = %+v, want %+v", s.name, st, s.stats)
		}
		table := show()
		for _, l := range s.table {
			if !strings.Contains(table, l) {
				t.Errorf("%s: route table lacks %q:\n%s", s.name, l, table)
			}
		}
		if got := strings.Count(table, "\n"); got != len(s.want) {
			t.Errorf("%s: %d routes with proto 180, want %d:\n%s", s.name, got, len(s.want), table)
		}
	}
}

func TestSyncTransitions(t *testing.T) {
	netns.RequireRoot(t)
	n := netns.New(t, "route")
	n.MustRun(t, "ip", "link", "add", "eth0", "type", "bridge")
	n.MustRun(t, "ip", "addr", "add", "192.0.2.1/24", "dev", "eth0")
	n.MustRun(t, "ip", "link", "set", "eth0", "up")
	n.MustRun(t, "ip", "route", "add", "203.0.113.0/24", "via", "192.0.2.254") // not ours
	h, err := n.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	r := New(h, slog.New(slog.NewTextHandler(io.Discard, nil)))

	rt := func(dst, gw string, mtu int) plan.Route {
		return plan.Route{Dst: netip.MustParsePrefix(dst), Gw: netip.MustParseAddr(gw), Dev: "eth0", MTU: mtu}
	}
	steps := []step{
		{"add two", nil, []plan.Route{rt("10.244.2.0/24", "192.0.2.2", 0), rt("10.244.3.0/24", "192.0.2.3", 0)}, Stats{Added: 2},
			[]string{"10.244.2.0/24 via 192.0.2.2 dev eth0", "10.244.3.0/24 via 192.0.2.3 dev eth0"}},
		{"same again changes nothing", nil, []plan.Route{rt("10.244.2.0/24", "192.0.2.2", 0), rt("10.244.3.0/24", "192.0.2.3", 0)}, Stats{},
			[]string{"10.244.2.0/24 via 192.0.2.2", "10.244.3.0/24 via 192.0.2.3"}},
		{"gateway moves, mtu set", nil, []plan.Route{rt("10.244.2.0/24", "192.0.2.22", 1450), rt("10.244.3.0/24", "192.0.2.3", 0)}, Stats{Replaced: 1},
			[]string{"10.244.2.0/24 via 192.0.2.22 dev eth0 mtu 1450"}},
		{"deleted by hand is repaired", func() { n.MustRun(t, "ip", "route", "del", "10.244.3.0/24") },
			[]plan.Route{rt("10.244.2.0/24", "192.0.2.22", 1450), rt("10.244.3.0/24", "192.0.2.3", 0)}, Stats{Added: 1},
			[]string{"10.244.3.0/24 via 192.0.2.3"}},
		{"peer leaves", nil, []plan.Route{rt("10.244.3.0/24", "192.0.2.3", 0)}, Stats{Deleted: 1}, []string{"10.244.3.0/24"}},
		{"all leave", nil, nil, Stats{Deleted: 1}, nil},
	}
	runSteps(t, r, steps, func() string { return n.MustRun(t, "ip", "route", "show", "proto", "180") })
	if all := n.MustRun(t, "ip", "route"); !strings.Contains(all, "203.0.113.0/24 via 192.0.2.254") {
		t.Errorf("a foreign route was touched:\n%s", all)
	}
}

// IPv6 routes, and IPv4 routes via an IPv6 next hop (RTA_VIA): set, repaired after
// drift, and adopted unchanged by a new reconciler (a restart).
func TestSyncTransitions6(t *testing.T) {
	netns.RequireRoot(t)
	n := netns.New(t, "route6")
	n.MustRun(t, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	n.MustRun(t, "ip", "link", "add", "eth0", "type", "bridge")
	n.MustRun(t, "ip", "addr", "add", "192.0.2.1/24", "dev", "eth0")
	n.MustRun(t, "ip", "addr", "add", "2001:db8::1/64", "dev", "eth0", "nodad")
	n.MustRun(t, "ip", "link", "set", "eth0", "up")
	h, err := n.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	r := New(h, log)
	rt := func(dst, gw string) plan.Route {
		return plan.Route{Dst: netip.MustParsePrefix(dst), Gw: netip.MustParseAddr(gw), Dev: "eth0"}
	}
	both := []plan.Route{rt("10.244.2.0/24", "192.0.2.2"), rt("fd00:0:0:2::/64", "2001:db8::2"), rt("10.244.3.0/24", "2001:db8::3")}
	steps := []step{
		{"add", nil, both, Stats{Added: 3}, []string{"fd00:0:0:2::/64 via 2001:db8::2 dev eth0", "10.244.3.0/24 via inet6 2001:db8::3 dev eth0"}},
		{"same again changes nothing", nil, both, Stats{}, nil},
		{"deleted by hand is repaired", func() { n.MustRun(t, "ip", "-6", "route", "del", "fd00:0:0:2::/64") }, both, Stats{Added: 1},
			[]string{"fd00:0:0:2::/64 via 2001:db8::2"}},
		{"replaced by hand is repaired", func() {
			n.MustRun(t, "ip", "-6", "route", "replace", "fd00:0:0:2::/64", "via", "2001:db8::99", "dev", "eth0", "proto", "180")
		},
			both, Stats{Replaced: 1}, []string{"fd00:0:0:2::/64 via 2001:db8::2"}},
		{"next hop changes family", nil, []plan.Route{rt("10.244.2.0/24", "2001:db8::2"), both[1], both[2]}, Stats{Replaced: 1},
			[]string{"10.244.2.0/24 via inet6 2001:db8::2"}},
		{"all leave", nil, nil, Stats{Deleted: 3}, nil},
	}
	runSteps(t, r, steps, func() string {
		return n.MustRun(t, "ip", "-6", "route", "show", "proto", "180") + n.MustRun(t, "ip", "route", "show", "proto", "180")
	})
	// A restart adopts what is there.
	if _, err := r.Sync(both); err != nil {
		t.Fatal(err)
	}
	if st, err := New(h, log).Sync(both); err != nil || st != (Stats{}) {
		t.Errorf("a new reconciler's Sync = %+v, %v; want nothing changed", st, err)
	}
}

func TestSyncReportsMissingDevice(t *testing.T) {
	netns.RequireRoot(t)
	n := netns.New(t, "route")
	h, err := n.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	r := New(h, slog.New(slog.NewTextHandler(io.Discard, nil)))
	_, err = r.Sync([]plan.Route{{Dst: netip.MustParsePrefix("10.1.0.0/24"), Gw: netip.MustParseAddr("192.0.2.1"), Dev: "nope0"}})
	if err == nil || !strings.Contains(err.Error(), "device nope0") {
		t.Errorf("Sync = %v, want an error naming device nope0", err)
	}
}

// The mirror's compact form must keep everything sameness and deletion depend on: the
// netlink route rebuilt from it compacts back to the same value.
func TestCompactRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name string
		w    plan.Route
	}{
		{"direct", plan.Route{Dst: netip.MustParsePrefix("10.244.3.0/24"), Gw: netip.MustParseAddr("192.0.2.12"), Dev: "eth0"}},
		{"vxlan onlink with mtu", plan.Route{Dst: netip.MustParsePrefix("10.244.4.0/24"), Gw: netip.MustParseAddr("10.244.4.0"), Dev: "netagent.1", OnLink: true, MTU: 1450}},
		{"IPv6 direct", plan.Route{Dst: netip.MustParsePrefix("fd00:0:0:3::/64"), Gw: netip.MustParseAddr("2001:db8::12"), Dev: "eth0"}},
		{"IPv4 via an IPv6 next hop", plan.Route{Dst: netip.MustParsePrefix("10.244.3.0/24"), Gw: netip.MustParseAddr("2001:db8::12"), Dev: "eth0"}},
		{"IPv6 vxlan onlink", plan.Route{Dst: netip.MustParsePrefix("fd00:0:0:4::/64"), Gw: netip.MustParseAddr("fd00:0:0:4::"), Dev: "netagent.1", OnLink: true, MTU: 1430}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nr := toNetlink(tc.w, 7)
			k := compact(*nr)
			if k.link != 7 || k.gw.Addr() != tc.w.Gw || int(k.mtu) != tc.w.MTU || k.onlink != tc.w.OnLink {
				t.Fatalf("compact(%+v) = %+v", tc.w, k)
			}
			back := k.route(tc.w.Dst)
			if got := compact(*back); got != k {
				t.Fatalf("round trip: %+v, want %+v", got, k)
			}
			if back.Dst.String() != tc.w.Dst.String() || back.Protocol != Protocol {
				t.Fatalf("delete form %v proto %d", back.Dst, back.Protocol)
			}
			other := *nr
			other.MTU = 9000
			if compact(other) == k {
				t.Fatal("an MTU change must not compare equal")
			}
		})
	}
}

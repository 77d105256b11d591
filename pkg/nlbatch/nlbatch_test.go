package nlbatch_test

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/netipx"
	"github.com/netagent/netagent/pkg/nlbatch"
	"github.com/netagent/netagent/test/netns"
)

// node is a namespace with what the reconcilers write against: a bridge with an address of
// each family (gateways on it) and a VXLAN device (neighbour and FDB entries).
func node(t *testing.T, label string) (*netns.NS, *netlink.Handle, *nlbatch.Conn, int, int) {
	t.Helper()
	n := netns.New(t, label)
	n.MustRun(t, "ip", "link", "add", "b0", "type", "bridge")
	n.MustRun(t, "ip", "addr", "add", "192.0.2.1/24", "dev", "b0")
	n.MustRun(t, "ip", "addr", "add", "2001:db8::1/64", "dev", "b0", "nodad")
	n.MustRun(t, "ip", "link", "set", "b0", "up")
	n.MustRun(t, "ip", "link", "add", "vx", "type", "vxlan", "id", "1", "dstport", "8472", "dev", "b0", "nolearning")
	n.MustRun(t, "ip", "link", "set", "vx", "up")
	n.MustRun(t, "ip", "link", "add", "vx6", "type", "vxlan", "id", "2", "dstport", "8472", "dev", "b0", "local", "2001:db8::1", "nolearning")
	h, err := n.Handle()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	var c *nlbatch.Conn
	if err := n.Do(func() (err error) { c, err = nlbatch.Open(); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	b0, _ := h.LinkByName("b0")
	vx, _ := h.LinkByName("vx")
	return n, h, c, b0.Attrs().Index, vx.Attrs().Index
}

func index(t *testing.T, h *netlink.Handle, name string) int {
	t.Helper()
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	return l.Attrs().Index
}

func prefix(s string) *net.IPNet { return netipx.IPNet(netip.MustParsePrefix(s)) }

// routes are the forms the route reconciler writes (toNetlink), over b0 (index i: direct
// routes, an IPv4 route via an IPv6 next hop) and the VXLAN device (index v: onlink).
func routes(i, v int) []*netlink.Route {
	return []*netlink.Route{
		{LinkIndex: i, Dst: prefix("10.1.0.0/24"), Protocol: 180, Table: unix.RT_TABLE_MAIN},
		{LinkIndex: i, Dst: prefix("10.1.1.0/24"), Gw: net.ParseIP("192.0.2.7").To4(), Protocol: 180, Table: unix.RT_TABLE_MAIN, MTU: 1450},
		{LinkIndex: i, Dst: prefix("10.1.2.0/24"), Gw: net.ParseIP("198.51.100.9").To4(), Protocol: 180, Table: unix.RT_TABLE_MAIN, Flags: int(netlink.FLAG_ONLINK)},
		{LinkIndex: i, Dst: prefix("fd00:1::/64"), Gw: net.ParseIP("2001:db8::7"), Protocol: 180, Table: unix.RT_TABLE_MAIN, MTU: 1430},
		{LinkIndex: i, Dst: prefix("10.1.3.0/24"), Via: &netlink.Via{AddrFamily: unix.AF_INET6, Addr: net.ParseIP("2001:db8::9")}, Protocol: 180, Table: unix.RT_TABLE_MAIN, MTU: 1450},
		{LinkIndex: v, Dst: prefix("fd00:3::/64"), Gw: net.ParseIP("fd00:3::"), Protocol: 180, Table: unix.RT_TABLE_MAIN, Flags: int(netlink.FLAG_ONLINK), MTU: 1450},
	}
}

// neighs are the VXLAN reconciler's entries on an IPv4 device (i) and an IPv6 one (i6).
func neighs(i, i6 int) []*netlink.Neigh {
	mac := func(s string) net.HardwareAddr { m, _ := net.ParseMAC(s); return m }
	return []*netlink.Neigh{
		{LinkIndex: i, Family: unix.AF_INET, State: netlink.NUD_PERMANENT, IP: net.ParseIP("10.1.1.0").To4(), HardwareAddr: mac("0a:58:00:00:00:01")},
		{LinkIndex: i, Family: unix.AF_INET6, State: netlink.NUD_PERMANENT, IP: net.ParseIP("fd00:1::"), HardwareAddr: mac("0a:58:00:00:00:01")},
		{LinkIndex: i, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, State: netlink.NUD_PERMANENT, IP: net.ParseIP("198.51.100.9").To4(), HardwareAddr: mac("0a:58:00:00:00:01")},
		{LinkIndex: i6, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, State: netlink.NUD_PERMANENT, IP: net.ParseIP("2001:db8:9::9"), HardwareAddr: mac("0a:58:00:00:00:02")},
	}
}

// dump renders the namespace's routes of protocol 180 and the VXLAN device's entries
// (indexes are the same in both namespaces: they were built alike).
func dump(t *testing.T, n *netns.NS) string {
	t.Helper()
	return n.MustRun(t, "ip", "-d", "route", "show", "proto", "180") + n.MustRun(t, "ip", "-d", "-6", "route", "show", "proto", "180") +
		n.MustRun(t, "ip", "neigh", "show", "dev", "vx") + n.MustRun(t, "bridge", "fdb", "show", "dev", "vx") + n.MustRun(t, "bridge", "fdb", "show", "dev", "vx6")
}

// TestSameAsNetlink: a batch leaves the kernel exactly as vishvananda/netlink's one-by-one
// calls with the same values, for each form the reconcilers write, and deletes alike.
func TestSameAsNetlink(t *testing.T) {
	netns.RequireRoot(t)
	one, h, _, b0, vx := node(t, "nlb-one")
	batch, _, c, _, _ := node(t, "nlb-batch")
	for _, r := range routes(b0, vx) {
		if err := h.RouteReplace(r); err != nil {
			t.Fatalf("netlink RouteReplace %v: %v", r, err)
		}
	}
	for _, n := range neighs(vx, index(t, h, "vx6")) {
		if err := h.NeighSet(n); err != nil {
			t.Fatalf("netlink NeighSet %v: %v", n, err)
		}
	}
	for i, err := range c.ReplaceRoutes(all(routes(b0, vx))) {
		if err != nil {
			t.Fatalf("batch route %d: %v", i, err)
		}
	}
	for i, err := range c.SetNeighs(all(neighs(vx, index(t, h, "vx6")))) {
		if err != nil {
			t.Fatalf("batch neighbour %d: %v", i, err)
		}
	}
	want, got := dump(t, one), dump(t, batch)
	if want != got || len(want) == 0 {
		t.Fatalf("batch wrote\n%s\nnetlink wrote\n%s", got, want)
	}
	// Replacing with the same values changes nothing; deleting leaves none.
	for i, err := range c.ReplaceRoutes(all(routes(b0, vx))) {
		if err != nil {
			t.Fatalf("batch route %d again: %v", i, err)
		}
	}
	if got := dump(t, batch); got != want {
		t.Fatalf("a second batch changed the kernel:\n%s", got)
	}
	for i, err := range c.DeleteRoutes(all(routes(b0, vx))) {
		if err != nil {
			t.Fatalf("batch delete %d: %v", i, err)
		}
	}
	if out := batch.MustRun(t, "ip", "route", "show", "proto", "180") + batch.MustRun(t, "ip", "-6", "route", "show", "proto", "180"); out != "" {
		t.Fatalf("routes left after the batch deleted them:\n%s", out)
	}
}

// TestEachOutcome: every request gets its own outcome, across datagrams, and a failure
// stops none of the others.
func TestEachOutcome(t *testing.T) {
	netns.RequireRoot(t)
	n, _, c, b0, _ := node(t, "nlb-each")
	var rs []*netlink.Route
	bad := map[int]error{}
	for i := range 300 { // more than one datagram's worth
		r := &netlink.Route{LinkIndex: b0, Dst: prefix(fmt.Sprintf("10.%d.%d.0/24", 2+i/256, i%256)), Protocol: 180, Table: unix.RT_TABLE_MAIN}
		switch i {
		case 5, 200:
			r.LinkIndex = 9999
			bad[i] = unix.ENODEV
		case 130:
			r.Gw = net.ParseIP("203.0.113.1").To4() // not on the link, no onlink
			bad[i] = unix.ENETUNREACH
		}
		rs = append(rs, r)
	}
	errs := c.ReplaceRoutes(all(rs))
	for i, err := range errs {
		if !errors.Is(err, bad[i]) || (bad[i] == nil) != (err == nil) {
			t.Errorf("route %d: %v, want %v", i, err, bad[i])
		}
	}
	lines := slices.DeleteFunc(splitLines(n.MustRun(t, "ip", "route", "show", "proto", "180")), func(s string) bool { return s == "" })
	if len(lines) != 300-len(bad) {
		t.Fatalf("%d routes in the kernel, want %d", len(lines), 300-len(bad))
	}
	// Deleting what is not there fails with ESRCH, as netlink.RouteDel.
	errs = c.DeleteRoutes(all(rs[4:7]))
	if errs[0] != nil || !errors.Is(errs[1], unix.ESRCH) || errs[2] != nil {
		t.Fatalf("deletes: %v", errs)
	}
	// A field the encoder does not write is refused, not dropped.
	if errs := c.ReplaceRoutes(all([]*netlink.Route{{LinkIndex: b0, Dst: prefix("10.3.0.0/24"), Priority: 7}})); errs[0] == nil {
		t.Fatal("a route with a priority was written without it")
	}
}

// all is xs as the batch API takes them.
func all[T any](xs []*T) (int, func(int) *T) { return len(xs), func(i int) *T { return xs[i] } }

func splitLines(s string) []string {
	var out []string
	start := 0
	for i := range len(s) {
		if s[i] == '\n' {
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	return append(out, s[start:])
}

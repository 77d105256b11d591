package vxguard

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/netagent/netagent/test/netns"
)

func newGuard(t *testing.T) (*Guard, *netns.NS) {
	t.Helper()
	netns.RequireRoot(t)
	ns := netns.New(t, "vxguard")
	var g *Guard
	if err := ns.Do(func() (err error) { g, err = New(); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = g.Close() })
	return g, ns
}

// elementsIn lists the set's elements as nft prints them.
func elementsIn(t *testing.T, ns *netns.NS) []string {
	t.Helper()
	out := ns.MustRun(t, "nft", "list", "set", "ip", Table, SetName+selfSuffix)
	i := strings.Index(out, "elements = {")
	if i < 0 {
		return nil
	}
	body := out[i+len("elements = {"):]
	body = body[:strings.Index(body, "}")]
	var els []string
	for _, f := range strings.Split(body, ",") {
		if f = strings.Join(strings.Fields(f), " "); f != "" {
			els = append(els, f)
		}
	}
	slices.Sort(els)
	return els
}

var elementsRe = regexp.MustCompile(`elements = \{[^}]*\}`)

// tableState is the table as nft prints it, with each set's elements sorted (the kernel
// lists interval sets in insertion order).
func tableState(t *testing.T, ns *netns.NS) string { return familyState(t, ns, "ip") }

// familyState is tableState for the table of family (ip, ip6).
func familyState(t *testing.T, ns *netns.NS, family string) string {
	out := ns.MustRun(t, "nft", "list", "table", family, Table)
	return elementsRe.ReplaceAllStringFunc(out, func(m string) string {
		var els []string
		for _, f := range strings.Split(strings.TrimSuffix(strings.TrimPrefix(m, "elements = {"), "}"), ",") {
			els = append(els, strings.Join(strings.Fields(f), " "))
		}
		slices.Sort(els)
		return strings.Join(els, ", ")
	})
}

func peers(kv ...string) map[string]Peer {
	m := map[string]Peer{}
	for i := 0; i < len(kv); i += 2 {
		m[kv[i]] = Peer{IP: netip.MustParseAddr(kv[i+1])}
	}
	return m
}

var network = netip.MustParsePrefix("10.244.0.0/16")

func TestSyncAndUpdate(t *testing.T) {
	g, ns := newGuard(t)
	if _, err := g.Update(peers("a", "192.0.2.11")); err != ErrNoMirror {
		t.Fatalf("Update before Sync: %v, want ErrNoMirror", err)
	}
	spec := Spec{Port: 8472, Network: network, SubnetLen: 24, Peers: peers("a", "192.0.2.11", "b", "192.0.2.12")}
	st, err := g.Sync(spec)
	if err != nil || !st.Rebuilt || st.Added != 2 {
		t.Fatalf("first Sync: %+v %v", st, err)
	}
	tableHas(t, ns.MustRun(t, "nft", "list", "table", "ip", Table),
		"udp dport 8472 @th,224,16 0x800 ip saddr . @ll,48,48 . @th,336,32 & 0xffffff00 @vxlan-l2 accept",
		"udp dport 8472 @th,224,16 0x800 ip saddr . @ll,48,48 . @th,336,32 @vxlan-l2-self accept",
		"udp dport 8472 @th,224,16 0x800 ip saddr . @th,336,32 & 0xffffff00 @vxlan-peers accept",
		"udp dport 8472 @th,224,16 0x800 ip saddr . @th,336,32 @vxlan-peers-self accept",
		"udp dport 8472 counter packets 0 bytes 0 drop",
		"ip saddr 10.244.0.0/16 udp dport 8472 counter packets 0 bytes 0 drop",
		"type filter hook input priority filter - 10; policy accept;",
		"type filter hook forward priority filter - 10; policy accept;",
	)
	if got := elementsIn(t, ns); !slices.Equal(got, []string{"192.0.2.11 . 192.0.2.11", "192.0.2.12 . 192.0.2.12"}) {
		t.Fatalf("elements %v", got)
	}
	if st, err := g.Sync(spec); err != nil || st.Changed() {
		t.Fatalf("second Sync changed %+v %v", st, err)
	}

	for _, c := range []struct {
		name    string
		changes map[string]Peer
		want    []string
		stats   Stats
	}{
		{"join", peers("c", "192.0.2.13"), []string{"192.0.2.11 . 192.0.2.11", "192.0.2.12 . 192.0.2.12", "192.0.2.13 . 192.0.2.13"}, Stats{Added: 1}},
		{"leave", map[string]Peer{"a": {}}, []string{"192.0.2.12 . 192.0.2.12", "192.0.2.13 . 192.0.2.13"}, Stats{Delete: 1}},
		{"move", peers("b", "198.51.100.12"), []string{"192.0.2.13 . 192.0.2.13", "198.51.100.12 . 198.51.100.12"}, Stats{Added: 1, Delete: 1}},
		{"two nodes share an address", peers("d", "192.0.2.13"), []string{"192.0.2.13 . 192.0.2.13", "198.51.100.12 . 198.51.100.12"}, Stats{}},
		{"one of them leaves", map[string]Peer{"c": {}}, []string{"192.0.2.13 . 192.0.2.13", "198.51.100.12 . 198.51.100.12"}, Stats{}},
		{"an address passes between nodes in one batch", peers("d", "192.0.2.14", "e", "192.0.2.13"), []string{"192.0.2.13 . 192.0.2.13", "192.0.2.14 . 192.0.2.14", "198.51.100.12 . 198.51.100.12"}, Stats{Added: 1}},
	} {
		st, err := g.Update(c.changes)
		if err != nil || st != c.stats {
			t.Errorf("%s: stats %+v err %v, want %+v", c.name, st, err, c.stats)
		}
		if got := elementsIn(t, ns); !slices.Equal(got, c.want) {
			t.Errorf("%s: elements %v, want %v", c.name, got, c.want)
		}
	}
}

// Whatever happens to the table, a Sync puts back exactly the desired one.
func TestSyncRepairsDrift(t *testing.T) {
	g, ns := newGuard(t)
	spec := Spec{Port: 8472, Network: network, SubnetLen: 24}
	want := func() string {
		if _, err := g.Sync(Spec{Port: 8472, Network: network, SubnetLen: 24, Peers: peers("a", "192.0.2.11", "b", "192.0.2.12")}); err != nil {
			t.Fatal(err)
		}
		return tableState(t, ns)
	}()
	for _, c := range []struct {
		name    string
		break_  []string
		rebuilt bool
	}{
		{"table deleted", []string{"nft delete table ip netagent"}, true},
		{"chain flushed", []string{"nft flush chain ip netagent vxlan-input"}, true},
		{"rule added", []string{"nft add rule ip netagent vxlan-forward accept"}, true},
		{"element deleted", []string{"nft delete element ip netagent vxlan-peers-self { 192.0.2.11 . 192.0.2.11 }"}, false},
		{"element added", []string{"nft add element ip netagent vxlan-peers-self { 203.0.113.66 . 203.0.113.66 }"}, false},
		{"whole ruleset flushed", []string{"nft flush ruleset"}, true},
		{"table made dormant", []string{"nft add table ip netagent { flags dormant; }"}, true},
	} {
		for _, cmd := range c.break_ {
			f := strings.Fields(cmd)
			ns.MustRun(t, f[0], f[1:]...)
		}
		// Resync (what the agent runs on a change notification) uses the last spec.
		st, err := g.Resync()
		if err != nil || !st.Changed() || st.Rebuilt != c.rebuilt {
			t.Errorf("%s: Sync %+v %v", c.name, st, err)
		}
		if got := tableState(t, ns); got != want {
			t.Errorf("%s: not repaired:\n%s\nwant:\n%s", c.name, got, want)
		}
	}
	// Another port or network is another rule: rebuilt.
	spec.Port = 4789
	if st, err := g.Sync(spec); err != nil || !st.Rebuilt {
		t.Fatalf("port change: %+v %v", st, err)
	}
	if out := ns.MustRun(t, "nft", "list", "table", "ip", Table); !strings.Contains(out, "udp dport 4789") || strings.Contains(out, "8472") {
		t.Fatalf("port change not applied:\n%s", out)
	}
	// No VXLAN (host-gw): the table goes.
	if st, err := g.Sync(Spec{}); err != nil || !st.Rebuilt {
		t.Fatalf("port 0: %+v %v", st, err)
	}
	if out := ns.MustRun(t, "nft", "list", "tables"); strings.Contains(out, Table) {
		t.Fatalf("table left after port 0:\n%s", out)
	}
	if st, err := g.Sync(Spec{}); err != nil || st.Changed() {
		t.Fatalf("port 0 again: %+v %v", st, err)
	}
}

// Set works against the mirror: a valid one is trusted (nothing read, only the peers that
// differ written); after Invalidate it reads the kernel and repairs what it finds.
func TestSetMirror(t *testing.T) {
	g, ns := newGuard(t)
	spec := func(kv ...string) Spec { return Spec{Port: 8472, Network: network, SubnetLen: 24, Peers: peers(kv...)} }
	for _, c := range []struct {
		name    string
		spec    Spec
		break_  string
		inval   bool
		want    Stats
		wantEls []string
	}{
		{"first: from the kernel", spec("a", "192.0.2.11"), "", false, Stats{Rebuilt: true, Added: 1}, []string{"192.0.2.11 . 192.0.2.11"}},
		{"a peer more: only its elements", spec("a", "192.0.2.11", "b", "192.0.2.12"), "", false, Stats{Added: 1}, []string{"192.0.2.11 . 192.0.2.11", "192.0.2.12 . 192.0.2.12"}},
		{"unchanged: nothing", spec("a", "192.0.2.11", "b", "192.0.2.12"), "", false, Stats{}, []string{"192.0.2.11 . 192.0.2.11", "192.0.2.12 . 192.0.2.12"}},
		{"deleted by hand, mirror trusted", spec("a", "192.0.2.11", "b", "192.0.2.12"), "nft delete element ip netagent vxlan-peers-self { 192.0.2.12 . 192.0.2.12 }", false, Stats{}, []string{"192.0.2.11 . 192.0.2.11"}},
		{"invalidated: repaired", spec("a", "192.0.2.11", "b", "192.0.2.12"), "", true, Stats{Added: 1}, []string{"192.0.2.11 . 192.0.2.11", "192.0.2.12 . 192.0.2.12"}},
		{"a peer leaves", spec("b", "192.0.2.12"), "", false, Stats{Delete: 1}, []string{"192.0.2.12 . 192.0.2.12"}},
	} {
		if c.break_ != "" {
			f := strings.Fields(c.break_)
			ns.MustRun(t, f[0], f[1:]...)
		}
		if c.inval {
			g.Invalidate()
		}
		st, err := g.Set(c.spec)
		if err != nil || st != c.want {
			t.Errorf("%s: Set() = %+v, %v; want %+v", c.name, st, err, c.want)
		}
		if got := elementsIn(t, ns); !slices.Equal(got, c.wantEls) {
			t.Errorf("%s: elements %v, want %v", c.name, got, c.wantEls)
		}
	}
}

// Thousands of peers at once (a cold start at scale), into a new table and into an
// existing one; dual stack doubles the elements, and the one transaction must still go
// through (it outgrew the default socket send buffer: "message too long").
func TestManyPeers(t *testing.T) {
	for _, dual := range []bool{false, true} {
		t.Run(fmt.Sprintf("dual=%v", dual), func(t *testing.T) {
			g, ns := newGuard(t)
			many := map[string]Peer{}
			for i := range 5000 {
				p := Peer{IP: netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), Subnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(100 + i>>8), byte(i), 0}), 24)}
				if dual {
					p.Subnet6 = netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%x::/64", i+1))
				}
				many[fmt.Sprintf("n%d", i)] = p
			}
			spec := Spec{Port: 8472, Network: network, SubnetLen: 24}
			if dual {
				spec.SubnetLen6, spec.Network6 = 64, network6
			}
			for _, c := range []struct {
				name  string
				peers map[string]Peer
			}{{"into an existing table", many}, {"all gone", nil}, {"rebuilt", many}} {
				if c.name == "rebuilt" {
					ns.MustRun(t, "nft", "flush", "ruleset")
				}
				spec.Peers = c.peers
				if _, err := g.Sync(spec); err != nil {
					t.Fatalf("%s: %v", c.name, err)
				}
				if got := len(elementsIn(t, ns)); got != len(c.peers) {
					t.Fatalf("%s: %d elements, want %d", c.name, got, len(c.peers))
				}
				if dual {
					out := ns.MustRun(t, "nft", "list", "set", "ip", Table, SetName+"6")
					if got := strings.Count(out, "fd00:10:244:"); got != len(c.peers) {
						t.Fatalf("%s: %d IPv6 elements, want %d", c.name, got, len(c.peers))
					}
				}
			}
		})
	}
}

// A peer's elements: its address and pod subnet as inner sources, in the L2 set with its
// MAC when it has one.
func TestPeerElements(t *testing.T) {
	g, ns := newGuard(t)
	spec := Spec{Port: 8472, Network: network, SubnetLen: 24, Peers: map[string]Peer{
		"near": {IP: netip.MustParseAddr("192.0.2.12"), Subnet: netip.MustParsePrefix("10.244.2.0/24"), MAC: "02:00:00:00:00:12"},
		"far":  {IP: netip.MustParseAddr("198.51.100.13"), Subnet: netip.MustParsePrefix("10.244.3.0/24")},
	}}
	if _, err := g.Sync(spec); err != nil {
		t.Fatal(err)
	}
	tableHas(t, tableState(t, ns),
		"192.0.2.12 . 02:00:00:00:00:12 . 10.244.2.0",
		"192.0.2.12 . 02:00:00:00:00:12 . 192.0.2.12",
		"198.51.100.13 . 10.244.3.0",
		"198.51.100.13 . 198.51.100.13",
	)
	// The far peer moves next to us: out of one set, into the other.
	if st, err := g.Update(map[string]Peer{"far": {IP: netip.MustParseAddr("198.51.100.13"), Subnet: netip.MustParsePrefix("10.244.3.0/24"), MAC: "02:00:00:00:00:13"}}); err != nil || st != (Stats{Added: 2, Delete: 2}) {
		t.Fatalf("Update: %+v %v", st, err)
	}
	if got := tableState(t, ns); !strings.Contains(got, "198.51.100.13 . 02:00:00:00:00:13 . 10.244.3.0") || strings.Contains(got, "198.51.100.13 . 10.244.3.0") {
		t.Errorf("after the move:\n%s", got)
	}
}

func tableHas(t *testing.T, table string, wants ...string) {
	t.Helper()
	for _, want := range wants {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}
}

// Inner IPv6 from a peer over the IPv4 underlay is accepted from its IPv6 subnet only,
// and the IPv6 rules are there only when the cluster has IPv6.
func TestInnerIPv6(t *testing.T) {
	g, ns := newGuard(t)
	mac := "02:00:00:00:00:12"
	spec := Spec{Port: 8472, Network: network, SubnetLen: 24, SubnetLen6: 64, Peers: map[string]Peer{
		"a": {IP: netip.MustParseAddr("192.0.2.11"), Subnet: netip.MustParsePrefix("10.244.1.0/24"), Subnet6: netip.MustParsePrefix("fd00:0:0:1::/64")},
		"b": {IP: netip.MustParseAddr("192.0.2.12"), Subnet: netip.MustParsePrefix("10.244.2.0/24"), Subnet6: netip.MustParsePrefix("fd00:0:0:2::/64"), MAC: mac},
	}}
	if _, err := g.Sync(spec); err != nil {
		t.Fatal(err)
	}
	tableHas(t, tableState(t, ns),
		"udp dport 8472 @th,224,16 0x86dd ip saddr . @th,304,128 & 0xffffffffffffffff0000000000000000 @vxlan-peers6 accept",
		"udp dport 8472 @th,224,16 0x86dd ip saddr . @ll,48,48 . @th,304,128 & 0xffffffffffffffff0000000000000000 @vxlan-l2-6 accept",
		"192.0.2.11 . fd00:0:0:1::",
		"192.0.2.12 . "+mac+" . fd00:0:0:2::",
	)
	// The peer moves its IPv6 subnet: one element out, one in.
	st, err := g.Update(map[string]Peer{"a": {IP: netip.MustParseAddr("192.0.2.11"), Subnet: netip.MustParsePrefix("10.244.1.0/24"), Subnet6: netip.MustParsePrefix("fd00:0:0:9::/64")}})
	if err != nil || st != (Stats{Added: 1, Delete: 1}) {
		t.Fatalf("Update = %+v, %v; want one added, one deleted", st, err)
	}
	if state := tableState(t, ns); !strings.Contains(state, "192.0.2.11 . fd00:0:0:9::") || strings.Contains(state, "fd00:0:0:1::") {
		t.Errorf("after the move:\n%s", state)
	}
	// IPv4-only: no IPv6 rules.
	spec.SubnetLen6 = 0
	if st, err := g.Set(spec); err != nil || !st.Rebuilt {
		t.Fatalf("Set(IPv4 only) = %+v, %v; want a rebuild", st, err)
	}
	if state := tableState(t, ns); strings.Contains(state, "0x86dd") || strings.Contains(state, "fd00") {
		t.Errorf("IPv4-only table has IPv6 rules or elements:\n%s", state)
	}
	// IPv6-only pods over the IPv4 underlay: no IPv4 network (this panicked building the
	// forward rule from it), the inner IPv6 rules only.
	spec.Network, spec.SubnetLen, spec.SubnetLen6 = netip.Prefix{}, 0, 64
	if _, err := g.Set(spec); err != nil {
		t.Fatalf("Set(IPv6 only) = %v", err)
	}
	if state := tableState(t, ns); !strings.Contains(state, "@vxlan-peers6 accept") || strings.Contains(state, "ip saddr 10.") {
		t.Errorf("IPv6-only table:\n%s", state)
	}
}

var network6 = netip.MustParsePrefix("fd00:10:244::/48")

// VXLAN over an IPv6 underlay: an ip6 table of the same layout holds the peers' IPv6
// underlay addresses (with their MAC on the same L2) and their inner sources, and drops
// VXLAN over IPv6 sent by IPv6 pods; the ip table keeps nothing of them. Changes are
// incremental; drift is repaired; the table goes when nothing needs it.
func TestIPv6Underlay(t *testing.T) {
	g, ns := newGuard(t)
	mac := "02:00:00:00:00:12"
	a := Peer{IP: netip.MustParseAddr("2001:db8::11"), Subnet: netip.MustParsePrefix("10.244.1.0/24"), Subnet6: netip.MustParsePrefix("fd00:10:244:1::/64")}
	b := Peer{IP: netip.MustParseAddr("2001:db8::12"), Subnet: netip.MustParsePrefix("10.244.2.0/24"), Subnet6: netip.MustParsePrefix("fd00:10:244:2::/64"), MAC: mac}
	spec := func(peers map[string]Peer) Spec {
		return Spec{Port: 8472, Network: network, SubnetLen: 24, Network6: network6, SubnetLen6: 64, Underlay6: true, Peers: peers}
	}
	st, err := g.Sync(spec(map[string]Peer{"a": a, "b": b}))
	if err != nil || !st.Rebuilt || st.Added != 6 {
		t.Fatalf("Sync = %+v, %v; want a rebuild adding 6 elements", st, err)
	}
	want := familyState(t, ns, "ip6")
	tableHas(t, want,
		"udp dport 8472 @th,224,16 0x800 ip6 saddr . @ll,48,48 . @th,336,32 & 0xffffff00 @vxlan-l2 accept",
		"udp dport 8472 @th,224,16 0x800 ip6 saddr . @th,336,32 & 0xffffff00 @vxlan-peers accept",
		"udp dport 8472 @th,224,16 0x86dd ip6 saddr . @th,304,128 @vxlan-peers-self accept",
		"udp dport 8472 @th,224,16 0x86dd ip6 saddr . @ll,48,48 . @th,304,128 @vxlan-l2-self accept",
		"udp dport 8472 @th,224,16 0x86dd ip6 saddr . @th,304,128 & 0xffffffffffffffff0000000000000000 @vxlan-peers6 accept",
		"udp dport 8472 @th,224,16 0x86dd ip6 saddr . @ll,48,48 . @th,304,128 & 0xffffffffffffffff0000000000000000 @vxlan-l2-6 accept",
		"udp dport 8472 counter packets 0 bytes 0 drop",
		"ip6 saddr fd00:10:244::/48 udp dport 8472 counter packets 0 bytes 0 drop",
		"2001:db8::11 . 10.244.1.0",
		"2001:db8::11 . fd00:10:244:1::",
		"2001:db8::11 . 2001:db8::11",
		"2001:db8::12 . "+mac+" . 10.244.2.0",
		"2001:db8::12 . "+mac+" . fd00:10:244:2::",
		"2001:db8::12 . "+mac+" . 2001:db8::12",
	)
	if v4 := tableState(t, ns); strings.Contains(v4, "2001:db8") || !strings.Contains(v4, "ip saddr 10.244.0.0/16 udp dport 8472") {
		t.Errorf("the ip table holds IPv6 peers, or lost its own forward rule:\n%s", v4)
	}
	if st, err := g.Set(spec(map[string]Peer{"a": a, "b": b})); err != nil || st.Changed() {
		t.Fatalf("Set(same) = %+v, %v; want no change", st, err)
	}
	// Incremental: a moves its IPv6 subnet, b leaves, c (IPv4 underlay address) joins the
	// ip table.
	a2 := a
	a2.Subnet6 = netip.MustParsePrefix("fd00:10:244:9::/64")
	c := Peer{IP: netip.MustParseAddr("192.0.2.13"), Subnet: netip.MustParsePrefix("10.244.3.0/24")}
	st, err = g.Update(map[string]Peer{"a": a2, "b": {}, "c": c})
	if err != nil || st != (Stats{Added: 3, Delete: 4}) {
		t.Fatalf("Update = %+v, %v; want 3 added, 4 deleted", st, err)
	}
	got := familyState(t, ns, "ip6")
	if !strings.Contains(got, "2001:db8::11 . fd00:10:244:9::") || strings.Contains(got, "fd00:10:244:1::") || strings.Contains(got, "2001:db8::12") {
		t.Errorf("ip6 table after the update:\n%s", got)
	}
	if v4 := tableState(t, ns); !strings.Contains(v4, "192.0.2.13 . 10.244.3.0") {
		t.Errorf("ip table lacks the IPv4 peer:\n%s", v4)
	}
	// Drift in the ip6 table is repaired like in the ip one.
	want = familyState(t, ns, "ip6")
	for _, c := range []struct {
		name, cmd string
		rebuilt   bool
	}{
		{"table deleted", "nft delete table ip6 netagent", true},
		{"rule added", "nft add rule ip6 netagent vxlan-input accept", true},
		{"element deleted", "nft delete element ip6 netagent vxlan-peers-self { 2001:db8::11 . 2001:db8::11 }", false},
		{"element added", "nft add element ip6 netagent vxlan-peers-self { 2001:db8::66 . 2001:db8::66 }", false},
	} {
		f := strings.Fields(c.cmd)
		ns.MustRun(t, f[0], f[1:]...)
		st, err := g.Resync()
		if err != nil || !st.Changed() || st.Rebuilt != c.rebuilt {
			t.Errorf("%s: Resync = %+v, %v", c.name, st, err)
		}
		if got := familyState(t, ns, "ip6"); got != want {
			t.Errorf("%s: not repaired:\n%s\nwant:\n%s", c.name, got, want)
		}
	}
	// IPv4 pods over an IPv4 underlay: no ip6 table; a peer's IPv6 address is no element.
	if st, err := g.Set(Spec{Port: 8472, Network: network, SubnetLen: 24, Peers: map[string]Peer{"a": a, "c": c}}); err != nil || !st.Rebuilt {
		t.Fatalf("Set(IPv4 only) = %+v, %v; want a rebuild", st, err)
	}
	if out := ns.MustRun(t, "nft", "list", "tables"); strings.Contains(out, "ip6 "+Table) {
		t.Errorf("ip6 table left for an IPv4-only cluster:\n%s", out)
	}
	// IPv6-only pods over an IPv6 underlay, then no VXLAN: both tables go.
	if _, err := g.Set(Spec{Port: 8472, SubnetLen6: 64, Network6: network6, Underlay6: true, Peers: map[string]Peer{"a": a}}); err != nil {
		t.Fatal(err)
	}
	if got := familyState(t, ns, "ip6"); !strings.Contains(got, "2001:db8::11 . fd00:10:244:1::") || strings.Contains(got, "10.244.1.0") {
		t.Errorf("IPv6-only ip6 table:\n%s", got)
	}
	if st, err := g.Sync(Spec{}); err != nil || !st.Rebuilt {
		t.Fatalf("port 0: %+v %v", st, err)
	}
	if out := ns.MustRun(t, "nft", "list", "tables"); strings.Contains(out, Table) {
		t.Fatalf("tables left after port 0:\n%s", out)
	}
}

// Thousands of peers over an IPv6 underlay, dual-stack (the largest elements), in one
// transaction.
func TestManyPeersIPv6Underlay(t *testing.T) {
	g, ns := newGuard(t)
	many := map[string]Peer{}
	for i := range 5000 {
		many[fmt.Sprintf("n%d", i)] = Peer{
			IP:      netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 14: byte(i >> 8), 15: byte(i)}),
			Subnet:  netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(100 + i>>8), byte(i), 0}), 24),
			Subnet6: netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%x::/64", i+1)),
		}
	}
	spec := Spec{Port: 8472, Network: network, SubnetLen: 24, Network6: network6, SubnetLen6: 64, Underlay6: true, Peers: many}
	if _, err := g.Sync(spec); err != nil {
		t.Fatal(err)
	}
	for _, set := range []string{SetName + selfSuffix, SetName, SetName6} {
		out := ns.MustRun(t, "nft", "list", "set", "ip6", Table, set)
		want := len(many)
		if set == SetName+selfSuffix {
			want *= 2 // the address is both fields
		}
		if got := strings.Count(out, "2001:db8::"); got != want {
			t.Errorf("set %s: %d addresses, want %d", set, got, want)
		}
	}
}

// Random batches of peer changes over a few shared outer addresses, MACs and subnets of
// both families (so elements pass between nodes and several nodes hold one): after each
// Update, a Sync of the same peers (which reads the kernel) must find nothing to change.
func TestUpdateRandom(t *testing.T) {
	g, _ := newGuard(t)
	rng := rand.New(rand.NewPCG(15, 1))
	ips := []string{"192.0.2.11", "192.0.2.12", "198.51.100.7", "2001:db8::11", "2001:db8::12"}
	macs := []string{"", "", "02:00:00:00:00:01"}
	peer := func() Peer {
		if rng.IntN(5) == 0 {
			return Peer{} // gone
		}
		p := Peer{IP: netip.MustParseAddr(ips[rng.IntN(len(ips))]), MAC: macs[rng.IntN(len(macs))]}
		if i := rng.IntN(4); i > 0 {
			p.Subnet = netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", i))
		}
		if i := rng.IntN(4); i > 0 {
			p.Subnet6 = netip.MustParsePrefix(fmt.Sprintf("fd00:0:0:%x::/64", i))
		}
		return p
	}
	spec := func(nodes map[string]Peer) Spec {
		return Spec{Port: 8472, Network: network, SubnetLen: 24, SubnetLen6: 64, Network6: netip.MustParsePrefix("fd00::/48"), Peers: maps.Clone(nodes)}
	}
	nodes := map[string]Peer{}
	if _, err := g.Sync(spec(nodes)); err != nil {
		t.Fatal(err)
	}
	for round := range 60 {
		batch := map[string]Peer{}
		for range 1 + rng.IntN(4) {
			n := fmt.Sprintf("n%d", rng.IntN(6))
			batch[n] = peer()
		}
		if _, err := g.Update(batch); err != nil {
			t.Fatalf("round %d: Update(%v): %v", round, batch, err)
		}
		for n, p := range batch {
			if len(nodeOf(p).elems(spec(nil))) == 0 {
				delete(nodes, n)
			} else {
				nodes[n] = p
			}
		}
		if st, err := g.Sync(spec(nodes)); err != nil || st.Changed() {
			t.Fatalf("round %d: after Update(%v), Sync = %+v, %v; want no change", round, batch, st, err)
		}
	}
}

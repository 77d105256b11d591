package lease

import (
	"fmt"
	"maps"
	"net/netip"
	"path"
	"slices"
	"strings"
	"testing"
)

func TestPeersTracksChangesPerNode(t *testing.T) {
	p := NewPeers()
	l := func(node, subnet string) Lease {
		return Lease{Node: node, Subnet: netip.MustParsePrefix(subnet), PublicIP: netip.MustParseAddr("192.0.2.1")}
	}
	p.mu.Lock()
	p.replace(map[string]Entry{"k1": {l("a", "10.0.1.0/24"), 1}, "k2": {l("b", "10.0.2.0/24"), 2}}, nil)
	p.mu.Unlock()
	if ch, full := p.Take(); !full || len(ch) != 0 {
		t.Fatalf("after replace: Take() = %v, %v; want full and no per-node changes", ch, full)
	}
	// a moves to a new subnet: put at the new key, then delete the old one.
	p.mu.Lock()
	p.put("k3", l("a", "10.0.3.0/24"), 3)
	p.del("k1")
	p.mu.Unlock()
	ch, full := p.Take()
	if full || len(ch) != 1 || ch[0].Node != "a" || ch[0].Subnet.String() != "10.0.3.0/24" {
		t.Fatalf("after a moved: Take() = %v, %v; want a at 10.0.3.0/24", ch, full)
	}
	// b leaves.
	p.mu.Lock()
	p.del("k2")
	p.mu.Unlock()
	ch, _ = p.Take()
	if len(ch) != 1 || ch[0].Node != "b" || ch[0].Subnet.IsValid() {
		t.Fatalf("after b left: Take() = %v; want a deletion of b", ch)
	}
	var nodes []string
	for _, x := range p.Snapshot() {
		nodes = append(nodes, x.Node)
	}
	if !slices.Equal(nodes, []string{"a"}) || p.Len() != 1 {
		t.Errorf("Snapshot nodes = %v, Len %d; want [a], 1", nodes, p.Len())
	}
}

func TestRulesCheck(t *testing.T) {
	r := Rules{Network: netip.MustParsePrefix("10.244.0.0/16"), SubnetLen: 24, Self: "me", SelfIP: netip.MustParseAddr("192.0.2.1"), SelfWGKey: wgKey}
	tests := []struct {
		name, node, subnet, ip, want string
		wgKey                        string
	}{
		{"good", "n2", "10.244.2.0/24", "192.0.2.2", "", ""},
		{"good, other length", "n2", "10.244.2.0/25", "192.0.2.2", "", ""},
		{"broadcast", "n2", "10.244.2.0/24", "255.255.255.255", "not a unicast", ""},
		{"loopback", "n2", "10.244.2.0/24", "127.0.0.1", "not a unicast", ""},
		{"link-local", "n2", "10.244.2.0/24", "169.254.1.1", "not a unicast", ""},
		{"multicast", "n2", "10.244.2.0/24", "224.0.0.1", "not a unicast", ""},
		{"unspecified", "n2", "10.244.2.0/24", "0.0.0.0", "not a unicast", ""},
		{"ours", "n2", "10.244.2.0/24", "192.0.2.1", "this node's own", ""},
		{"our own lease", "me", "10.244.1.0/24", "192.0.2.1", "", ""},
		{"outside the network", "n2", "10.99.2.0/24", "192.0.2.2", "outside the network", ""},
		{"covers the network", "n2", "10.0.0.0/8", "192.0.2.2", "outside the network", ""},
		{"our WireGuard key", "n2", "10.244.2.0/24", "192.0.2.2", "WireGuard public key is this node's own", wgKey},
		{"our own WireGuard key in our lease", "me", "10.244.1.0/24", "192.0.2.1", "", wgKey},
		{"another WireGuard key", "n2", "10.244.2.0/24", "192.0.2.2", "", "zo060cy2M+x7cMF4FKXHbs0CloUFDTRHRboFhw5YfVk="},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := Lease{Node: tt.node, Subnet: netip.MustParsePrefix(tt.subnet), PublicIP: netip.MustParseAddr(tt.ip)}
			if tt.wgKey != "" {
				l.WGPublicKey, l.WGPort = tt.wgKey, 51820
			}
			err := r.Check(l)
			if (tt.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.want)) {
				t.Errorf("Check(%+v) = %v, want %q", l, err, tt.want)
			}
		})
	}
}

func TestDecodeKey(t *testing.T) {
	v := `{"node":"n1","subnet":"10.244.1.0/24","publicIP":"192.0.2.1","backend":"vxlan","vtepMAC":"0a:00:00:00:00:01"}`
	tests := []struct{ key, want string }{
		{"/netagent/subnets/10.244.1.0-24", ""},
		{"/netagent/subnets/10.244.9.0-24", "its key 10.244.9.0/24"},
		{"/netagent/subnets/10.244.1.0-25", "its key 10.244.1.0/25"},
		{"/netagent/subnets/10.244.1.7-24", "its key"},
		{"/netagent/subnets/garbage", "no '-'"},
	}
	for _, tt := range tests {
		_, err := DecodeKey(tt.key, []byte(v))
		if (tt.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.want)) {
			t.Errorf("DecodeKey(%s) = %v, want %q", tt.key, err, tt.want)
		}
	}
}

func FuzzDecodeKey(f *testing.F) {
	f.Add("/netagent/subnets/10.244.1.0-24", []byte(`{"node":"n1","subnet":"10.244.1.0/24","publicIP":"192.0.2.1"}`))
	f.Add("/netagent/subnets/fd00:0:0:1::-64", []byte(`{"node":"n1","subnet6":"fd00:0:0:1::/64","publicIP6":"2001:db8::1"}`))
	f.Fuzz(func(t *testing.T, key string, b []byte) {
		l, err := DecodeKey(key, b)
		if err != nil {
			return
		}
		if s, _ := ParseSubnetKey(path.Base(key)); s != l.Primary() || l.Validate() != nil {
			t.Fatalf("DecodeKey(%q, %s) = %+v, a lease its key does not name or that is invalid", key, b, l)
		}
	})
}

// Overlapping leases are settled the same way whatever the order they arrive in, and a
// forged key cannot displace a live node's lease.
func TestPeersSettleOverlaps(t *testing.T) {
	r := Rules{Network: netip.MustParsePrefix("10.244.0.0/16"), SubnetLen: 24, Self: "me", SelfIP: netip.MustParseAddr("192.0.2.1")}
	type put struct {
		key, node, subnet string
		rev               int64
	}
	victim := put{"k/10.244.2.0-24", "victim", "10.244.2.0/24", 10}
	tests := []struct {
		name    string
		puts    []put
		want    map[string]string // node -> subnet in use
		ignored []string          // keys not used
	}{
		{"longer prefix inside a live subnet", []put{victim, {"k/10.244.2.0-25", "evil", "10.244.2.0/25", 20}},
			map[string]string{"victim": "10.244.2.0/24"}, []string{"k/10.244.2.0-25"}},
		{"longer prefix written first", []put{{"k/10.244.2.0-25", "evil", "10.244.2.0/25", 5}, victim},
			map[string]string{"victim": "10.244.2.0/24"}, []string{"k/10.244.2.0-25"}},
		{"shorter prefix over live subnets", []put{victim, {"k/10.244.0.0-20", "evil", "10.244.0.0/20", 1}},
			map[string]string{"victim": "10.244.2.0/24"}, []string{"k/10.244.0.0-20"}},
		{"a second key naming the live node", []put{victim, {"k/10.244.7.0-24", "victim", "10.244.7.0/24", 30}},
			map[string]string{"victim": "10.244.2.0/24"}, nil},
		{"odd lengths: first created wins", []put{{"k/10.244.8.0-23", "b", "10.244.8.0/23", 7}, {"k/10.244.8.0-25", "a", "10.244.8.0/25", 3}},
			map[string]string{"a": "10.244.8.0/25"}, []string{"k/10.244.8.0-23"}},
		{"same subnet, two keys (kube): first created wins", []put{{"node-b", "b", "10.244.3.0/24", 2}, {"node-a", "a", "10.244.3.0/24", 9}},
			map[string]string{"b": "10.244.3.0/24"}, []string{"node-a"}},
		{"odd subnet with no overlap is used", []put{victim, {"k/10.244.9.0-25", "odd", "10.244.9.0/25", 40}},
			map[string]string{"victim": "10.244.2.0/24", "odd": "10.244.9.0/25"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, order := range [][]put{tt.puts, reversed(tt.puts)} {
				p := NewPeersWith(r)
				for _, x := range order {
					p.Set(x.key, Lease{Node: x.node, Subnet: netip.MustParsePrefix(x.subnet), PublicIP: netip.MustParseAddr("192.0.2.9")}, x.rev)
				}
				got := map[string]string{}
				for _, l := range p.Snapshot() {
					got[l.Node] = l.Subnet.String()
				}
				if !maps.Equal(got, tt.want) {
					t.Errorf("in use = %v, want %v", got, tt.want)
				}
				bad := slices.Sorted(maps.Keys(p.Invalids()))
				if !slices.Equal(bad, tt.ignored) && !(len(bad) == 0 && len(tt.ignored) == 0) {
					t.Errorf("ignored = %v, want %v", p.Invalids(), tt.ignored)
				}
			}
		})
	}
	// The winner leaves: the loser is used from then on.
	p := NewPeersWith(r)
	p.Set(victim.key, Lease{Node: "victim", Subnet: netip.MustParsePrefix(victim.subnet), PublicIP: netip.MustParseAddr("192.0.2.9")}, victim.rev)
	p.Set("k/10.244.2.0-25", Lease{Node: "late", Subnet: netip.MustParsePrefix("10.244.2.0/25"), PublicIP: netip.MustParseAddr("192.0.2.8")}, 20)
	p.Take()
	p.Delete(victim.key)
	ch, _ := p.Take()
	if got := p.Snapshot(); len(got) != 1 || got[0].Node != "late" || len(ch) != 2 || len(p.Invalids()) != 0 {
		t.Errorf("after the winner left: in use %v, changed %v, ignored %v; want only late", got, ch, p.Invalids())
	}
}

func TestRulesCheck6(t *testing.T) {
	r := Rules{Network: netip.MustParsePrefix("10.244.0.0/16"), SubnetLen: 24, Network6: netip.MustParsePrefix("fd00:10:244::/48"), SubnetLen6: 64,
		Self: "me", SelfIP: netip.MustParseAddr("192.0.2.1"), SelfIP6: netip.MustParseAddr("2001:db8::1")}
	v6only := Rules{Network6: r.Network6, SubnetLen6: 64, Self: "me", SelfIP6: r.SelfIP6}
	tests := []struct {
		name  string
		rules Rules
		in    string
		want  string
	}{
		{"dual", r, `{"node":"n2","subnet":"10.244.2.0/24","subnet6":"fd00:10:244:2::/64","publicIP":"192.0.2.2","publicIP6":"2001:db8::2"}`, ""},
		{"dual, IPv4 underlay only", r, `{"node":"n2","subnet":"10.244.2.0/24","subnet6":"fd00:10:244:2::/64","publicIP":"192.0.2.2"}`, ""},
		{"IPv6 only", v6only, `{"node":"n2","subnet6":"fd00:10:244:2::/64","publicIP6":"2001:db8::2"}`, ""},
		{"v6 subnet outside", r, `{"node":"n2","subnet":"10.244.2.0/24","subnet6":"fd00:99::/64","publicIP":"192.0.2.2"}`, "outside the network fd00:10:244::/48"},
		{"v6 subnet covers the network", r, `{"node":"n2","subnet":"10.244.2.0/24","subnet6":"fd00::/32","publicIP":"192.0.2.2"}`, "outside the network"},
		{"v4 in subnet6", r, `{"node":"n2","subnet":"10.244.2.0/24","subnet6":"10.244.3.0/24","publicIP":"192.0.2.2"}`, "invalid IPv6 subnet"},
		{"v4-mapped subnet6", r, `{"node":"n2","subnet":"10.244.2.0/24","subnet6":"::ffff:10.244.3.0/120","publicIP":"192.0.2.2"}`, "invalid IPv6 subnet"},
		{"v6 in subnet", r, `{"node":"n2","subnet":"fd00:10:244:2::/64","publicIP":"192.0.2.2"}`, "invalid subnet"},
		{"subnet6 host bits", r, `{"node":"n2","subnet":"10.244.2.0/24","subnet6":"fd00:10:244:2::1/64","publicIP":"192.0.2.2"}`, "invalid IPv6 subnet"},
		{"v6 family off", Rules{Network: r.Network, SubnetLen: 24}, `{"node":"n2","subnet":"10.244.2.0/24","subnet6":"fd00:10:244:2::/64","publicIP":"192.0.2.2"}`, "no network of its family"},
		{"v4 family off", v6only, `{"node":"n2","subnet":"10.244.2.0/24","subnet6":"fd00:10:244:2::/64","publicIP6":"2001:db8::2"}`, "no network of its family"},
		{"v4 in publicIP6", r, `{"node":"n2","subnet":"10.244.2.0/24","publicIP":"192.0.2.2","publicIP6":"192.0.2.3"}`, "invalid IPv6 public IP"},
		{"link-local publicIP6", r, `{"node":"n2","subnet":"10.244.2.0/24","publicIP6":"fe80::1"}`, "invalid IPv6 public IP"},
		{"multicast publicIP6", r, `{"node":"n2","subnet":"10.244.2.0/24","publicIP6":"ff02::1"}`, "invalid IPv6 public IP"},
		{"loopback publicIP6", r, `{"node":"n2","subnet":"10.244.2.0/24","publicIP6":"::1"}`, "invalid IPv6 public IP"},
		{"mapped publicIP6", r, `{"node":"n2","subnet":"10.244.2.0/24","publicIP6":"::ffff:192.0.2.2"}`, "invalid IPv6 public IP"},
		{"v6 in publicIP", r, `{"node":"n2","subnet":"10.244.2.0/24","publicIP":"2001:db8::2"}`, "invalid public IP"},
		{"no public IP", r, `{"node":"n2","subnet":"10.244.2.0/24"}`, "no public IP"},
		{"no subnet", r, `{"node":"n2","publicIP":"192.0.2.2"}`, "no subnet"},
		{"our IPv6 underlay", r, `{"node":"n2","subnet":"10.244.2.0/24","publicIP":"192.0.2.2","publicIP6":"2001:db8::1"}`, "this node's own"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, err := Decode([]byte(tt.in))
			if err == nil {
				err = tt.rules.Check(l)
			}
			if (tt.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.want)) {
				t.Errorf("Check(%s) = %v, want %q", tt.in, err, tt.want)
			}
		})
	}
}

// A forged lease cannot take or cut into a live node's IPv6 subnet, whatever the order.
func TestPeersSettleOverlaps6(t *testing.T) {
	r := Rules{Network: netip.MustParsePrefix("10.244.0.0/16"), SubnetLen: 24, Network6: netip.MustParsePrefix("fd00::/48"), SubnetLen6: 64, Self: "me"}
	type put struct {
		key, node, subnet, subnet6 string
		rev                        int64
	}
	victim := put{"k/10.244.2.0-24", "victim", "10.244.2.0/24", "fd00:0:0:2::/64", 10}
	tests := []struct {
		name    string
		puts    []put
		want    map[string]string // node -> its IPv6 subnet in use
		ignored []string
	}{
		{"same IPv6 subnet, other IPv4 subnet", []put{victim, {"k/10.244.3.0-24", "evil", "10.244.3.0/24", "fd00:0:0:2::/64", 20}},
			map[string]string{"victim": "fd00:0:0:2::/64"}, []string{"k/10.244.3.0-24"}},
		{"longer IPv6 prefix inside", []put{victim, {"k/10.244.3.0-24", "evil", "10.244.3.0/24", "fd00:0:0:2::/80", 5}},
			map[string]string{"victim": "fd00:0:0:2::/64"}, []string{"k/10.244.3.0-24"}},
		{"shorter IPv6 prefix over it", []put{victim, {"k/10.244.3.0-24", "evil", "10.244.3.0/24", "fd00::/56", 1}},
			map[string]string{"victim": "fd00:0:0:2::/64"}, []string{"k/10.244.3.0-24"}},
		{"IPv6 only, same subnet: first created wins", []put{{"k/fd00:0:0:5::-64", "b", "", "fd00:0:0:5::/64", 2}, {"k2/fd00:0:0:5::-64", "a", "", "fd00:0:0:5::/64", 9}},
			map[string]string{"b": "fd00:0:0:5::/64"}, []string{"k2/fd00:0:0:5::-64"}},
		{"distinct subnets both used", []put{victim, {"k/10.244.3.0-24", "other", "10.244.3.0/24", "fd00:0:0:3::/64", 20}},
			map[string]string{"victim": "fd00:0:0:2::/64", "other": "fd00:0:0:3::/64"}, nil},
	}
	prefix := func(s string) netip.Prefix {
		if s == "" {
			return netip.Prefix{}
		}
		return netip.MustParsePrefix(s)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, order := range [][]put{tt.puts, reversed(tt.puts)} {
				p := NewPeersWith(r)
				for _, x := range order {
					p.Set(x.key, Lease{Node: x.node, Subnet: prefix(x.subnet), Subnet6: prefix(x.subnet6), PublicIP6: netip.MustParseAddr("2001:db8::9")}, x.rev)
				}
				got := map[string]string{}
				for _, l := range p.Snapshot() {
					got[l.Node] = l.Subnet6.String()
				}
				if !maps.Equal(got, tt.want) {
					t.Errorf("in use = %v, want %v", got, tt.want)
				}
				bad := slices.Sorted(maps.Keys(p.Invalids()))
				if !slices.Equal(bad, tt.ignored) && !(len(bad) == 0 && len(tt.ignored) == 0) {
					t.Errorf("ignored = %v, want %v", p.Invalids(), tt.ignored)
				}
			}
		})
	}
}

func reversed[T any](s []T) []T {
	out := slices.Clone(s)
	slices.Reverse(out)
	return out
}

// The view keeps each lease once and hands out that one (the planner keeps what it is
// given, so a copy here would be a second copy of every lease): Snapshot, Take and a
// re-Set of the same lease give the same pointer, and a changed lease is a new value, the
// old one left as it was for whoever holds it.
func TestPeersShareLeases(t *testing.T) {
	p := NewPeers()
	a := Lease{Node: "a", Subnet: netip.MustParsePrefix("10.0.1.0/24"), PublicIP: netip.MustParseAddr("192.0.2.1")}
	p.Set("k1", a, 1)
	ch, _ := p.Take()
	snap := p.Snapshot()
	if len(ch) != 1 || len(snap) != 1 || ch[0] != snap[0] || *ch[0] != a {
		t.Fatalf("Take() = %v, Snapshot() = %v; want one shared lease %+v", ch, snap, a)
	}
	p.Set("k1", a, 1) // a renewal: nothing changes
	if again := p.Snapshot(); again[0] != snap[0] {
		t.Errorf("after a renewal Snapshot()[0] = %p, want the same lease %p", again[0], snap[0])
	}
	moved := a
	moved.PublicIP = netip.MustParseAddr("192.0.2.2")
	p.Set("k1", moved, 1)
	ch, _ = p.Take()
	if len(ch) != 1 || *ch[0] != moved || *snap[0] != a {
		t.Errorf("after a change Take() = %v and the old lease is %+v; want %+v and %+v unchanged", ch, *snap[0], moved, a)
	}
}

// FuzzPeers applies a sequence of store events and checks, after each, that the view
// equals one built from scratch out of the same keys (settling does not depend on the
// order of events), that Take reported every node whose lease changed, and that every
// lease it hands out is one the store holds under one of the node's keys.
func FuzzPeers(f *testing.F) {
	f.Add([]byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15})
	f.Add([]byte{3, 3, 3, 19, 35, 51, 67, 83, 99, 115, 131, 147, 163, 179, 195, 211, 227, 243})
	f.Add([]byte{0x10, 0x21, 0x32, 0x43, 0x54, 0x65, 0x76, 0x87, 0x98, 0xa9, 0xba, 0xcb, 0xdc, 0xed, 0xfe})
	r := Rules{Network: netip.MustParsePrefix("10.244.0.0/16"), SubnetLen: 24, Network6: netip.MustParsePrefix("fd00::/48"), SubnetLen6: 64, Self: "me"}
	f.Fuzz(func(t *testing.T, ops []byte) {
		p := NewPeersWith(r)
		type stored struct {
			l   Lease
			rev int64
		}
		store := map[string]stored{} // key -> what the store holds (valid leases only)
		before := map[string]Lease{} // node -> lease in use after the last Take
		for i := 0; i+1 < len(ops); i += 2 {
			op, arg := ops[i], ops[i+1]
			key := fmt.Sprintf("k%d", op%6)
			switch op >> 6 {
			case 0, 1: // a put: node, subnet, length and IPv6 subnet from arg
				l := Lease{Node: fmt.Sprintf("n%d", arg%4), Subnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, arg >> 5, 0}), 24),
					PublicIP: netip.AddrFrom4([4]byte{192, 0, 2, 1 + arg%7})}
				if arg&0x10 != 0 {
					l.Subnet = netip.PrefixFrom(l.Subnet.Addr(), 23).Masked()
				}
				if arg&0x08 != 0 {
					l.Subnet6 = netip.PrefixFrom(netip.AddrFrom16([16]byte{0: 0xfd, 7: arg >> 6}), 64)
				}
				rev := int64(i)
				if s, ok := store[key]; ok {
					rev = s.rev // a key keeps its creation revision
				}
				store[key] = stored{l, rev}
				p.Set(key, l, rev)
			case 2:
				delete(store, key)
				p.Delete(key)
			default:
				delete(store, key)
				p.Invalid(key, "bad")
			}
			changed, _ := p.Take()
			fresh := NewPeersWith(r)
			for k, s := range store {
				fresh.Set(k, s.l, s.rev)
			}
			got, want := p.Snapshot(), fresh.Snapshot()
			if len(got) != len(want) {
				t.Fatalf("op %d: %d nodes in use, from scratch %d: %v vs %v", i, len(got), len(want), got, want)
			}
			now := map[string]Lease{}
			for j := range got {
				if *got[j] != *want[j] {
					t.Fatalf("op %d: node %s uses %+v, from scratch %+v", i, got[j].Node, *got[j], *want[j])
				}
				if l, ok := p.Node(got[j].Node); !ok || l != *got[j] {
					t.Fatalf("op %d: Node(%s) = %+v, %v; Snapshot has %+v", i, got[j].Node, l, ok, *got[j])
				}
				now[got[j].Node] = *got[j]
			}
			reported := map[string]bool{}
			for _, l := range changed {
				reported[l.Node] = true
				if cur, ok := now[l.Node]; ok != !l.Gone() || ok && cur != *l {
					t.Fatalf("op %d: Take reported %+v for %s, the view has %+v (%v)", i, *l, l.Node, cur, ok)
				}
			}
			for n := range maps.Keys(now) {
				if now[n] != before[n] && !reported[n] {
					t.Fatalf("op %d: %s changed from %+v to %+v, not reported", i, n, before[n], now[n])
				}
			}
			for n := range maps.Keys(before) {
				if _, ok := now[n]; !ok && !reported[n] {
					t.Fatalf("op %d: %s left, not reported", i, n)
				}
			}
			// A node with several keys in use (not ignored) uses its first created one.
			bad := p.Invalids()
			first := map[string]string{} // node -> key
			for k, s := range store {
				n := s.l.Node
				if _, ignored := bad[k]; ignored {
					continue
				}
				if f, ok := first[n]; !ok || s.rev < store[f].rev || s.rev == store[f].rev && k < f {
					first[n] = k
				}
			}
			if len(first) != len(now) {
				t.Fatalf("op %d: nodes with a key in use %v, in the view %v", i, first, now)
			}
			for n, k := range first {
				if now[n] != store[k].l {
					t.Fatalf("op %d: %s uses %+v, its first created key in use %s holds %+v", i, n, now[n], k, store[k].l)
				}
			}
			before = now
		}
	})
}

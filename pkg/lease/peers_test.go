package lease

import (
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

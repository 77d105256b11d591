package config

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	tests := []struct {
		name, in string
		field    string // "" = valid
	}{
		{"minimal", `{"network":"10.244.0.0/16"}`, ""},
		{"host-gw", `{"network":"10.244.0.0/16","subnetLen":26,"backend":{"type":"host-gw"}}`, ""},
		{"hybrid", `{"network":"10.244.0.0/16","backend":{"type":"hybrid","vni":42,"port":4789},"mtu":1400}`, ""},
		{"bounds", `{"network":"10.244.0.0/16","subnetMin":"10.244.10.0","subnetMax":"10.244.20.0"}`, ""},
		{"no network", `{}`, "network"},
		{"v6", `{"network":"fd00::/48"}`, "network"},
		{"host bits", `{"network":"10.244.3.0/16"}`, "network"},
		{"loopback", `{"network":"127.0.0.0/16"}`, "network"},
		{"too large", `{"network":"0.0.0.0/0"}`, "network"},
		{"subnetLen too short", `{"network":"10.244.0.0/16","subnetLen":16}`, "subnetLen"},
		{"subnetLen too long", `{"network":"10.244.0.0/16","subnetLen":31}`, "subnetLen"},
		{"subnetMin outside", `{"network":"10.244.0.0/16","subnetMin":"10.245.0.0"}`, "subnetMin"},
		{"subnetMax unaligned", `{"network":"10.244.0.0/16","subnetMax":"10.244.5.7"}`, "subnetMax"},
		{"min after max", `{"network":"10.244.0.0/16","subnetMin":"10.244.9.0","subnetMax":"10.244.2.0"}`, "subnetMin"},
		{"unknown backend", `{"network":"10.244.0.0/16","backend":{"type":"udp"}}`, "backend.type"},
		{"vni", `{"network":"10.244.0.0/16","backend":{"type":"vxlan","vni":16777216}}`, "backend.vni"},
		{"port", `{"network":"10.244.0.0/16","backend":{"type":"vxlan","port":70000}}`, "backend.port"},
		{"vni 0", `{"network":"10.244.0.0/16","backend":{"type":"vxlan","vni":0}}`, "backend.vni"},
		{"port 0", `{"network":"10.244.0.0/16","backend":{"type":"hybrid","port":0}}`, "backend.port"},
		{"host-gw with vni", `{"network":"10.244.0.0/16","backend":{"type":"host-gw","vni":3}}`, "backend"},
		{"mtu", `{"network":"10.244.0.0/16","mtu":100}`, "mtu"},
		{"dual", `{"network":"10.244.0.0/16","ipv6Network":"fd00:10:244::/48"}`, ""},
		{"dual no masquerade", `{"network":"10.244.0.0/16","ipv6Network":"2001:db8:1::/48","ipv6SubnetLen":80,"ipv6Masquerade":false}`, ""},
		{"ipv6 only", `{"ipv6Network":"fd00:10:244::/48","backend":{"type":"host-gw"}}`, ""},
		{"ipv6 only /126", `{"ipv6Network":"fd00::/120","ipv6SubnetLen":126}`, ""},
		{"v4 in ipv6Network", `{"network":"10.244.0.0/16","ipv6Network":"10.245.0.0/16"}`, "ipv6Network"},
		{"v4-mapped ipv6Network", `{"ipv6Network":"::ffff:10.0.0.0/104"}`, "ipv6Network"},
		{"v6 host bits", `{"ipv6Network":"fd00::1/48"}`, "ipv6Network"},
		{"v6 link-local", `{"ipv6Network":"fe80::/48"}`, "ipv6Network"},
		{"v6 multicast", `{"ipv6Network":"ff00::/48"}`, "ipv6Network"},
		{"v6 too large", `{"ipv6Network":"::/0"}`, "ipv6Network"},
		{"v6 subnetLen not longer", `{"ipv6Network":"fd00::/64","ipv6SubnetLen":64}`, "ipv6SubnetLen"},
		{"v6 subnetLen too long", `{"ipv6Network":"fd00::/48","ipv6SubnetLen":127}`, "ipv6SubnetLen"},
		{"v6 subnetLen too short", `{"ipv6Network":"fd00::/32","ipv6SubnetLen":40}`, "ipv6SubnetLen"},
		{"v6 subnetLen without network", `{"network":"10.244.0.0/16","ipv6SubnetLen":64}`, "ipv6SubnetLen"},
		{"masquerade without network", `{"network":"10.244.0.0/16","ipv6Masquerade":false}`, "ipv6Masquerade"},
		{"subnetLen in ipv6 only", `{"ipv6Network":"fd00::/48","subnetLen":24}`, "subnetLen"},
		{"subnetMin in ipv6 only", `{"ipv6Network":"fd00::/48","subnetMin":"10.0.1.0"}`, "subnetMin"},
		{"wireguard", `{"network":"10.244.0.0/16","backend":{"type":"wireguard"}}`, ""},
		{"wireguard port psk", `{"network":"10.244.0.0/16","backend":{"type":"wireguard","port":51000,"pskFile":"/etc/netagent/psk"}}`, ""},
		{"wireguard port", `{"network":"10.244.0.0/16","backend":{"type":"wireguard","port":65536}}`, "backend.port"},
		{"wireguard port 0", `{"network":"10.244.0.0/16","backend":{"type":"wireguard","port":0}}`, "backend.port"},
		{"wireguard vni", `{"network":"10.244.0.0/16","backend":{"type":"wireguard","vni":4}}`, "backend.vni"},
		{"wireguard psk relative", `{"network":"10.244.0.0/16","backend":{"type":"wireguard","pskFile":"psk"}}`, "backend.pskFile"},
		{"wireguard psk unclean", `{"network":"10.244.0.0/16","backend":{"type":"wireguard","pskFile":"/etc/../psk"}}`, "backend.pskFile"},
		{"wireguard dual stack", `{"network":"10.244.0.0/16","ipv6Network":"fd00::/48","backend":{"type":"wireguard"}}`, ""},
		{"wireguard IPv6-only", `{"ipv6Network":"fd00::/48","backend":{"type":"wireguard","port":51000}}`, ""},
		{"wireguard IPv6 masquerade on", `{"ipv6Network":"fd00::/48","ipv6Masquerade":true,"backend":{"type":"wireguard"}}`, ""},
		{"wireguard IPv6 without masquerade", `{"network":"10.244.0.0/16","ipv6Network":"2001:db8:1::/48","ipv6Masquerade":false,"backend":{"type":"wireguard"}}`, ""},
		{"wireguard v4 ipv6Network", `{"ipv6Network":"10.244.0.0/16","backend":{"type":"wireguard"}}`, "ipv6Network"},
		{"psk without wireguard", `{"network":"10.244.0.0/16","backend":{"type":"vxlan","pskFile":"/etc/psk"}}`, "backend.pskFile"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n, err := Parse([]byte(tt.in))
			if tt.field == "" {
				if err != nil {
					t.Fatalf("Parse() = %v", err)
				}
				if n.HasV4() && n.Subnets() < 1 {
					t.Errorf("Subnets() = %d", n.Subnets())
				}
				if n.HasV6() && n.Subnets6() < 1 {
					t.Errorf("Subnets6() = %d", n.Subnets6())
				}
				return
			}
			var fe *FieldError
			if !errors.As(err, &fe) || fe.Field != tt.field {
				t.Errorf("Parse() = %v, want an error on field %q", err, tt.field)
			}
		})
	}
}

func TestWireGuardDefaults(t *testing.T) {
	n, err := Parse([]byte(`{"network":"10.244.0.0/16","backend":{"type":"wireguard"}}`))
	if err != nil {
		t.Fatal(err)
	}
	if n.Backend.Port != DefaultWireGuardPort || n.Backend.VNI != 0 {
		t.Errorf("Parse(wireguard).Backend = %+v, want port %d and no VNI", n.Backend, DefaultWireGuardPort)
	}
}

func TestParseRejectsTypos(t *testing.T) {
	_, err := Parse([]byte(`{"network":"10.244.0.0/16","backnd":{"type":"vxlan"}}`))
	if err == nil || !strings.Contains(err.Error(), "backnd") {
		t.Errorf("Parse() = %v, want unknown field backnd", err)
	}
}

func TestSubnets(t *testing.T) {
	n, err := Parse([]byte(`{"network":"10.244.0.0/16"}`))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := n.Subnets(), 255; got != want {
		t.Errorf("Subnets() = %d, want %d", got, want)
	}
	if got := n.SubnetAt(0).String(); got != "10.244.1.0/24" {
		t.Errorf("SubnetAt(0) = %s", got)
	}
	if got := n.SubnetAt(254).String(); got != "10.244.255.0/24" {
		t.Errorf("SubnetAt(254) = %s", got)
	}
	if !n.Contains(n.SubnetAt(7)) {
		t.Errorf("Contains(SubnetAt(7)) = false")
	}
	if n.Contains(mustPrefix("10.244.7.0/25")) {
		t.Error("Contains(a /25) = true, want false")
	}
	if n.Contains(mustPrefix("10.244.0.0/24")) {
		t.Error("Contains(first subnet) = true, but it is below subnetMin")
	}
}

func TestSubnets6(t *testing.T) {
	tests := []struct {
		net        string
		len        int
		count      uint64
		first, big string
	}{
		{"fd00:10:244::/48", 64, 1<<16 - 1, "fd00:10:244:1::/64", "fd00:10:244:ffff::/64"},
		{"fd00::/120", 126, 63, "fd00::4/126", "fd00::fc/126"},
		{"fd00::/32", 96, 1<<62 - 1, "fd00:0:0:0:0:1::/96", "fd00:0:3fff:ffff:ffff:ffff::/96"},
	}
	for _, tt := range tests {
		n := Network{IPv6Network: mustPrefix(tt.net), IPv6SubnetLen: tt.len}
		n.Default()
		if err := n.Validate(); err != nil {
			t.Fatalf("Validate(%s) = %v", tt.net, err)
		}
		if got := n.Subnets6(); got != tt.count {
			t.Errorf("%s: Subnets6() = %d, want %d", tt.net, got, tt.count)
		}
		if got := n.Subnet6At(0); got != mustPrefix(tt.first) {
			t.Errorf("%s: Subnet6At(0) = %s, want %s", tt.net, got, tt.first)
		}
		if got := n.Subnet6At(tt.count - 1); got != mustPrefix(tt.big) || !n.Contains(got) {
			t.Errorf("%s: Subnet6At(%d) = %s (Contains %v), want %s", tt.net, tt.count-1, got, n.Contains(got), tt.big)
		}
		if n.Contains(netip.PrefixFrom(n.IPv6Network.Addr(), tt.len)) {
			t.Errorf("%s: Contains(first subnet) = true", tt.net)
		}
		if n.Contains(mustPrefix("10.244.1.0/24")) {
			t.Errorf("%s: Contains(an IPv4 subnet) = true in an IPv6-only config", tt.net)
		}
	}
}

func TestParseMasquerade6(t *testing.T) {
	for in, want := range map[string]bool{
		`{"network":"10.244.0.0/16"}`:                                                  false,
		`{"ipv6Network":"fd00::/48"}`:                                                  true,
		`{"ipv6Network":"fd00::/48","ipv6Masquerade":true}`:                            true,
		`{"network":"10.244.0.0/16","ipv6Network":"fd00::/48","ipv6Masquerade":false}`: false,
	} {
		n, err := Parse([]byte(in))
		if err != nil {
			t.Fatalf("Parse(%s) = %v", in, err)
		}
		if got := n.Masquerade6(); got != want {
			t.Errorf("Parse(%s).Masquerade6() = %v, want %v", in, got, want)
		}
		if _, err := Parse(n.Marshal()); err != nil {
			t.Errorf("re-parse of %s: %v", n.Marshal(), err)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(`{"network":"10.244.0.0/16","subnetLen":24,"backend":{"type":"vxlan","vni":1,"port":8472}}`))
	f.Add([]byte(`{"network":"10.0.0.0/8","subnetLen":30,"subnetMin":"10.0.0.4","subnetMax":"10.255.255.252","backend":{"type":"hybrid"}}`))
	f.Add([]byte(`{"network":"10.244.0.0/16","ipv6Network":"fd00:10::/32","ipv6SubnetLen":126,"ipv6Masquerade":false}`))
	f.Add([]byte(`{"ipv6Network":"2001:db8::/64","ipv6SubnetLen":65}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		n, err := Parse(b)
		if err != nil {
			return
		}
		if n.HasV6() {
			for _, i := range []uint64{0, n.Subnets6() - 1} {
				if s := n.Subnet6At(i); !n.Contains(s) {
					t.Fatalf("Subnet6At(%d) = %s outside the config %s", i, s, b)
				}
			}
		}
		if !n.HasV4() {
			return
		}
		if n.Subnets() < 1 {
			t.Fatalf("valid config with %d subnets: %s", n.Subnets(), b)
		}
		for _, i := range []int{0, n.Subnets() - 1} {
			s := n.SubnetAt(i)
			if !n.Contains(s) || !n.Network.Contains(s.Addr()) {
				t.Fatalf("SubnetAt(%d) = %s outside the config %s", i, s, b)
			}
		}
		if _, err := Parse(n.Marshal()); err != nil {
			t.Fatalf("re-parse of %s: %v", n.Marshal(), err)
		}
	})
}

func mustPrefix(s string) netip.Prefix { return netip.MustParsePrefix(s) }

package subnetfile

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	v4 := Info{Network: netip.MustParsePrefix("10.244.0.0/16"), Subnet: netip.MustParsePrefix("10.244.7.0/24"), MTU: 1450}
	dual := v4
	dual.Network6, dual.Subnet6 = netip.MustParsePrefix("fd00::/48"), netip.MustParsePrefix("fd00:0:0:7::/64")
	v6 := Info{Network6: dual.Network6, Subnet6: dual.Subnet6, MTU: 1430}
	for _, in := range []Info{v4, dual, v6} {
		p := filepath.Join(t.TempDir(), "dir", "subnet.env")
		if err := Write(p, in); err != nil {
			t.Fatal(err)
		}
		got, err := Read(p)
		if err != nil || got != in {
			t.Fatalf("Read() = %+v, %v; want %+v", got, err, in)
		}
		fi, _ := os.Stat(p)
		if fi.Mode().Perm() != 0o644 {
			t.Errorf("mode = %v, want 0644", fi.Mode().Perm())
		}
	}
}

func TestParse(t *testing.T) {
	tests := []struct{ in, want string }{
		{"NETAGENT_SUBNET=10.1.2.0/24\n", ""},
		{"# comment\nNETAGENT_SUBNET=10.1.2.0/24\nNETAGENT_FUTURE=x\n", ""},
		{"NETAGENT_NETWORK=10.1.0.0/16\n", "NETAGENT_SUBNET is missing"},
		{"NETAGENT_SUBNET=10.1.2.5/24\n", "not a network address"},
		{"NETAGENT_SUBNET=10.1.2.0/24\nNETAGENT_NETWORK=10.9.0.0/16\n", "outside"},
		{"NETAGENT_SUBNET=10.1.2.0/24\nNETAGENT_MTU=9\n", "line 2: NETAGENT_MTU"},
		{"garbage\n", "line 1: want KEY=VALUE"},
		{"NETAGENT_SUBNET=banana\n", "line 1: NETAGENT_SUBNET"},
		{"NETAGENT_IPV6_SUBNET=fd00:0:0:7::/64\n", ""},
		{"NETAGENT_IPV6_SUBNET=fd00:0:0:7::1/64\n", "not a network address"},
		{"NETAGENT_IPV6_SUBNET=10.1.2.0/24\n", "wrong family"},
		{"NETAGENT_SUBNET=fd00:0:0:7::/64\n", "wrong family"},
		{"NETAGENT_IPV6_SUBNET=fd00:0:0:7::/64\nNETAGENT_IPV6_NETWORK=fd99::/48\n", "outside"},
	}
	for _, tt := range tests {
		_, err := Parse([]byte(tt.in))
		if (tt.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.want)) {
			t.Errorf("Parse(%q) = %v, want %q", tt.in, err, tt.want)
		}
	}
}

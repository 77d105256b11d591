package subnetfile

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	p := filepath.Join(t.TempDir(), "dir", "subnet.env")
	in := Info{Network: netip.MustParsePrefix("10.244.0.0/16"), Subnet: netip.MustParsePrefix("10.244.7.0/24"), MTU: 1450}
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
	}
	for _, tt := range tests {
		_, err := Parse([]byte(tt.in))
		if (tt.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.want)) {
			t.Errorf("Parse(%q) = %v, want %q", tt.in, err, tt.want)
		}
	}
}

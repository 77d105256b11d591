package lease

import (
	"net/netip"
	"strings"
	"testing"
)

func TestDecode(t *testing.T) {
	tests := []struct{ in, want string }{
		{`{"node":"n1","subnet":"10.244.1.0/24","publicIP":"192.0.2.1","backend":"vxlan","vtepMAC":"0a:00:00:00:00:01"}`, ""},
		{`{"node":"n1","subnet":"10.244.1.0/24","publicIP":"192.0.2.1","backend":"host-gw"}`, ""},
		{`{"node":"","subnet":"10.244.1.0/24","publicIP":"192.0.2.1"}`, "invalid node name"},
		{`{"node":"a/b","subnet":"10.244.1.0/24","publicIP":"192.0.2.1"}`, "invalid node name"},
		{`{"node":"n1","subnet":"10.244.1.7/24","publicIP":"192.0.2.1"}`, "invalid subnet"},
		{`{"node":"n1","subnet":"10.244.1.0/24","publicIP":"0.0.0.0"}`, "invalid public IP"},
		{`{"node":"n1","subnet":"10.244.1.0/24","publicIP":"192.0.2.1","vtepMAC":"zz"}`, "invalid VTEP MAC"},
		{`{"node":"n1","subnet":"10.244.1.0/24","publicIP":"192.0.2.1","backend":"wireguard","wgPublicKey":"` + wgKey + `","wgPort":51820}`, ""},
		{`{"node":"n1","subnet":"10.244.1.0/24","publicIP":"192.0.2.1","wgPublicKey":"` + wgKey + `"}`, "invalid WireGuard port 0"},
		{`{"node":"n1","subnet":"10.244.1.0/24","publicIP":"192.0.2.1","wgPublicKey":"` + wgKey + `","wgPort":65536}`, "invalid WireGuard port"},
		{`{"node":"n1","subnet":"10.244.1.0/24","publicIP":"192.0.2.1","wgPort":51820}`, "invalid WireGuard public key"},
		{`{"node":"n1","subnet":"10.244.1.0/24","publicIP":"192.0.2.1","wgPublicKey":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","wgPort":1}`, "all zero"},
		{`{"node":"n1","subnet":"10.244.1.0/24","publicIP":"192.0.2.1","wgPublicKey":"not base64 at all, but 44 characters long!!","wgPort":1}`, "invalid WireGuard public key"},
		{`{"node":"n1","subnet":"nope"}`, "decode lease"},
		{`{"node":"n1","subnet":"10.244.1.0/24","subnet6":"fd00:0:0:1::/64","publicIP":"192.0.2.1","publicIP6":"2001:db8::1"}`, ""},
		{`{"node":"n1","subnet6":"fd00:0:0:1::/64","publicIP6":"2001:db8::1"}`, ""},
		{`{"node":"n1","subnet6":"fd00:0:0:1::/64","publicIP":"192.0.2.1"}`, ""},
		{`{"node":"n1","subnet6":"fd00:0:0:1::1/64","publicIP6":"2001:db8::1"}`, "invalid IPv6 subnet"},
		{`{"node":"n1","subnet6":"fe80::/64","publicIP6":"2001:db8::1"}`, "invalid IPv6 subnet"},
		{`{"node":"n1","subnet6":"fd00:0:0:1::/64","publicIP6":"2001:db8::1%eth0"}`, "invalid IPv6 public IP"},
		{`{"node":"n1","subnet6":"fd00:0:0:1::/64"}`, "no public IP"},
		{`[`, "decode lease"},
	}
	for _, tt := range tests {
		_, err := Decode([]byte(tt.in))
		if (tt.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.want)) {
			t.Errorf("Decode(%s) = %v, want %q", tt.in, err, tt.want)
		}
	}
}

// wgKey is a valid public key (of the private key of 32 0x01 bytes).
const wgKey = "pOCSkrZRwni5dyxWn1+puxPZBrRqtoyd+dwrRAn4ogk="

func TestSubnetKey(t *testing.T) {
	p := netip.MustParsePrefix("10.244.17.0/24")
	if k := SubnetKey(p); k != "10.244.17.0-24" {
		t.Errorf("SubnetKey = %s", k)
	}
	if got, err := ParseSubnetKey(SubnetKey(p)); err != nil || got != p {
		t.Errorf("ParseSubnetKey = %v, %v", got, err)
	}
}

func FuzzDecode(f *testing.F) {
	f.Add([]byte(`{"node":"n1","subnet":"10.244.1.0/24","publicIP":"192.0.2.1","backend":"vxlan","vtepMAC":"0a:00:00:00:00:01"}`))
	f.Add([]byte(`{"node":"n1","subnet":"10.244.1.0/24","publicIP":"192.0.2.1","backend":"wireguard","wgPublicKey":"` + wgKey + `","wgPort":51820}`))
	f.Add([]byte(`{"node":"n1","subnet":"10.244.1.0/24","subnet6":"fd00:0:0:1::/64","publicIP":"192.0.2.1","publicIP6":"2001:db8::1"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		l, err := Decode(b)
		if err != nil {
			return
		}
		l2, err := Decode(l.Encode())
		if err != nil || l2 != l {
			t.Fatalf("round trip of %s: %+v, %v", b, l2, err)
		}
	})
}

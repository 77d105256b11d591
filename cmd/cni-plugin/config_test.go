package main

import (
	"errors"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

func TestParseConfig(t *testing.T) {
	tests := []struct {
		name, in string
		code     uint   // 0: valid
		contains string // in the error message
	}{
		{"minimal", `{"cniVersion":"1.0.0","name":"n","type":"netagent-cni"}`, 0, ""},
		{"full", `{"cniVersion":"1.1.0","name":"n","type":"netagent-cni","bridge":"br-pods","subnet":"10.1.0.0/24","rangeStart":"10.1.0.10","rangeEnd":"10.1.0.20","gateway":"10.1.0.1","mtu":1450,"hairpinMode":false,"dataDir":"/var/lib/x","subnetFileWait":"2s"}`, 0, ""},
		{"not json", `nope`, types.ErrDecodingFailure, "decode"},
		{"no version", `{"name":"n"}`, types.ErrInvalidNetworkConfig, "cniVersion"},
		{"mtu type", `{"cniVersion":"1.0.0","name":"n","mtu":"x"}`, types.ErrDecodingFailure, "mtu"},
		{"mtu range", `{"cniVersion":"1.0.0","name":"n","mtu":70000}`, types.ErrInvalidNetworkConfig, "invalid mtu"},
		{"bridge", `{"cniVersion":"1.0.0","name":"n","bridge":"this-name-is-too-long"}`, types.ErrInvalidNetworkConfig, "invalid bridge"},
		{"subnet v6", `{"cniVersion":"1.0.0","name":"n","subnet":"fd00::/64"}`, types.ErrInvalidNetworkConfig, "invalid subnet: fd00::/64: only IPv4 subnets go here (IPv6 goes in ipv6Subnet)"},
		{"dual", `{"cniVersion":"1.0.0","name":"n","subnet":"10.1.0.0/24","ipv6Subnet":"fd00:1::/64","ipv6Gateway":"fd00:1::1"}`, 0, ""},
		{"ipv6 only", `{"cniVersion":"0.3.1","name":"n","ipv6Subnet":"2001:db8:1::/112"}`, 0, ""},
		{"ipv6Subnet v4", `{"cniVersion":"1.0.0","name":"n","ipv6Subnet":"10.1.0.0/24"}`, types.ErrInvalidNetworkConfig, "invalid ipv6Subnet: 10.1.0.0/24 is not an IPv6 prefix"},
		{"ipv6Subnet mapped", `{"cniVersion":"1.0.0","name":"n","ipv6Subnet":"::ffff:10.1.0.0/120"}`, types.ErrInvalidNetworkConfig, "invalid ipv6Subnet"},
		{"ipv6Subnet too long", `{"cniVersion":"1.0.0","name":"n","ipv6Subnet":"fd00::/127"}`, types.ErrInvalidNetworkConfig, "invalid ipv6Subnet: prefix length /127 is out of range /48-/126"},
		{"ipv6Subnet too short", `{"cniVersion":"1.0.0","name":"n","ipv6Subnet":"fd00::/40"}`, types.ErrInvalidNetworkConfig, "invalid ipv6Subnet: prefix length /40 is out of range"},
		{"ipv6Subnet host bits", `{"cniVersion":"1.0.0","name":"n","ipv6Subnet":"fd00::1/64"}`, types.ErrInvalidNetworkConfig, "invalid ipv6Subnet: fd00::1/64 has host bits set"},
		{"ipv6Subnet link-local", `{"cniVersion":"1.0.0","name":"n","ipv6Subnet":"fe80::/64"}`, types.ErrInvalidNetworkConfig, "invalid ipv6Subnet: fe80::/64 is not a unicast prefix"},
		{"ipv6Subnet multicast", `{"cniVersion":"1.0.0","name":"n","ipv6Subnet":"ff02::/64"}`, types.ErrInvalidNetworkConfig, "invalid ipv6Subnet"},
		{"ipv6Subnet garbage", `{"cniVersion":"1.0.0","name":"n","ipv6Subnet":"fd00::"}`, types.ErrInvalidNetworkConfig, "invalid ipv6Subnet: \"fd00::\" is not a CIDR prefix"},
		{"ipv6Subnet type", `{"cniVersion":"1.0.0","name":"n","ipv6Subnet":64}`, types.ErrDecodingFailure, "ipv6Subnet"},
		{"ipv6Gateway v4", `{"cniVersion":"1.0.0","name":"n","ipv6Subnet":"fd00::/64","ipv6Gateway":"10.0.0.1"}`, types.ErrInvalidNetworkConfig, "invalid ipv6Gateway: 10.0.0.1 is not an IPv6 address"},
		{"ipv6Gateway alone", `{"cniVersion":"1.0.0","name":"n","ipv6Gateway":"fd00::1"}`, types.ErrInvalidNetworkConfig, "invalid ipv6Gateway: set without ipv6Subnet"},
		{"gateway v6", `{"cniVersion":"1.0.0","name":"n","subnet":"10.1.0.0/24","gateway":"fd00::1"}`, types.ErrInvalidNetworkConfig, "invalid gateway: fd00::1 is not an IPv4 address"},
		{"ipam and ipv6Subnet", `{"cniVersion":"1.0.0","name":"n","ipv6Subnet":"fd00::/64","ipam":{"type":"host-local"}}`, types.ErrInvalidNetworkConfig, "invalid ipam"},
		{"wait", `{"cniVersion":"1.0.0","name":"n","subnetFileWait":"1h"}`, types.ErrInvalidNetworkConfig, "subnetFileWait"},
		{"subnet file relative", `{"cniVersion":"1.0.0","name":"n","subnetFile":"x.env"}`, types.ErrInvalidNetworkConfig, "subnetFile"},
		{"gateway", `{"cniVersion":"1.0.0","name":"n","gateway":"300.1.1.1"}`, types.ErrInvalidNetworkConfig, "invalid gateway"},
		{"port", `{"cniVersion":"1.0.0","name":"n","runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":70000}]}}`, types.ErrInvalidNetworkConfig, "containerPort 70000"},
		{"prevResult", `{"cniVersion":"1.0.0","name":"n","prevResult":{"ips":"x"}}`, types.ErrDecodingFailure, "prevResult"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := parseConfig([]byte(tt.in))
			if tt.code == 0 {
				if err != nil {
					t.Fatalf("parseConfig() = %v, want success", err)
				}
				if c.Bridge == "" || c.DataDir == "" || c.SubnetFile == "" {
					t.Errorf("defaults not applied: %+v", c)
				}
				return
			}
			var e *types.Error
			if !errors.As(err, &e) || e.Code != tt.code || !strings.Contains(e.Error(), tt.contains) {
				t.Errorf("parseConfig() = %v, want code %d mentioning %q", err, tt.code, tt.contains)
			}
		})
	}
}

func FuzzParseConfig(f *testing.F) {
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"n","type":"netagent-cni","subnet":"10.1.0.0/24","mtu":1450}`))
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"n","runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"protocol":"tcp","hostIP":"192.0.2.1"}]}}`))
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"n","subnet":"10.1.0.0/24","ipv6Subnet":"fd00:1::/64","ipv6Gateway":"fd00:1::1"}`))
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"n","ipv6Subnet":"2001:db8::/120"}`))
	f.Add([]byte(`{"cniVersion":"0.4.0","name":"n","prevResult":{"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.1.0.2/24"}]}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := parseConfig(b)
		if err != nil {
			var e *types.Error
			if !errors.As(err, &e) || e.Code == 0 || e.Msg == "" {
				t.Fatalf("error without a CNI code: %v", err)
			}
			return
		}
		if c.MTU != 0 && (c.MTU < 576 || c.MTU > 65535) {
			t.Fatalf("accepted mtu %d", c.MTU)
		}
		if c.subnet.IsValid() && (c.subnet != c.subnet.Masked() || !c.subnet.Addr().Is4()) {
			t.Fatalf("accepted subnet %s", c.subnet)
		}
		if p := c.subnet6; p.IsValid() && (p != p.Masked() || !p.Addr().Is6() || p.Addr().Is4In6() || p.Bits() < minV6Bits || p.Bits() > maxV6Bits) {
			t.Fatalf("accepted ipv6Subnet %s", p)
		}
		if c.gw6.IsValid() && !c.subnet6.IsValid() {
			t.Fatalf("accepted ipv6Gateway %s without ipv6Subnet", c.gw6)
		}
	})
}

// TestFamilies: which families a config enables and where IPv4 comes from. Existing
// conflists (a subnet, or none and the agent's subnet file) keep their meaning.
func TestFamilies(t *testing.T) {
	tests := []struct {
		name, in       string
		v4File, v4, v6 bool
	}{
		{"agent file", `{"subnetFile":"/run/x.env"}`, true, false, false},
		{"default file", `{"type":"netagent-cni"}`, true, false, false},
		{"static v4", `{"subnet":"10.1.0.0/24"}`, false, true, false},
		{"static dual", `{"subnet":"10.1.0.0/24","ipv6Subnet":"fd00::/64"}`, false, true, true},
		{"v6 only", `{"ipv6Subnet":"fd00::/64"}`, false, false, true},
		{"file v4, static v6", `{"subnetFile":"/run/x.env","ipv6Subnet":"fd00::/64"}`, true, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := `{"cniVersion":"1.0.0","name":"n",` + tt.in[1:]
			c, err := parseConfig([]byte(in))
			if err != nil {
				t.Fatal(err)
			}
			if c.v4FromFile != tt.v4File || c.subnet.IsValid() != tt.v4 || c.subnet6.IsValid() != tt.v6 {
				t.Errorf("parseConfig(%s): v4FromFile %v, subnet %v, ipv6Subnet %v; want %v, %v, %v",
					in, c.v4FromFile, c.subnet, c.subnet6, tt.v4File, tt.v4, tt.v6)
			}
		})
	}
}

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
		{"subnet v6", `{"cniVersion":"1.0.0","name":"n","subnet":"fd00::/64"}`, types.ErrInvalidNetworkConfig, "only IPv4"},
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
		if c.subnet.IsValid() && c.subnet != c.subnet.Masked() {
			t.Fatalf("accepted subnet with host bits %s", c.subnet)
		}
	})
}

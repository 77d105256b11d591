package doctor

import (
	"strings"
	"testing"
)

func TestPeersWireGuard(t *testing.T) {
	for _, tt := range []struct {
		name, status string
		want         []string // each in some finding, as "check severity what"
	}{
		{"implementation and why", `{"ready":true,"wireguard":{"device":"netagent-wg","implementation":"userspace","reason":"kernel cannot create a wireguard link"},
			"peers":[{"node":"n2","mode":"wireguard","route":true,"wg":true}]}`,
			[]string{"wireguard ok device netagent-wg: userspace WireGuard, because: kernel cannot create a wireguard link", "peers ok 1 peers programmed"}},
		{"peer missing from the device", `{"ready":true,"wireguard":{"device":"wg0","implementation":"kernel","reason":"kernel supports link kind wireguard"},
			"peers":[{"node":"n2","mode":"wireguard","route":true,"wg":false}]}`,
			[]string{"wireguard ok device wg0: kernel WireGuard", "peer n2 PROBLEM route, FDB, neighbour entry or WireGuard peer missing"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var got []string
			for _, f := range peers([]byte(tt.status)) {
				got = append(got, f.Check+" "+string(f.Severity)+" "+f.What)
			}
			all := strings.Join(got, "\n")
			for _, w := range tt.want {
				if !strings.Contains(all, w) {
					t.Errorf("peers() = %q, want a finding with %q", got, w)
				}
			}
		})
	}
}

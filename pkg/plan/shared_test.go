package plan

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/lease"
)

// TestPlannerSharedVTEP: peers that publish one VTEP MAC (a forged lease copying another
// node's, or a stale one) or sit behind one public IP. After each change the delta must
// turn the plan before into Build of the leases after (no FDB, neighbour or allow-list
// entry another peer still needs deleted), the planner must render Build, and a VTEP MAC
// published twice leaves both peers out (as a shared WireGuard key does): the kernel
// sends a MAC's frames to one destination, and input order must not pick which.
func TestPlannerSharedVTEP(t *testing.T) {
	a := mk("a", "10.244.2.0/24", "198.51.100.2")
	withMAC := func(l lease.Lease, mac string) lease.Lease { l.VTEPMAC = mac; return l }
	withIP := func(l lease.Lease, ip string) lease.Lease { l.PublicIP = netip.MustParseAddr(ip); return l }
	forged := withMAC(mk("b", "10.244.3.0/24", "198.51.100.2"), a.VTEPMAC) // a's MAC and address
	gone := func(node string) lease.Lease { return lease.Lease{Node: node} }
	for _, tt := range []struct {
		name    string
		backend string
		before  []lease.Lease
		change  []lease.Lease
		// want is the rendered verdicts after the change (Build's too).
		want string
	}{
		{"same MAC and address, one removed", config.VXLAN, []lease.Lease{a, forged}, []lease.Lease{gone("b")},
			"peer a vxlan\n"},
		{"same MAC and address, the other removed", config.VXLAN, []lease.Lease{a, forged}, []lease.Lease{gone("a")},
			"peer b vxlan\n"},
		{"same MAC and address, one takes its own MAC", config.VXLAN, []lease.Lease{a, forged}, []lease.Lease{mk("b", "10.244.3.0/24", "198.51.100.2")},
			"peer a vxlan\npeer b vxlan\n"},
		{"same MAC and address, one moves", config.VXLAN, []lease.Lease{a, forged}, []lease.Lease{withIP(forged, "198.51.100.9")},
			"peer a unreachable (its VTEP MAC is also published by b)\npeer b unreachable (its VTEP MAC is also published by a)\n"},
		{"a second node copies the MAC", config.VXLAN, []lease.Lease{a}, []lease.Lease{forged},
			"peer a unreachable (its VTEP MAC is also published by b)\npeer b unreachable (its VTEP MAC is also published by a)\n"},
		{"same MAC, other address, one removed", config.VXLAN, []lease.Lease{a, withIP(forged, "198.51.100.9")}, []lease.Lease{gone("a")},
			"peer b vxlan\n"},
		{"same MAC, a third joins", config.VXLAN, []lease.Lease{a, forged}, []lease.Lease{withMAC(mk("c", "10.244.4.0/24", "198.51.100.4"), a.VTEPMAC)},
			"peer a unreachable (its VTEP MAC is also published by b)\npeer b unreachable (its VTEP MAC is also published by a)\npeer c unreachable (its VTEP MAC is also published by a)\n"},
		{"hybrid: an on-link peer shares the MAC, removed", config.Hybrid, []lease.Lease{a, withIP(forged, "192.0.2.3")}, []lease.Lease{gone("b")},
			"peer a vxlan\n"},
		{"hybrid: the on-link peer stays direct", config.Hybrid, []lease.Lease{withIP(forged, "192.0.2.3")}, []lease.Lease{a},
			"peer a unreachable (its VTEP MAC is also published by b)\npeer b direct\n"},
		{"own MACs behind one address, one removed", config.VXLAN, []lease.Lease{a, mk("b", "10.244.3.0/24", "198.51.100.2")}, []lease.Lease{gone("b")},
			"peer a vxlan\n"},
		{"host-gw: MACs are not used", config.HostGW, []lease.Lease{withIP(a, "192.0.2.2"), withIP(forged, "192.0.2.3")}, []lease.Lease{mk("c", "10.244.4.0/24", "192.0.2.4")},
			"peer a direct\npeer b direct\npeer c direct\n"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			in := Input{Config: cfg(t, tt.backend), Self: mk("self", "10.244.1.0/24", "192.0.2.1"), Peers: refs(tt.before), Underlay: underlay, VXLANDev: "na.1"}
			p, first := NewPlanner(in)
			if diff := cmp.Diff(render(Build(in)), render(p.Plan())); diff != "" {
				t.Errorf("new planner differs from Build (-build +planner):\n%s", diff)
			}
			next := p.Update(refs(tt.change))
			after := map[string]lease.Lease{}
			for _, l := range append(tt.before, tt.change...) {
				after[l.Node] = l
				if l.Gone() {
					delete(after, l.Node)
				}
			}
			in.Peers = nil
			for _, l := range after {
				in.Peers = append(in.Peers, &l)
			}
			want := render(Build(in))
			for _, c := range next.Delta.FDB {
				if c.Del && strings.Contains(want, fmt.Sprintf("fdb %s dst %s\n", c.FDB.MAC, c.FDB.Dst)) {
					t.Errorf("the delta deletes FDB entry %s dst %s, which Build still has", c.FDB.MAC, c.FDB.Dst)
				}
			}
			if diff := cmp.Diff(want, render(Follow(first, next))); diff != "" {
				t.Errorf("plan + delta differs from Build (-build +delta):\n%s", diff)
			}
			if diff := cmp.Diff(want, render(p.Plan())); diff != "" {
				t.Errorf("planner differs from Build (-build +planner):\n%s", diff)
			}
			var got strings.Builder
			for _, line := range strings.SplitAfter(want, "\n") {
				if strings.HasPrefix(line, "peer ") {
					got.WriteString(line)
				}
			}
			if got.String() != tt.want {
				t.Errorf("verdicts:\n%s\nwant:\n%s", got.String(), tt.want)
			}
		})
	}
}

package agent

import (
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/plan"
)

func lz(node, subnet string) lease.Lease {
	return lease.Lease{Node: node, Subnet: netip.MustParsePrefix(subnet), PublicIP: netip.MustParseAddr("192.0.2.11")}
}

// lz6 is an IPv6-only lease.
func lz6(node, subnet6, ip6 string) lease.Lease {
	return lease.Lease{Node: node, Subnet6: netip.MustParsePrefix(subnet6), PublicIP6: netip.MustParseAddr(ip6)}
}

// graceInput is a dual-stack host-gw plan's input for peers, as the loop gives it.
func graceInput(peers []*lease.Lease) plan.Input {
	return plan.Input{
		Config: config.Network{Network: netip.MustParsePrefix("10.244.0.0/16"), SubnetLen: 24, Backend: config.Backend{Type: config.HostGW},
			IPv6Network: netip.MustParsePrefix("fd00::/48"), IPv6SubnetLen: 64},
		Self:     lease.Lease{Node: "self", Subnet: netip.MustParsePrefix("10.244.99.0/24"), PublicIP: netip.MustParseAddr("192.0.2.99")},
		Peers:    peers,
		Underlay: plan.Underlay{Dev: "eth0", MTU: 1500},
	}
}

func gone(node string) lease.Lease { return lease.Lease{Node: node} }

// refs are copies of ls as the peer view hands them out.
func refs(ls []lease.Lease) []*lease.Lease {
	out := make([]*lease.Lease, len(ls))
	for i, l := range ls {
		out[i] = &l
	}
	return out
}

// vals are the leases ls points to.
func vals(ls []*lease.Lease) []lease.Lease {
	out := make([]lease.Lease, 0, len(ls))
	for _, l := range ls {
		out = append(out, *l)
	}
	return out
}

// TestGrace applies store states and peer changes in order and checks what the planner
// is given: peers that vanish during an outage or its window are kept, until the window
// ends or a live lease takes their subnet.
func TestGrace(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	a, b, c := lz("a", "10.244.1.0/24"), lz("b", "10.244.2.0/24"), lz("c", "10.244.3.0/24")
	a6, b6 := lz6("a", "fd00:0:0:1::/64", "2001:db8::1"), lz6("b", "fd00:0:0:2::/64", "2001:db8::2")
	b6moved, c6onB := lz6("b", "fd00:0:0:2::/64", "2001:db8::22"), lz6("c", "fd00:0:0:2::/64", "2001:db8::3")
	type step struct {
		at       time.Duration
		outage   bool // the store went away
		back     bool // the store answers again (window 60s)
		full     []lease.Lease
		changed  []lease.Lease
		want     []lease.Lease
		wantHeld []string
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"no outage: a vanished peer goes", []step{
			{full: []lease.Lease{a, b}, want: []lease.Lease{a, b}},
			{changed: []lease.Lease{gone("b")}, want: []lease.Lease{gone("b")}},
		}},
		{"vanished after the outage: kept through the window, removed after", []step{
			{full: []lease.Lease{a, b}, want: []lease.Lease{a, b}},
			{at: time.Second, outage: true},
			{at: 50 * time.Second, back: true},
			{at: 80 * time.Second, changed: []lease.Lease{gone("b")}, want: []lease.Lease{b}, wantHeld: []string{"b"}},
			{at: 90 * time.Second, full: []lease.Lease{a}, want: []lease.Lease{a, b}},
			{at: 111 * time.Second, full: []lease.Lease{a}, want: []lease.Lease{a}},
			{at: 112 * time.Second, changed: []lease.Lease{gone("a")}, want: []lease.Lease{gone("a")}},
		}},
		{"re-claimed in the window: nothing changes", []step{
			{full: []lease.Lease{a, b}, want: []lease.Lease{a, b}},
			{at: time.Second, outage: true},
			{at: 2 * time.Second, back: true},
			{at: 3 * time.Second, changed: []lease.Lease{gone("b")}, want: []lease.Lease{b}, wantHeld: []string{"b"}},
			{at: 4 * time.Second, changed: []lease.Lease{b}, want: []lease.Lease{b}},
			{at: 70 * time.Second, full: []lease.Lease{a, b}, want: []lease.Lease{a, b}},
		}},
		{"held peer gives way to a live lease on its subnet", []step{
			{full: []lease.Lease{a, b}, want: []lease.Lease{a, b}},
			{at: time.Second, outage: true},
			{at: 2 * time.Second, changed: []lease.Lease{gone("b")}, want: []lease.Lease{b}, wantHeld: []string{"b"}},
			{at: 3 * time.Second, changed: []lease.Lease{lz("c", "10.244.2.0/24")}, want: []lease.Lease{gone("b"), lz("c", "10.244.2.0/24")}},
		}},
		{"full pass in the window skips a held peer whose subnet or node is live", []step{
			{full: []lease.Lease{a, b, c}, want: []lease.Lease{a, b, c}},
			{at: time.Second, outage: true},
			{at: 2 * time.Second, full: []lease.Lease{a, lz("d", "10.244.2.0/24"), lz("c", "10.244.9.0/24")},
				want: []lease.Lease{a, lz("c", "10.244.9.0/24"), lz("d", "10.244.2.0/24")}},
		}},
		// IPv6-only leases have no IPv4 subnet: a live one is not taken for a vanished one,
		// and their IPv6 subnets settle who is held.
		{"IPv6-only: an update in the window is applied, a vanished peer held", []step{
			{full: []lease.Lease{a6, b6}, want: []lease.Lease{a6, b6}},
			{at: time.Second, outage: true},
			{at: 2 * time.Second, changed: []lease.Lease{b6moved}, want: []lease.Lease{b6moved}},
			{at: 3 * time.Second, changed: []lease.Lease{gone("a")}, want: []lease.Lease{a6}, wantHeld: []string{"a"}},
			{at: 4 * time.Second, full: []lease.Lease{b6moved}, want: []lease.Lease{a6, b6moved}},
		}},
		{"IPv6-only: held peer gives way to a live lease on its IPv6 subnet", []step{
			{full: []lease.Lease{a6, b6}, want: []lease.Lease{a6, b6}},
			{at: time.Second, outage: true},
			{at: 2 * time.Second, changed: []lease.Lease{gone("b")}, want: []lease.Lease{b6}, wantHeld: []string{"b"}},
			{at: 3 * time.Second, changed: []lease.Lease{c6onB}, want: []lease.Lease{gone("b"), c6onB}},
		}},
		{"IPv6-only: full pass in the window skips a held peer whose IPv6 subnet is live", []step{
			{full: []lease.Lease{a6, b6}, want: []lease.Lease{a6, b6}},
			{at: time.Second, outage: true},
			{at: 2 * time.Second, full: []lease.Lease{a6, c6onB}, want: []lease.Lease{a6, c6onB}},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := newGrace()
			// The planner the loop keeps: grace holds a vanished peer with the lease it has.
			var planner *plan.Planner
			for i, s := range tt.steps {
				now := t0.Add(s.at)
				if s.outage {
					g.outage()
				}
				if s.back {
					g.recovered(now, 60*time.Second)
				}
				var got []*lease.Lease
				var held []string
				switch {
				case s.full != nil:
					got, held = g.full(now, refs(s.full), planner)
					planner, _ = plan.NewPlanner(graceInput(got))
				case s.changed != nil:
					got, held = g.incremental(now, refs(s.changed), planner)
					planner.Update(got)
				default:
					continue
				}
				if diff := cmp.Diff(s.want, vals(got), cmp.Comparer(func(x, y netip.Prefix) bool { return x == y }), cmp.Comparer(func(x, y netip.Addr) bool { return x == y })); diff != "" {
					t.Errorf("step %d: peers (-want +got):\n%s", i, diff)
				}
				if diff := cmp.Diff(s.wantHeld, held); diff != "" {
					t.Errorf("step %d: newly held (-want +got):\n%s", i, diff)
				}
			}
		})
	}
}

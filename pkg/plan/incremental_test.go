package plan

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/lease"
)

// TestPlannerMatchesBuild applies random sequences of lease changes incrementally and
// checks after every step that the desired state equals Build of the whole set.
func TestPlannerMatchesBuild(t *testing.T) {
	families := []struct {
		name, config string
		self         lease.Lease
	}{
		{"ipv4", `{"network":"10.244.0.0/16","backend":{"type":%q}}`, mk("self", "10.244.1.0/24", "192.0.2.1")},
		{"dual", `{"network":"10.244.0.0/16","ipv6Network":"fd00::/48","backend":{"type":%q}}`, mk6("self", "10.244.1.0/24", "fd00:0:0:1::/64", "192.0.2.1", "2001:db8:1::1")},
		{"ipv6", `{"ipv6Network":"fd00::/48","backend":{"type":%q}}`, mk6("self", "", "fd00:0:0:1::/64", "", "2001:db8:1::1")},
	}
	for _, fam := range families {
		for _, backend := range []string{config.HostGW, config.VXLAN, config.Hybrid, config.WireGuard} {
			t.Run(fam.name+"/"+backend, func(t *testing.T) {
				plannerMatchesBuild(t, cfgJSON(t, fmt.Sprintf(fam.config, backend)), fam.self, backend)
			})
		}
	}
}

func plannerMatchesBuild(t *testing.T, c config.Network, self lease.Lease, backend string) {
	rng := rand.New(rand.NewPCG(1, uint64(len(backend))))
	in := Input{Config: c, Self: self, Underlay: underlay6, VXLANDev: "na.1"}
	// A VXLAN device left from an earlier backend: host-gw keeps it while some peer
	// publishes a VTEP (peers without one are common below, so that flips both ways).
	in.Underlay.Tunnels = []Tunnel{{Name: "netagent.7", Port: 4789}, {Name: "netagent.1", Port: 8472}}
	random := func() lease.Lease {
		node := fmt.Sprintf("n%d", rng.IntN(12))
		subnet := fmt.Sprintf("10.244.%d.0/24", 1+rng.IntN(8)) // .1 collides with self now and then
		if rng.IntN(10) == 0 {
			subnet = fmt.Sprintf("10.244.%d.0/23", 2*rng.IntN(4))
		}
		ip := fmt.Sprintf("192.0.2.%d", 2+rng.IntN(50))
		if rng.IntN(2) == 0 {
			ip = fmt.Sprintf("198.51.100.%d", 2+rng.IntN(50))
		}
		l := mk(node, subnet, ip)
		if c.HasV6() {
			l.Subnet6 = netip.MustParsePrefix(fmt.Sprintf("fd00:0:0:%d::/64", 1+rng.IntN(8)))
			if rng.IntN(10) == 0 {
				l.Subnet6 = netip.MustParsePrefix(fmt.Sprintf("fd00:0:0:%d::/63", 2*rng.IntN(4)))
			}
			switch rng.IntN(4) {
			case 0: // no IPv6 underlay
			case 1:
				l.PublicIP6 = netip.MustParseAddr(fmt.Sprintf("2001:db8:2::%d", 2+rng.IntN(50)))
			default:
				l.PublicIP6 = netip.MustParseAddr(fmt.Sprintf("2001:db8:1::%d", 2+rng.IntN(50)))
			}
			if !c.HasV4() || rng.IntN(8) == 0 {
				l.Subnet = netip.Prefix{}
			}
			if l.PublicIP6.IsValid() && (!self.PublicIP.IsValid() || rng.IntN(4) == 0) {
				l.PublicIP = netip.Addr{}
			}
		}
		if rng.IntN(8) == 0 || backend == config.HostGW && rng.IntN(4) != 0 {
			l.VTEPMAC = ""
		} else {
			if rng.IntN(6) == 0 { // a MAC another node may publish too, now or later
				l.VTEPMAC = VTEPMAC(fmt.Sprintf("n%d", rng.IntN(12))).String()
			}
			if rng.IntN(6) == 0 { // the planner indexes MACs as bytes
				l.VTEPMAC = strings.ToUpper(l.VTEPMAC)
			}
		}
		switch rng.IntN(12) {
		case 0:
			l.WGPublicKey, l.WGPort = "", 0
		case 1, 2: // a key another node may publish too, now or later
			l.WGPublicKey = fmt.Sprintf("key-n%d", rng.IntN(12))
		case 3:
			l.WGPublicKey = self.WGPublicKey
		case 4:
			l.WGPort = 51000 + rng.IntN(3)
		}
		return l
	}
	current := map[string]lease.Lease{}
	var peers []lease.Lease
	for range 5 {
		l := random()
		current[l.Node] = l
	}
	for _, l := range current {
		peers = append(peers, l)
	}
	in.Peers = refs(peers)
	p, first := NewPlanner(in)
	prev := first
	for step := range 400 {
		var batch []lease.Lease
		for range 1 + rng.IntN(3) {
			l := random()
			if rng.IntN(3) == 0 {
				delete(current, l.Node)
				batch = append(batch, lease.Lease{Node: l.Node}) // deletion
				continue
			}
			current[l.Node] = l
			batch = append(batch, l)
		}
		next := p.Update(refs(batch))
		var all []lease.Lease
		for _, l := range current {
			all = append(all, l)
		}
		in.Peers = refs(all)
		want := render(Build(in))
		built := Build(in)
		if next.Delta == nil || next.Delta.From != prev.Gen || next.Gen == prev.Gen {
			t.Fatalf("step %d: plan %d with delta %+v does not follow plan %d", step, next.Gen, next.Delta, prev.Gen)
		}
		// A key appears at most once in a delta (the dataplane applies its entries in any order).
		if dup := dupKey(next.Delta); dup != "" {
			t.Fatalf("step %d, batch %v: %s", step, batch, dup)
		}
		// The delta turns the previous plan into Build of the new set.
		if diff := cmp.Diff(want, render(Follow(prev, next))); diff != "" {
			t.Fatalf("step %d, batch %v: previous plan + delta differs from Build (-build +delta):\n%s", step, batch, diff)
		}
		if diff := cmp.Diff(built.Count(), p.Count(), cmpopts.EquateEmpty()); diff != "" {
			t.Fatalf("step %d: mode counts differ: %s", step, diff)
		}
		full := p.Plan()
		if diff := cmp.Diff(want, render(full)); diff != "" {
			t.Fatalf("step %d, batch %v: incremental plan differs from Build (-build +incremental):\n%s", step, batch, diff)
		}
		// The whole verdicts too (the planner rebuilds them from the leases it holds).
		byNode := func(a, b Peer) int { return strings.Compare(a.Node, b.Node) }
		got := full.Peers
		slices.SortFunc(built.Peers, byNode)
		slices.SortFunc(got, byNode)
		if !slices.Equal(built.Peers, got) {
			t.Fatalf("step %d: peers differ:\nbuild %v\nincremental %v", step, built.Peers, got)
		}
		for _, v := range built.Peers {
			if pv, ok := p.Peer(v.Node); !ok || pv != v {
				t.Fatalf("step %d: Peer(%s) = %v, %v; want %v", step, v.Node, pv, ok, v)
			}
		}
		for _, v := range next.Delta.Peers {
			if i, ok := slices.BinarySearchFunc(built.Peers, v, byNode); !ok || built.Peers[i] != v {
				t.Fatalf("step %d: delta verdict %v is not Build's", step, v)
			}
		}
		prev = full
	}
}

// dupKey names a key d has twice ("": none).
func dupKey(d *Delta) string {
	seen := map[string]bool{}
	for _, k := range slices.Concat(
		keys(d.Routes, func(c RouteChange) string { return "route " + c.Dst.String() }),
		keys(d.Neighs, func(c NeighChange) string { return "neighbour " + c.IP.String() }),
		keys(d.FDB, func(c FDBChange) string { return "FDB " + c.FDB.MAC + " " + c.FDB.Dst.String() }),
		keys(d.Allow, func(c AllowChange) string { return "allow " + c.Node }),
		keys(d.WGPeers, func(c WGPeerChange) string { return "wireguard " + c.Node }),
	) {
		if seen[k] {
			return k + " twice in the delta"
		}
		seen[k] = true
	}
	return ""
}

func keys[C any](cs []C, key func(C) string) []string {
	out := make([]string, 0, len(cs))
	for _, c := range cs {
		out = append(out, key(c))
	}
	return out
}

func BenchmarkPlannerUpdate5000(b *testing.B) {
	c := cfg(b, config.Hybrid)
	c.Network = netip.MustParsePrefix("10.0.0.0/8")
	var peers []lease.Lease
	for i := range 5000 {
		peers = append(peers, mk(fmt.Sprint("n", i), fmt.Sprintf("10.%d.%d.0/24", i/256, i%256), fmt.Sprintf("198.51.%d.%d", i/250, i%250+1)))
	}
	p, _ := NewPlanner(Input{Config: c, Self: mk("self", "10.250.0.0/24", "192.0.2.1"), Peers: refs(peers), Underlay: underlay, VXLANDev: "na.1"})
	i := 0
	for b.Loop() {
		l := mk(fmt.Sprint("new", i%1000), fmt.Sprintf("10.251.%d.0/24", i%250), "198.51.200.1")
		if next := p.Update([]*lease.Lease{&l}); next.Delta.Empty() {
			b.Fatal("no change")
		}
		i++
	}
}

// The planner keeps the leases it is given, not copies (with thousands of peers a copy is
// megabytes), unless it must drop a subnet of a family the config has off.
func TestPlannerSharesLeases(t *testing.T) {
	a := mk6("a", "10.244.2.0/24", "fd00:0:0:2::/64", "192.0.2.2", "2001:db8:1::2")
	b := mk6("b", "10.244.3.0/24", "fd00:0:0:3::/64", "192.0.2.3", "2001:db8:1::3")
	for _, tt := range []struct {
		name, config string
		shared       bool
	}{
		{"dual", `{"network":"10.244.0.0/16","ipv6Network":"fd00::/48","backend":{"type":"vxlan"}}`, true},
		{"IPv4 only: the IPv6 subnet dropped", `{"network":"10.244.0.0/16","backend":{"type":"vxlan"}}`, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p, _ := NewPlanner(Input{Config: cfgJSON(t, tt.config), Self: mk("self", "10.244.1.0/24", "192.0.2.1"), Peers: []*lease.Lease{&a}, Underlay: underlay})
			p.Update([]*lease.Lease{&b})
			for _, want := range []*lease.Lease{&a, &b} {
				got, ok := p.Lease(want.Node)
				if !ok || (got == want) != tt.shared || got.Subnet != want.Subnet || got.Subnet6.IsValid() != tt.shared {
					t.Errorf("Lease(%s) = %+v (%p), want %+v (%p), shared %v", want.Node, got, got, want, want, tt.shared)
				}
			}
			if !a.Subnet6.IsValid() || !b.Subnet6.IsValid() {
				t.Errorf("the planner changed a lease it was given: %+v, %+v", a, b)
			}
		})
	}
}

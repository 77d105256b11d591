package plan

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/netipx"
)

func cfg(t testing.TB, backend string) config.Network {
	t.Helper()
	n, err := config.Parse([]byte(fmt.Sprintf(`{"network":"10.244.0.0/16","backend":{"type":%q}}`, backend)))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// refs is ls as Input.Peers takes them (each a copy: the table stays as written).
func refs(ls []lease.Lease) []*lease.Lease {
	out := make([]*lease.Lease, len(ls))
	for i, l := range ls {
		out[i] = &l
	}
	return out
}

func mk(node, subnet, ip string) lease.Lease {
	return lease.Lease{Node: node, Subnet: netip.MustParsePrefix(subnet), PublicIP: netip.MustParseAddr(ip), VTEPMAC: VTEPMAC(node).String(),
		WGPublicKey: "key-" + node, WGPort: 51820}
}

var underlay = Underlay{Dev: "eth0", MTU: 1500, Connected: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}}

// render prints a plan compactly, in a stable order, so table tests compare whole plans.
func render(p Plan) string {
	slices.SortFunc(p.Routes, func(a, b Route) int { return a.Dst.Addr().Compare(b.Dst.Addr())*2 + cmpInt(a.Dst.Bits(), b.Dst.Bits()) })
	slices.SortFunc(p.Neighs, func(a, b Neigh) int { return a.IP.Compare(b.IP) })
	slices.SortFunc(p.FDB, func(a, b FDB) int { return strings.Compare(a.MAC, b.MAC)*2 + a.Dst.Compare(b.Dst) })
	slices.SortFunc(p.Peers, func(a, b Peer) int { return strings.Compare(a.Node, b.Node) })
	slices.SortFunc(p.WGPeers, func(a, b WGPeer) int { return strings.Compare(a.Node, b.Node) })
	var b strings.Builder
	for _, r := range p.Routes {
		fmt.Fprintf(&b, "route %s via %s dev %s", r.Dst, r.Gw, r.Dev)
		if r.OnLink {
			b.WriteString(" onlink")
		}
		if r.MTU != 0 {
			fmt.Fprintf(&b, " mtu %d", r.MTU)
		}
		b.WriteString("\n")
	}
	for _, n := range p.Neighs {
		fmt.Fprintf(&b, "neigh %s %s\n", n.IP, n.MAC)
	}
	for _, f := range p.FDB {
		fmt.Fprintf(&b, "fdb %s dst %s\n", f.MAC, f.Dst)
	}
	for _, peer := range p.Peers {
		fmt.Fprintf(&b, "peer %s %s", peer.Node, peer.Mode)
		if peer.Reason != "" {
			fmt.Fprintf(&b, " (%s)", peer.Reason)
		}
		b.WriteString("\n")
	}
	nodes := slices.Sorted(maps.Keys(p.Allow.Peers))
	for _, n := range nodes {
		a := p.Allow.Peers[n]
		fmt.Fprintf(&b, "allow %s from %s inner %s", n, a.IP, a.Subnet)
		if a.Subnet6.IsValid() {
			fmt.Fprintf(&b, " inner6 %s", a.Subnet6)
		}
		if a.MAC != "" {
			fmt.Fprintf(&b, " mac %s", a.MAC)
		}
		b.WriteString("\n")
	}
	if p.Allow.Port != 0 {
		fmt.Fprintf(&b, "allow-list port %d network %s /%d", p.Allow.Port, p.Allow.Network, p.Allow.SubnetLen)
		if p.Allow.Network6.IsValid() {
			fmt.Fprintf(&b, " network6 %s /%d", p.Allow.Network6, p.Allow.SubnetLen6)
		}
		if p.Allow.Underlay6 {
			b.WriteString(" over ipv6")
		}
		b.WriteString("\n")
	}
	if p.KeepVXLAN != "" {
		fmt.Fprintf(&b, "keep vxlan %s\n", p.KeepVXLAN)
	}
	if p.VXLAN != nil {
		fmt.Fprintf(&b, "vxlan %s vni %d port %d dev %s local %s addr %s mac %s mtu %d\n", p.VXLAN.Name, p.VXLAN.VNI, p.VXLAN.Port, p.VXLAN.Underlay, p.VXLAN.Local, p.VXLAN.Addr, p.VXLAN.MAC, p.VXLAN.MTU)
	}
	if w := p.WireGuard; w != nil {
		fmt.Fprintf(&b, "wireguard %s port %d mtu %d addr %s network %s subnet %s", w.Name, w.Port, w.MTU, w.Addr, w.Network, w.Subnet)
		if w.Network6.IsValid() {
			fmt.Fprintf(&b, " addr6 %s network6 %s subnet6 %s", w.Addr6, w.Network6, w.Subnet6)
		}
		if w.Routable6 {
			b.WriteString(" routable6")
		}
		fmt.Fprintf(&b, " psk %q underlay %s\n", w.PSKFile, w.Underlay)
	}
	for _, w := range p.WGPeers {
		fmt.Fprintf(&b, "wgpeer %s key %s endpoint %s allowed %s\n", w.Node, w.PublicKey, w.Endpoint, netipx.Join(w.AllowedIPs()))
	}
	fmt.Fprintf(&b, "pod mtu %d\n", p.PodMTU)
	fmt.Fprintf(&b, "nat %s %s final %t", p.NAT.Network, p.NAT.Subnet, p.NAT.Final)
	if p.NAT.Network6.IsValid() {
		fmt.Fprintf(&b, " v6 %s %s masquerade %t", p.NAT.Network6, p.NAT.Subnet6, p.NAT.Masquerade6)
	}
	b.WriteString("\n")
	return b.String()
}

func cmpInt(a, b int) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func TestBuild(t *testing.T) {
	self := mk("a", "10.244.1.0/24", "192.0.2.1")
	near := mk("b", "10.244.2.0/24", "192.0.2.2")
	far := mk("c", "10.244.3.0/24", "198.51.100.3")
	macA, macB, macC := VTEPMAC("a").String(), VTEPMAC("b").String(), VTEPMAC("c").String()
	tests := []struct {
		name    string
		backend string
		peers   []lease.Lease
		want    string
	}{
		{"host-gw", config.HostGW, []lease.Lease{near, far}, `route 10.244.2.0/24 via 192.0.2.2 dev eth0
peer b direct
peer c unreachable (host-gw: 198.51.100.3 is not on-link from eth0 (use the hybrid or vxlan backend to reach it))
allow b from 192.0.2.2 inner 10.244.2.0/24
pod mtu 1500
nat 10.244.0.0/16 10.244.1.0/24 final false
`},
		{"vxlan", config.VXLAN, []lease.Lease{far, near}, fmt.Sprintf(`route 10.244.2.0/24 via 10.244.2.0 dev na.1 onlink
route 10.244.3.0/24 via 10.244.3.0 dev na.1 onlink
neigh 10.244.2.0 %[1]s
neigh 10.244.3.0 %[2]s
fdb %[2]s dst 198.51.100.3
fdb %[1]s dst 192.0.2.2
peer b vxlan
peer c vxlan
allow b from 192.0.2.2 inner 10.244.2.0/24
allow c from 198.51.100.3 inner 10.244.3.0/24
allow-list port 8472 network 10.244.0.0/16 /24
vxlan na.1 vni 1 port 8472 dev eth0 local 192.0.2.1 addr 10.244.1.0/32 mac %[3]s mtu 1450
pod mtu 1450
nat 10.244.0.0/16 10.244.1.0/24 final false
`, macB, macC, macA)},
		{"hybrid", config.Hybrid, []lease.Lease{near, far}, fmt.Sprintf(`route 10.244.2.0/24 via 192.0.2.2 dev eth0
route 10.244.3.0/24 via 10.244.3.0 dev na.1 onlink mtu 1450
neigh 10.244.3.0 %[1]s
fdb %[1]s dst 198.51.100.3
peer b direct
peer c vxlan
allow b from 192.0.2.2 inner 10.244.2.0/24
allow c from 198.51.100.3 inner 10.244.3.0/24
allow-list port 8472 network 10.244.0.0/16 /24
vxlan na.1 vni 1 port 8472 dev eth0 local 192.0.2.1 addr 10.244.1.0/32 mac %[2]s mtu 1450
pod mtu 1500
nat 10.244.0.0/16 10.244.1.0/24 final false
`, macC, macA)},
		{"self is skipped", config.HostGW, []lease.Lease{self}, "pod mtu 1500\nnat 10.244.0.0/16 10.244.1.0/24 final false\n"},
		{"duplicate subnet", config.HostGW, []lease.Lease{near, mk("d", "10.244.2.0/24", "192.0.2.4")}, `route 10.244.2.0/24 via 192.0.2.2 dev eth0
peer b direct
peer d unreachable (subnet 10.244.2.0/24 is also held by b)
allow b from 192.0.2.2 inner 10.244.2.0/24
pod mtu 1500
nat 10.244.0.0/16 10.244.1.0/24 final false
`},
		{"own subnet claimed", config.HostGW, []lease.Lease{mk("e", "10.244.1.0/24", "192.0.2.5")}, `peer e unreachable (subnet 10.244.1.0/24 is also held by a)
pod mtu 1500
nat 10.244.0.0/16 10.244.1.0/24 final false
`},
		{"odd length overlaps", config.HostGW, []lease.Lease{mk("f", "10.244.2.0/23", "192.0.2.6"), near}, `route 10.244.2.0/24 via 192.0.2.2 dev eth0
peer b direct
peer f unreachable (subnet 10.244.2.0/23 overlaps 10.244.2.0/24 of b)
allow b from 192.0.2.2 inner 10.244.2.0/24
pod mtu 1500
nat 10.244.0.0/16 10.244.1.0/24 final false
`},
		{"contested subnet goes to the smaller name whatever the order", config.HostGW, []lease.Lease{mk("z", "10.244.2.0/24", "192.0.2.9"), near}, `route 10.244.2.0/24 via 192.0.2.2 dev eth0
peer b direct
peer z unreachable (subnet 10.244.2.0/24 is also held by b)
allow b from 192.0.2.2 inner 10.244.2.0/24
pod mtu 1500
nat 10.244.0.0/16 10.244.1.0/24 final false
`},
		{"outside network", config.HostGW, []lease.Lease{mk("g", "10.9.0.0/24", "192.0.2.7")}, `peer g unreachable (subnet 10.9.0.0/24 is outside the cluster network 10.244.0.0/16)
pod mtu 1500
nat 10.244.0.0/16 10.244.1.0/24 final false
`},
		{"host-gw peer of a vxlan node, on-link", config.VXLAN, []lease.Lease{{Node: "h", Subnet: netip.MustParsePrefix("10.244.8.0/24"), PublicIP: netip.MustParseAddr("192.0.2.8"), Backend: config.HostGW}}, `route 10.244.8.0/24 via 192.0.2.8 dev eth0
peer h direct
allow h from 192.0.2.8 inner 10.244.8.0/24
allow-list port 8472 network 10.244.0.0/16 /24
vxlan na.1 vni 1 port 8472 dev eth0 local 192.0.2.1 addr 10.244.1.0/32 mac ` + VTEPMAC("a").String() + ` mtu 1450
pod mtu 1450
nat 10.244.0.0/16 10.244.1.0/24 final false
`},
		{"host-gw peer of a hybrid node, on-link", config.Hybrid, []lease.Lease{{Node: "h", Subnet: netip.MustParsePrefix("10.244.8.0/24"), PublicIP: netip.MustParseAddr("192.0.2.8"), Backend: config.HostGW}}, `route 10.244.8.0/24 via 192.0.2.8 dev eth0
peer h direct
allow h from 192.0.2.8 inner 10.244.8.0/24
allow-list port 8472 network 10.244.0.0/16 /24
vxlan na.1 vni 1 port 8472 dev eth0 local 192.0.2.1 addr 10.244.1.0/32 mac ` + VTEPMAC("a").String() + ` mtu 1450
pod mtu 1500
nat 10.244.0.0/16 10.244.1.0/24 final false
`},
		{"vxlan peer without MAC, not on-link", config.VXLAN, []lease.Lease{{Node: "h", Subnet: netip.MustParsePrefix("10.244.8.0/24"), PublicIP: netip.MustParseAddr("198.51.100.8")}}, `peer h unreachable (the peer published no VTEP MAC and is not on-link (is it running a vxlan or hybrid backend?))
allow-list port 8472 network 10.244.0.0/16 /24
vxlan na.1 vni 1 port 8472 dev eth0 local 192.0.2.1 addr 10.244.1.0/32 mac ` + VTEPMAC("a").String() + ` mtu 1450
pod mtu 1450
nat 10.244.0.0/16 10.244.1.0/24 final false
`},
		{"wireguard: near and far alike, encrypted", config.WireGuard, []lease.Lease{far, near}, `route 10.244.2.0/24 via invalid IP dev netagent-wg
route 10.244.3.0/24 via invalid IP dev netagent-wg
peer b wireguard
peer c wireguard
wireguard netagent-wg port 51820 mtu 1440 addr 10.244.1.0/32 network 10.244.0.0/16 subnet 10.244.1.0/24 psk "" underlay eth0
wgpeer b key key-b endpoint 192.0.2.2:51820 allowed 10.244.2.0/24
wgpeer c key key-c endpoint 198.51.100.3:51820 allowed 10.244.3.0/24
pod mtu 1440
nat 10.244.0.0/16 10.244.1.0/24 final false
`},
		{"wireguard: a peer without a key, ours, or a shared one", config.WireGuard, []lease.Lease{
			{Node: "h", Subnet: netip.MustParsePrefix("10.244.8.0/24"), PublicIP: netip.MustParseAddr("192.0.2.8"), Backend: config.VXLAN, VTEPMAC: VTEPMAC("h").String()},
			{Node: "m", Subnet: netip.MustParsePrefix("10.244.9.0/24"), PublicIP: netip.MustParseAddr("192.0.2.9"), WGPublicKey: "key-a", WGPort: 51820},
			{Node: "x", Subnet: netip.MustParsePrefix("10.244.10.0/24"), PublicIP: netip.MustParseAddr("192.0.2.10"), WGPublicKey: "key-b", WGPort: 51820},
			near,
		}, `peer b unreachable (its WireGuard public key is also published by x)
peer h unreachable (the peer published no WireGuard key (a new node publishes it after its first pass; else: is it running the wireguard backend?))
peer m unreachable (the peer publishes this node's WireGuard public key)
peer x unreachable (its WireGuard public key is also published by b)
wireguard netagent-wg port 51820 mtu 1440 addr 10.244.1.0/32 network 10.244.0.0/16 subnet 10.244.1.0/24 psk "" underlay eth0
pod mtu 1440
nat 10.244.0.0/16 10.244.1.0/24 final false
`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := render(Build(Input{Config: cfg(t, tt.backend), Self: self, Peers: refs(tt.peers), Underlay: underlay, VXLANDev: "na.1"}))
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("Build() mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func cfgJSON(t testing.TB, js string) config.Network {
	t.Helper()
	n, err := config.Parse([]byte(js))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// mk6 is a dual-stack (subnet "" : IPv6-only) lease; ip or ip6 "" leaves that underlay out.
func mk6(node, subnet, subnet6, ip, ip6 string) lease.Lease {
	l := lease.Lease{Node: node, VTEPMAC: VTEPMAC(node).String()}
	l.Subnet, _ = netip.ParsePrefix(subnet)
	l.Subnet6, _ = netip.ParsePrefix(subnet6)
	l.PublicIP, _ = netip.ParseAddr(ip)
	l.PublicIP6, _ = netip.ParseAddr(ip6)
	return l
}

var underlay6 = Underlay{Dev: "eth0", MTU: 1500, Connected: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("2001:db8:1::/64")}}

func TestBuild6(t *testing.T) {
	dual := `{"network":"10.244.0.0/16","ipv6Network":"fd00::/48","backend":{"type":%q}}`
	v6only := `{"ipv6Network":"fd00::/48","backend":{"type":%q}%s}`
	selfDual := mk6("a", "10.244.1.0/24", "fd00:0:0:1::/64", "192.0.2.1", "2001:db8:1::1")
	self6 := mk6("a", "", "fd00:0:0:1::/64", "", "2001:db8:1::1")
	nearDual := mk6("b", "10.244.2.0/24", "fd00:0:0:2::/64", "192.0.2.2", "2001:db8:1::2")
	near4 := mk6("b", "10.244.2.0/24", "fd00:0:0:2::/64", "192.0.2.2", "")       // IPv4 underlay only
	far6 := mk6("c", "", "fd00:0:0:3::/64", "", "2001:db8:2::3")                 // IPv6 underlay, off-link
	far4only := mk6("c", "10.244.3.0/24", "fd00:0:0:3::/64", "198.51.100.3", "") // no IPv6 underlay, off-link
	macA, macB, macC := VTEPMAC("a").String(), VTEPMAC("b").String(), VTEPMAC("c").String()
	tests := []struct {
		name, config, backend string
		self                  lease.Lease
		peers                 []lease.Lease
		want                  string
	}{
		{"dual host-gw, both underlays", dual, config.HostGW, selfDual, []lease.Lease{nearDual}, `route 10.244.2.0/24 via 192.0.2.2 dev eth0
route fd00:0:0:2::/64 via 2001:db8:1::2 dev eth0
peer b direct
allow b from 192.0.2.2 inner 10.244.2.0/24 inner6 fd00:0:0:2::/64
pod mtu 1500
nat 10.244.0.0/16 10.244.1.0/24 final false v6 fd00::/48 fd00:0:0:1::/64 masquerade true
`},
		{"dual host-gw, IPv4 underlay only: IPv6 has no next hop", dual, config.HostGW, selfDual, []lease.Lease{near4}, `peer b unreachable (host-gw: it has no IPv6 underlay address (an IPv6 route needs an IPv6 next hop) (use the hybrid or vxlan backend to reach it))
pod mtu 1500
nat 10.244.0.0/16 10.244.1.0/24 final false v6 fd00::/48 fd00:0:0:1::/64 masquerade true
`},
		{"dual hybrid, IPv4 underlay only: both families by VXLAN", dual, config.Hybrid, selfDual, []lease.Lease{near4}, fmt.Sprintf(`route 10.244.2.0/24 via 10.244.2.0 dev na.1 onlink mtu 1450
route fd00:0:0:2::/64 via fd00:0:0:2:: dev na.1 onlink mtu 1450
neigh 10.244.2.0 %[1]s
neigh fd00:0:0:2:: %[1]s
fdb %[1]s dst 192.0.2.2
peer b vxlan
allow b from 192.0.2.2 inner 10.244.2.0/24 inner6 fd00:0:0:2::/64
allow-list port 8472 network 10.244.0.0/16 /24 network6 fd00::/48 /64
vxlan na.1 vni 1 port 8472 dev eth0 local 192.0.2.1 addr 10.244.1.0/32 mac %[2]s mtu 1450
pod mtu 1500
nat 10.244.0.0/16 10.244.1.0/24 final false v6 fd00::/48 fd00:0:0:1::/64 masquerade true
`, macB, macA)},
		{"dual host-gw, IPv6 underlay only: IPv4 via the IPv6 next hop", dual, config.HostGW, mk6("a", "10.244.1.0/24", "fd00:0:0:1::/64", "", "2001:db8:1::1"),
			[]lease.Lease{mk6("b", "10.244.2.0/24", "fd00:0:0:2::/64", "", "2001:db8:1::2")}, `route 10.244.2.0/24 via 2001:db8:1::2 dev eth0
route fd00:0:0:2::/64 via 2001:db8:1::2 dev eth0
peer b direct
allow b from 2001:db8:1::2 inner 10.244.2.0/24 inner6 fd00:0:0:2::/64
pod mtu 1500
nat 10.244.0.0/16 10.244.1.0/24 final false v6 fd00::/48 fd00:0:0:1::/64 masquerade true
`},
		{"dual vxlan over IPv4: one device, neighbours of both families", dual, config.VXLAN, selfDual, []lease.Lease{far4only, nearDual}, fmt.Sprintf(`route 10.244.2.0/24 via 10.244.2.0 dev na.1 onlink
route 10.244.3.0/24 via 10.244.3.0 dev na.1 onlink
route fd00:0:0:2::/64 via fd00:0:0:2:: dev na.1 onlink
route fd00:0:0:3::/64 via fd00:0:0:3:: dev na.1 onlink
neigh 10.244.2.0 %[1]s
neigh 10.244.3.0 %[2]s
neigh fd00:0:0:2:: %[1]s
neigh fd00:0:0:3:: %[2]s
fdb %[2]s dst 198.51.100.3
fdb %[1]s dst 192.0.2.2
peer b vxlan
peer c vxlan
allow b from 192.0.2.2 inner 10.244.2.0/24 inner6 fd00:0:0:2::/64
allow c from 198.51.100.3 inner 10.244.3.0/24 inner6 fd00:0:0:3::/64
allow-list port 8472 network 10.244.0.0/16 /24 network6 fd00::/48 /64
vxlan na.1 vni 1 port 8472 dev eth0 local 192.0.2.1 addr 10.244.1.0/32 mac %[3]s mtu 1450
pod mtu 1450
nat 10.244.0.0/16 10.244.1.0/24 final false v6 fd00::/48 fd00:0:0:1::/64 masquerade true
`, macB, macC, macA)},
		{"IPv6-only hybrid over IPv6: direct on-link, VXLAN over IPv6 off-link", v6only, config.Hybrid, self6, []lease.Lease{mk6("b", "", "fd00:0:0:2::/64", "", "2001:db8:1::2"), far6}, fmt.Sprintf(`route fd00:0:0:2::/64 via 2001:db8:1::2 dev eth0
route fd00:0:0:3::/64 via fd00:0:0:3:: dev na.1 onlink mtu 1430
neigh fd00:0:0:3:: %[1]s
fdb %[1]s dst 2001:db8:2::3
peer b direct
peer c vxlan
allow b from 2001:db8:1::2 inner invalid Prefix inner6 fd00:0:0:2::/64
allow c from 2001:db8:2::3 inner invalid Prefix inner6 fd00:0:0:3::/64
allow-list port 8472 network invalid Prefix /0 network6 fd00::/48 /64 over ipv6
vxlan na.1 vni 1 port 8472 dev eth0 local 2001:db8:1::1 addr invalid Prefix mac %[2]s mtu 1430
pod mtu 1500
nat invalid Prefix invalid Prefix final false v6 fd00::/48 fd00:0:0:1::/64 masquerade false
`, macC, macA)},
		{"IPv6 underlay VXLAN: a peer without an IPv6 underlay address", v6only, config.VXLAN, self6, []lease.Lease{mk6("c", "", "fd00:0:0:3::/64", "198.51.100.3", "")}, fmt.Sprintf(`peer c unreachable (the peer has no IPv6 underlay address, the family this node's VXLAN runs over)
allow-list port 8472 network invalid Prefix /0 network6 fd00::/48 /64 over ipv6
vxlan na.1 vni 1 port 8472 dev eth0 local 2001:db8:1::1 addr invalid Prefix mac %[1]s mtu 1430
pod mtu 1430
nat invalid Prefix invalid Prefix final false v6 fd00::/48 fd00:0:0:1::/64 masquerade true
`, macA)},
		{"IPv6 subnet outside, overlapping or taken", dual, config.HostGW, selfDual, []lease.Lease{nearDual,
			mk6("d", "10.244.4.0/24", "fd99::/64", "192.0.2.4", ""),
			mk6("e", "10.244.5.0/24", "fd00:0:0:2::/64", "192.0.2.5", ""),
			mk6("f", "10.244.6.0/24", "fd00:0:0:1::/80", "192.0.2.6", ""),
			mk6("g", "10.244.7.0/24", "10.244.8.0/24", "192.0.2.7", "")}, `route 10.244.2.0/24 via 192.0.2.2 dev eth0
route fd00:0:0:2::/64 via 2001:db8:1::2 dev eth0
peer b direct
peer d unreachable (subnet fd99::/64 is outside the cluster network fd00::/48)
peer e unreachable (subnet fd00:0:0:2::/64 is also held by b)
peer f unreachable (subnet fd00:0:0:1::/80 overlaps fd00:0:0:1::/64 of a)
peer g unreachable (invalid IPv6 subnet 10.244.8.0/24)
allow b from 192.0.2.2 inner 10.244.2.0/24 inner6 fd00:0:0:2::/64
pod mtu 1500
nat 10.244.0.0/16 10.244.1.0/24 final false v6 fd00::/48 fd00:0:0:1::/64 masquerade true
`},
		{"IPv4 config ignores IPv6 subnets", `{"network":"10.244.0.0/16","backend":{"type":%q}}`, config.HostGW, selfDual, []lease.Lease{nearDual}, `route 10.244.2.0/24 via 192.0.2.2 dev eth0
peer b direct
allow b from 192.0.2.2 inner 10.244.2.0/24
pod mtu 1500
nat 10.244.0.0/16 10.244.1.0/24 final false
`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			js := fmt.Sprintf(tt.config, tt.backend)
			if strings.Count(tt.config, "%") == 2 {
				extra := ""
				if strings.Contains(tt.name, "hybrid") {
					extra = `,"ipv6Masquerade":false`
				}
				js = fmt.Sprintf(tt.config, tt.backend, extra)
			}
			buildsAs(t, Input{Config: cfgJSON(t, js), Self: tt.self, Peers: refs(tt.peers), Underlay: underlay6, VXLANDev: "na.1"}, tt.want)
		})
	}
}

func TestMTUOverride(t *testing.T) {
	c := cfg(t, config.VXLAN)
	c.MTU = 1400
	p := Build(Input{Config: c, Self: mk("a", "10.244.1.0/24", "192.0.2.1"), Underlay: underlay, VXLANDev: "na.1"})
	if p.PodMTU != 1400 {
		t.Errorf("PodMTU = %d, want the configured 1400", p.PodMTU)
	}
}

func TestVTEPMACStable(t *testing.T) {
	a, b := VTEPMAC("node-1"), VTEPMAC("node-1")
	if a.String() != b.String() || a.String() == VTEPMAC("node-2").String() {
		t.Errorf("VTEPMAC not stable/unique: %s %s %s", a, b, VTEPMAC("node-2"))
	}
	if a[0]&0x01 != 0 || a[0]&0x02 == 0 {
		t.Errorf("VTEPMAC %s is not a locally administered unicast address", a)
	}
}

func BenchmarkBuild5000(b *testing.B) {
	c := cfg(b, config.Hybrid)
	c.Network = netip.MustParsePrefix("10.0.0.0/8")
	c.SubnetLen = 24
	var peers []lease.Lease
	for i := range 5000 {
		ip := "192.0.2.9"
		if i%2 == 0 {
			ip = fmt.Sprintf("198.51.%d.%d", i/250, i%250+1)
		}
		peers = append(peers, mk(fmt.Sprint("n", i), fmt.Sprintf("10.%d.%d.0/24", i/256, i%256), ip))
	}
	in := Input{Config: c, Self: mk("self", "10.250.0.0/24", "192.0.2.1"), Peers: refs(peers), Underlay: underlay, VXLANDev: "na.1"}
	b.ReportAllocs()
	for b.Loop() {
		p := Build(in)
		if len(p.Peers) != 5000 {
			b.Fatal(len(p.Peers))
		}
	}
}

// A peer's underlay MAC is kept for the VXLAN allow-list only when the peer is on-link
// (behind a router its frames carry the router's MAC), the same in Build and the Planner.
func TestUnderlayMAC(t *testing.T) {
	withMAC := func(l lease.Lease, mac string) lease.Lease { l.UnderlayMAC = mac; return l }
	peers := []lease.Lease{
		withMAC(mk("near", "10.244.2.0/24", "192.0.2.12"), "02:00:00:00:00:12"),
		withMAC(mk("far", "10.244.3.0/24", "198.51.100.13"), "02:00:00:00:00:13"),
		mk("old", "10.244.4.0/24", "192.0.2.14"), // an agent that publishes none
	}
	want := map[string]string{"near": "02:00:00:00:00:12", "far": "", "old": ""}
	in := Input{Config: cfg(t, "vxlan"), Self: mk("self", "10.244.1.0/24", "192.0.2.11"), Peers: refs(peers), Underlay: underlay, VXLANDev: "netagent.1"}
	planner, p := NewPlanner(in)
	for _, v := range p.Peers {
		if v.UnderlayMAC != want[v.Node] {
			t.Errorf("Build: %s UnderlayMAC = %q, want %q", v.Node, v.UnderlayMAC, want[v.Node])
		}
		if pv, _ := planner.Peer(v.Node); pv != v {
			t.Errorf("Planner.Peer(%s) = %+v, want %+v", v.Node, pv, v)
		}
	}
}

// The plan names the VXLAN device itself when the input does not, and route mode (a
// Docker host) makes the NAT exemption final.
func TestHeader(t *testing.T) {
	self := mk("a", "10.244.1.0/24", "192.0.2.1")
	for _, tt := range []struct {
		name      string
		in        Input
		wantDev   string
		wantFinal bool
	}{
		{"default name", Input{Config: cfg(t, config.VXLAN), Self: self, Underlay: underlay}, "netagent.1", false},
		{"long VNI", Input{Config: func() config.Network { c := cfg(t, config.VXLAN); c.Backend.VNI = 16000000; return c }(), Self: self, Underlay: underlay}, "na.16000000", false},
		{"route mode", Input{Config: cfg(t, config.Hybrid), Self: self, Underlay: underlay, Docker: true}, "netagent.1", true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p := Build(tt.in)
			if p.VXLAN == nil || p.VXLAN.Name != tt.wantDev || p.VXLAN.Underlay != "eth0" || p.VXLAN.MAC != VTEPMAC("a").String() {
				t.Errorf("Build().VXLAN = %+v, want device %s on eth0 with MAC %s", p.VXLAN, tt.wantDev, VTEPMAC("a"))
			}
			if p.NAT.Final != tt.wantFinal {
				t.Errorf("Build().NAT.Final = %t, want %t", p.NAT.Final, tt.wantFinal)
			}
		})
	}
}

// A host-gw node keeps a VXLAN device the kernel still has while a peer publishes a VTEP
// (it may be sending through it), guarded on the device's port; no other backend does.
func TestKeepVXLAN(t *testing.T) {
	self := mk("self", "10.244.1.0/24", "192.0.2.1")
	vtep := mk("n2", "10.244.2.0/24", "192.0.2.2")
	noVTEP := vtep
	noVTEP.VTEPMAC = ""
	tunnels := []Tunnel{{Name: "netagent.9", Port: 4789}, {Name: "netagent.1", Port: 8472}}
	for _, c := range []struct {
		name     string
		backend  string
		tunnels  []Tunnel
		peers    []lease.Lease
		keep     string
		port     int
		hasVXLAN bool
	}{
		{"host-gw, a peer with a VTEP", config.HostGW, tunnels, []lease.Lease{vtep}, "netagent.1", 8472, false},
		{"host-gw, no peer with a VTEP", config.HostGW, tunnels, []lease.Lease{noVTEP}, "", 0, false},
		{"host-gw, no device left", config.HostGW, nil, []lease.Lease{vtep}, "", 0, false},
		{"host-gw, only self has a VTEP", config.HostGW, tunnels, []lease.Lease{self}, "", 0, false},
		{"vxlan", config.VXLAN, tunnels, []lease.Lease{vtep}, "", 8472, true},
		{"wireguard", config.WireGuard, tunnels, []lease.Lease{vtep}, "", 0, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			u := underlay
			u.Tunnels = c.tunnels
			p := Build(Input{Config: cfg(t, c.backend), Self: self, Peers: refs(c.peers), Underlay: u})
			if p.KeepVXLAN != c.keep || p.Allow.Port != c.port || (p.VXLAN != nil) != c.hasVXLAN {
				t.Errorf("keep %q port %d device %v; want %q %d %v", p.KeepVXLAN, p.Allow.Port, p.VXLAN != nil, c.keep, c.port, c.hasVXLAN)
			}
			for _, r := range p.Routes {
				if strings.HasPrefix(r.Dev, "netagent.") && c.backend == config.HostGW {
					t.Errorf("host-gw plans a route on a VXLAN device: %+v", r)
				}
			}
		})
	}
}

// The wireguard backend in dual-stack and IPv6-only clusters: allowed IPs and routes of
// both families, the endpoint of the family both nodes of a pair have (IPv4 first), the MTU
// of the family WireGuard runs over (a peer reached over IPv6 from a node whose device is
// sized for IPv4 gets routes 20 bytes smaller).
func TestBuildWireGuard6(t *testing.T) {
	wg := func(l lease.Lease) lease.Lease {
		l.VTEPMAC, l.WGPublicKey, l.WGPort = "", "key-"+l.Node, 51820
		return l
	}
	dual := `{"network":"10.244.0.0/16","ipv6Network":"fd00::/48","backend":{"type":"wireguard"}}`
	v6only := `{"ipv6Network":"fd00::/48","backend":{"type":"wireguard"}}`
	selfDual := wg(mk6("a", "10.244.1.0/24", "fd00:0:0:1::/64", "192.0.2.1", "2001:db8:1::1"))
	self6 := wg(mk6("a", "", "fd00:0:0:1::/64", "", "2001:db8:1::1"))
	tests := []struct {
		name, config string
		self         lease.Lease
		peers        []lease.Lease
		want         string
	}{
		{"dual over a dual underlay: IPv4 endpoints", dual, selfDual, []lease.Lease{
			wg(mk6("b", "10.244.2.0/24", "fd00:0:0:2::/64", "192.0.2.2", "2001:db8:1::2")),
			wg(mk6("c", "10.244.3.0/24", "fd00:0:0:3::/64", "198.51.100.3", "2001:db8:2::3")),
		}, `route 10.244.2.0/24 via invalid IP dev netagent-wg
route 10.244.3.0/24 via invalid IP dev netagent-wg
route fd00:0:0:2::/64 via invalid IP dev netagent-wg
route fd00:0:0:3::/64 via invalid IP dev netagent-wg
peer b wireguard
peer c wireguard
wireguard netagent-wg port 51820 mtu 1440 addr 10.244.1.0/32 network 10.244.0.0/16 subnet 10.244.1.0/24 addr6 fd00:0:0:1::/128 network6 fd00::/48 subnet6 fd00:0:0:1::/64 psk "" underlay eth0
wgpeer b key key-b endpoint 192.0.2.2:51820 allowed 10.244.2.0/24,fd00:0:0:2::/64
wgpeer c key key-c endpoint 198.51.100.3:51820 allowed 10.244.3.0/24,fd00:0:0:3::/64
pod mtu 1440
nat 10.244.0.0/16 10.244.1.0/24 final false v6 fd00::/48 fd00:0:0:1::/64 masquerade true
`},
		{"dual: a peer with an IPv6 underlay only: IPv6 endpoint, smaller routes", dual, selfDual, []lease.Lease{
			wg(mk6("b", "10.244.2.0/24", "fd00:0:0:2::/64", "", "2001:db8:1::2")),
		}, `route 10.244.2.0/24 via invalid IP dev netagent-wg mtu 1420
route fd00:0:0:2::/64 via invalid IP dev netagent-wg mtu 1420
peer b wireguard
wireguard netagent-wg port 51820 mtu 1440 addr 10.244.1.0/32 network 10.244.0.0/16 subnet 10.244.1.0/24 addr6 fd00:0:0:1::/128 network6 fd00::/48 subnet6 fd00:0:0:1::/64 psk "" underlay eth0
wgpeer b key key-b endpoint [2001:db8:1::2]:51820 allowed 10.244.2.0/24,fd00:0:0:2::/64
pod mtu 1440
nat 10.244.0.0/16 10.244.1.0/24 final false v6 fd00::/48 fd00:0:0:1::/64 masquerade true
`},
		{"IPv6 not masqueraded: routable for the underlay guard", `{"ipv6Network":"fd00::/48","ipv6Masquerade":false,"backend":{"type":"wireguard"}}`, self6, []lease.Lease{
			wg(mk6("b", "", "fd00:0:0:2::/64", "", "2001:db8:1::2")),
		}, `route fd00:0:0:2::/64 via invalid IP dev netagent-wg
peer b wireguard
wireguard netagent-wg port 51820 mtu 1420 addr invalid Prefix network invalid Prefix subnet invalid Prefix addr6 fd00:0:0:1::/128 network6 fd00::/48 subnet6 fd00:0:0:1::/64 routable6 psk "" underlay eth0
wgpeer b key key-b endpoint [2001:db8:1::2]:51820 allowed fd00:0:0:2::/64
pod mtu 1420
nat invalid Prefix invalid Prefix final false v6 fd00::/48 fd00:0:0:1::/64 masquerade false
`},
		{"IPv6-only over an IPv6 underlay", v6only, self6, []lease.Lease{
			wg(mk6("b", "", "fd00:0:0:2::/64", "", "2001:db8:1::2")),
			wg(mk6("c", "", "fd00:0:0:3::/64", "", "2001:db8:2::3")),
			wg(mk6("d", "", "fd00:0:0:4::/64", "198.51.100.4", "")),
		}, `route fd00:0:0:2::/64 via invalid IP dev netagent-wg
route fd00:0:0:3::/64 via invalid IP dev netagent-wg
peer b wireguard
peer c wireguard
peer d unreachable (WireGuard: the peer's underlay address (198.51.100.4) is of no family this node has one of)
wireguard netagent-wg port 51820 mtu 1420 addr invalid Prefix network invalid Prefix subnet invalid Prefix addr6 fd00:0:0:1::/128 network6 fd00::/48 subnet6 fd00:0:0:1::/64 psk "" underlay eth0
wgpeer b key key-b endpoint [2001:db8:1::2]:51820 allowed fd00:0:0:2::/64
wgpeer c key key-c endpoint [2001:db8:2::3]:51820 allowed fd00:0:0:3::/64
pod mtu 1420
nat invalid Prefix invalid Prefix final false v6 fd00::/48 fd00:0:0:1::/64 masquerade true
`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			buildsAs(t, Input{Config: cfgJSON(t, tt.config), Self: tt.self, Peers: refs(tt.peers), Underlay: underlay6}, tt.want)
		})
	}
}

// buildsAs checks that Build renders in as want, and that a new Planner's first plan is
// the same.
func buildsAs(t *testing.T, in Input, want string) {
	t.Helper()
	got := render(Build(in))
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Build() mismatch (-want +got):\n%s", diff)
	}
	_, first := NewPlanner(in)
	if diff := cmp.Diff(got, render(first)); diff != "" {
		t.Errorf("NewPlanner() differs from Build (-build +planner):\n%s", diff)
	}
}

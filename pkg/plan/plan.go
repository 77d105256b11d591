// Package plan turns a snapshot of the node's inputs (config, own lease, peer leases,
// underlay facts) into the desired dataplane: routes, the VXLAN device, its FDB and
// neighbour entries, the VXLAN allow-list, the pod MTU and the NAT rules. Everything the
// kernel should hold is decided here and nothing after it: the dataplane only makes the
// kernel match. It is pure — it touches nothing — so every decision is covered by table
// tests without root.
//
// IPv6 and dual-stack: "on the same L2" is decided per family. A direct IPv6 route needs
// an on-link IPv6 next hop, the peer's IPv6 underlay address (Linux has no IPv6 route via
// an IPv4 gateway); a direct IPv4 route goes via the peer's IPv4 underlay address, or,
// where only IPv6 is on-link, via its IPv6 one (RFC 5549, RTA_VIA, Linux 5.2+). A peer is
// routed directly when every family it has can be: host-gw marks it unreachable otherwise
// (a dual-stack host-gw cluster needs a dual-stack underlay, as with flannel), hybrid
// sends both families through VXLAN. One VXLAN device carries both inner families: it
// runs over the node's IPv4 underlay address, or its IPv6 one when it has no IPv4 one;
// peers without an address of that family cannot be reached by VXLAN. Its IPv6 routes go
// via the peer's IPv6 subnet address (onlink), with a permanent neighbour entry for it, as
// for IPv4; the FDB entry, per peer, serves both.
//
// Scale: Build is O(peers): two passes over the leases with map lookups, no sorting and no
// re-parsing. The reconcilers diff the plan against mirrors of the kernel, so one changed
// lease costs one changed route, not a rewrite.
package plan

import (
	"encoding/hex"
	"fmt"
	"iter"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/multimap"
	"github.com/netagent/netagent/pkg/wireguard"
)

// Mode is how a peer is reached.
type Mode string

const (
	Direct      Mode = "direct"      // a route via the peer's underlay address
	VXLAN       Mode = "vxlan"       // through the VXLAN device
	Unreachable Mode = "unreachable" // host-gw towards a peer that is not on-link, or bad data
	WireGuard   Mode = "wireguard"   // through the WireGuard device, encrypted
)

// DefaultWGDev is the WireGuard device's name unless Input.WGDev names another (nodes in
// network namespaces of one host need one each: wireguard-go's sockets share one directory).
const DefaultWGDev = "netagent-wg"

// Underlay describes the node's interface towards its peers.
type Underlay struct {
	Dev string
	MTU int
	// Connected are the prefixes directly attached to Dev (both families): a peer whose
	// public IP falls inside one shares the L2 and can be routed to directly.
	Connected []netip.Prefix
	// Tunnels are netagent's VXLAN devices the kernel holds now (read with the underlay on
	// every full pass): see Plan.KeepVXLAN.
	Tunnels []Tunnel
}

// Tunnel is a VXLAN device of netagent's naming found in the kernel.
type Tunnel struct {
	Name string
	Port int // its UDP port
}

// onLink reports whether a is inside one of the connected prefixes.
func (u Underlay) onLink(a netip.Addr) bool {
	if !a.IsValid() {
		return false
	}
	for _, c := range u.Connected {
		if c.Contains(a) {
			return true
		}
	}
	return false
}

// Input is everything a plan depends on.
type Input struct {
	Config config.Network
	Self   lease.Lease
	// Peers are the peers' leases. A Planner keeps them (shared with the peer view that
	// handed them out: never changed by anyone); none may be nil.
	Peers    []*lease.Lease
	Underlay Underlay
	// VXLANDev is the name of the VXLAN device; empty: VXLANDevName(the VNI).
	VXLANDev string
	// Docker is route mode (a bare Docker host): see NAT.Final.
	Docker bool
	// WGDev is the WireGuard device's name (wireguard backend); empty: DefaultWGDev.
	WGDev string
}

// Route is a desired route in the main table.
type Route struct {
	Dst    netip.Prefix
	Gw     netip.Addr
	Dev    string
	OnLink bool
	MTU    int // 0: the device's
}

// Neigh is a permanent neighbour entry on the VXLAN device.
type Neigh struct {
	IP  netip.Addr
	MAC string
}

// FDB is a forwarding entry on the VXLAN device: frames for MAC go to Dst over UDP.
type FDB struct {
	MAC string
	Dst netip.Addr
}

// Peer is the plan's verdict on one peer.
type Peer struct {
	Node      string
	Subnet    netip.Prefix
	PublicIP  netip.Addr
	Subnet6   netip.Prefix // of an enabled IPv6 family only
	PublicIP6 netip.Addr
	Mode      Mode
	Reason    string // why Unreachable
	// UnderlayMAC is the outer source MAC of the peer's VXLAN packets: set for a peer on
	// the same L2 that published it, for the VXLAN allow-list to check.
	UnderlayMAC string
}

// VXLANDevice is the desired VXLAN device (nil when no peer or mode needs one).
type VXLANDevice struct {
	Name     string
	VNI      int
	Port     int
	Underlay string     // the device VXLAN packets leave by
	Local    netip.Addr // the node's underlay address VXLAN runs over (IPv4, else IPv6)
	// Addr is the node's VTEP address: its IPv4 subnet's network address, /32; unset in an
	// IPv6-only cluster (the node's own IPv6 traffic takes the bridge's address).
	Addr netip.Prefix
	MAC  string // VTEPMAC(node): peers' neighbour entries name it
	MTU  int
}

// WGDevice is the node's desired WireGuard device (wireguard backend). Its private key is
// not here: the dataplane reads it from the node's state directory, so no plan, status or
// log can carry it.
type WGDevice struct {
	Name string
	Port int // listen port
	MTU  int // underlay MTU - wireguard.Overhead of the family WireGuard runs over here
	// Addr and Addr6 are the network addresses of the node's subnets (/32 and /128; unset
	// for a family the cluster has not), on the device: node-originated traffic through it
	// leaves with this source (inside our subnet, so peers' allowed IPs accept it), without
	// depending on the pods' bridge existing yet.
	Addr, Addr6 netip.Prefix
	// Network and Network6 are the pod networks (unset: that family is off): every peer's
	// allowed IPs lie inside them.
	Network, Network6 netip.Prefix
	// Subnet and Subnet6 are this node's subnets: no peer may claim them.
	Subnet, Subnet6 netip.Prefix
	// Routable6 says IPv6 pods are not masqueraded (config ipv6Masquerade false): replies
	// from the outside reach them from the underlay, in clear, so the underlay guard drops
	// only IPv6 packets that claim a pod source.
	Routable6 bool
	// PSKFile is the pre-shared key's path on this node (config backend.pskFile); "": none.
	PSKFile string
	// Underlay is the device WireGuard's UDP leaves by: unencrypted packets for the pod
	// networks arriving on it are dropped.
	Underlay string
}

// WGPeer is one peer of the WireGuard device: its public key (checked when its lease was
// decoded), endpoint (public IP and WireGuard port; see wgEndpoint) and allowed IPs (its
// pod subnets, Subnet and Subnet6, of the families the cluster has).
type WGPeer struct {
	Node            string
	PublicKey       string
	Endpoint        netip.AddrPort
	Subnet, Subnet6 netip.Prefix // either unset
}

// AllowedIPs are the peer's subnets, IPv4 first.
func (w WGPeer) AllowedIPs() []netip.Prefix {
	return subnetLease{&lease.Lease{Subnet: w.Subnet, Subnet6: w.Subnet6}}.subnets()
}

// AllowList is the VXLAN allow-list: which peers may send VXLAN to this node, and what.
type AllowList struct {
	Port      int          // the VXLAN port; 0: no VXLAN here, nothing is accepted
	Network   netip.Prefix // the cluster pod network: VXLAN sent by pods is dropped
	SubnetLen int          // inner sources are matched by their subnet of this length
	// Network6 and SubnetLen6 are the same for IPv6 (Network6 unset: no IPv6).
	Network6   netip.Prefix
	SubnetLen6 int
	// Underlay6 says VXLAN runs over IPv6 here: peers' VXLAN comes from their IPv6 addresses.
	Underlay6 bool
	Peers     map[string]Allowed
}

// Allowed is what VXLAN from one peer may look like: from its public IP (and, on the same
// L2, its underlay MAC), carrying its pods' or its own addresses.
type Allowed struct {
	IP      netip.Addr // the peer's VXLAN source: its underlay address of the VXLAN family
	Subnet  netip.Prefix
	Subnet6 netip.Prefix // unset: none
	MAC     string       // empty: not checked
}

// allowed is the allow-list entry of a peer: every peer the plan routes to (a directly
// routed peer sends no VXLAN, but allowing it costs nothing and survives a mode change).
// v6 says the VXLAN underlay is IPv6.
func allowed(v Peer, v6 bool) (Allowed, bool) {
	if v.Mode != Direct && v.Mode != VXLAN {
		return Allowed{}, false
	}
	ip := v.PublicIP
	if v6 {
		ip = v.PublicIP6
	}
	if !ip.IsValid() {
		return Allowed{}, false // cannot send us VXLAN
	}
	return Allowed{IP: ip, Subnet: v.Subnet, Subnet6: v.Subnet6, MAC: v.UnderlayMAC}, true
}

// Plan is the desired dataplane. Its lists follow the order of Input.Peers (consumers
// treat them as sets; sorting thousands of entries on every pass is not worth it).
type Plan struct {
	// Gen numbers a Planner's plans (0: from Build), so the dataplane can tell whether a
	// Delta follows the plan it last applied.
	Gen    uint64
	Routes []Route
	Neighs []Neigh
	FDB    []FDB
	Peers  []Peer
	// VXLAN is the node's VXLAN device; nil: none. Any other VXLAN device of netagent's
	// naming (an earlier backend's or VNI's) is not desired and goes.
	VXLAN *VXLANDevice
	// KeepVXLAN names a VXLAN device already in the kernel that stays although the plan
	// names none: the node moved from vxlan or hybrid to host-gw, and peers whose leases
	// still carry a VTEP may send through it until they see this node's new lease (or
	// are moved too). It only receives: no routes, neighbour or FDB entries are planned on
	// it, and the allow-list guards its port. Empty: none is kept.
	KeepVXLAN string
	// WireGuard is the node's WireGuard device (wireguard backend); nil: none. WGPeers
	// are its peers, one per node in mode WireGuard.
	WireGuard *WGDevice
	WGPeers   []WGPeer
	PodMTU    int
	NAT       NAT
	Allow     AllowList
	// Delta is set on a plan from Planner.Update: it is all that changed since plan
	// Delta.From, and the plan then carries no per-peer lists (Routes, Neighs, FDB, Peers,
	// Allow.Peers are empty): rendering thousands of entries for every lease event would
	// cost more than the event.
	Delta *Delta
}

// NAT is what the NAT reconciler needs.
type NAT struct {
	Network netip.Prefix // the cluster pod network (unset: no IPv4)
	Subnet  netip.Prefix // this node's pod subnet
	// Network6 and Subnet6 are the same for IPv6 (unset: no IPv6 rules); Masquerade6 says
	// whether IPv6 pod egress is masqueraded (the FORWARD accepts are written either way).
	Network6, Subnet6 netip.Prefix
	Masquerade6       bool
	// Final is set on Docker hosts (route mode). It makes the pod-to-pod exemption end NAT
	// processing (ACCEPT) instead of returning to the built-in chain, since Docker's own
	// MASQUERADE follows ours (wrong under kube-proxy, whose hairpin masquerade must still
	// see pod-to-pod packets); and it narrows the FORWARD accepts to traffic between the
	// cluster network and this host's subnet, below DOCKER-USER and Docker's isolation.
	Final bool
}

// Build computes the plan. It never fails: bad peers are marked Unreachable with a reason.
func Build(in Input) Plan {
	c := in.Config
	if in.VXLANDev == "" {
		in.VXLANDev = VXLANDevName(c.Backend.VNI)
	}
	self := enabled(c, &in.Self)
	p := Plan{
		NAT: NAT{Network: c.Network, Subnet: self.Subnet, Final: in.Docker,
			Network6: c.IPv6Network, Subnet6: self.Subnet6, Masquerade6: c.Masquerade6()},
		Allow: AllowList{Network: c.Network, SubnetLen: c.SubnetLen, Network6: c.IPv6Network, SubnetLen6: c.IPv6SubnetLen,
			Peers: make(map[string]Allowed, len(in.Peers))},
	}
	mtu := underlayMTU(in)
	tunnelMTU := mtu - config.VXLANOverhead
	if vxlan6(in.Self) {
		tunnelMTU = mtu - config.VXLANOverhead6
	}
	backend := c.Backend.Type
	if backend == config.WireGuard {
		tunnelMTU = mtu - wireguard.Overhead(!in.Self.PublicIP.IsValid())
		p.WireGuard = wgDevice(in, self, tunnelMTU)
	}
	if backend == config.VXLAN || backend == config.Hybrid {
		p.VXLAN = &VXLANDevice{
			Name:     in.VXLANDev,
			VNI:      c.Backend.VNI,
			Port:     c.Backend.Port,
			Underlay: in.Underlay.Dev,
			Local:    in.Self.PublicIP,
			MAC:      VTEPMAC(in.Self.Node).String(),
			MTU:      tunnelMTU,
		}
		if vxlan6(in.Self) {
			p.VXLAN.Local = in.Self.PublicIP6
		}
		if self.Subnet.IsValid() {
			p.VXLAN.Addr = netip.PrefixFrom(self.Subnet.Addr(), 32)
		}
		p.Allow.Port = c.Backend.Port
	}
	keepVXLAN(&p, in, vxlanSenders(in.Self.Node, in.Peers) > 0)
	switch {
	case c.MTU != 0:
		p.PodMTU = c.MTU
	case backend == config.VXLAN || backend == config.WireGuard:
		p.PodMTU = tunnelMTU
	default:
		// host-gw, and hybrid: directly routed peers keep the full MTU; VXLAN routes carry
		// the tunnel MTU themselves.
		p.PodMTU = mtu
	}

	// Owners first, so a contested subnet goes to the same node whatever the input order:
	// this node for its own subnet, else the smallest node name among its claimants.
	owner := make(map[netip.Prefix]string, len(in.Peers)+1)
	for _, s := range self.subnets() {
		owner[s] = in.Self.Node
	}
	for _, pl := range in.Peers {
		l := enabled(c, pl)
		if l.Node == in.Self.Node || quickInvalid(l) != "" {
			continue
		}
		for _, s := range l.subnets() {
			if o, ok := owner[s]; !ok || (o != in.Self.Node && l.Node < o) {
				owner[s] = l.Node
			}
		}
	}
	var wgKeys map[string][]string
	if p.WireGuard != nil {
		wgKeys = wgKeyHolders(in.Self.Node, in.Peers)
		p.WGPeers = make([]WGPeer, 0, len(in.Peers))
	}
	p.Peers = make([]Peer, 0, len(in.Peers))
	p.Routes = make([]Route, 0, len(in.Peers))
	var vteps multimap.Map[vtep, string]
	if p.VXLAN != nil {
		vteps = vtepHolders(in.Self.Node, in.Peers)
		p.Neighs = make([]Neigh, 0, len(in.Peers))
		p.FDB = make([]FDB, 0, len(in.Peers))
	}
	for _, pl := range in.Peers {
		if pl.Node == in.Self.Node {
			continue
		}
		l := enabled(c, pl)
		peer := peerOf(in.Underlay, l)
		peer.Mode, peer.Reason = decide(in, l, owner)
		switch peer.Mode {
		case WireGuard:
			peer.Mode, peer.Reason = wgShared(l.Lease, wgKeys[l.WGPublicKey])
		case VXLAN:
			peer.Mode, peer.Reason = vtepShared(l.Lease, vteps)
		}
		p.Peers = append(p.Peers, peer)
		if a, ok := allowed(peer, vxlan6(in.Self)); ok {
			p.Allow.Peers[peer.Node] = a
		}
		switch peer.Mode {
		case Direct:
			for _, s := range l.subnets() {
				p.Routes = append(p.Routes, Route{Dst: s, Gw: nextHop(in, l, s.Addr().Is6()), Dev: in.Underlay.Dev})
			}
		case VXLAN:
			mac := strings.ToLower(l.VTEPMAC)
			for _, s := range l.subnets() {
				vtep := s.Addr()
				r := Route{Dst: s, Gw: vtep, Dev: in.VXLANDev, OnLink: true}
				if backend == config.Hybrid && p.PodMTU > tunnelMTU {
					r.MTU = tunnelMTU
				}
				p.Routes = append(p.Routes, r)
				p.Neighs = append(p.Neighs, Neigh{IP: vtep, MAC: mac})
			}
			p.FDB = append(p.FDB, FDB{MAC: mac, Dst: l.PublicIPOf(vxlan6(in.Self))})
		case WireGuard:
			wp := wgPeer(in, l)
			for _, s := range l.subnets() {
				p.Routes = append(p.Routes, wgRoute(in, wp, s))
			}
			p.WGPeers = append(p.WGPeers, wp)
		}
	}
	return p
}

// keepVXLAN sets p.KeepVXLAN and the allow-list's port on a host-gw node that still has
// a VXLAN device while some peer publishes a VTEP (senders): that peer may be sending
// through the device until it sees this node's lease. With several devices (rare: an
// earlier VNI's too), the first by name stays and the others go. It also marks the
// allow-list as over IPv6 when VXLAN here runs over IPv6 (kept device or not).
func keepVXLAN(p *Plan, in Input, senders bool) {
	p.Allow.Underlay6 = p.Allow.Port != 0 && vxlan6(in.Self)
	u := in.Underlay
	if in.Config.Backend.Type != config.HostGW || !senders || len(u.Tunnels) == 0 {
		return
	}
	t := slices.MinFunc(u.Tunnels, func(a, b Tunnel) int { return strings.Compare(a.Name, b.Name) })
	p.KeepVXLAN, p.Allow.Port = t.Name, t.Port
	p.Allow.Underlay6 = vxlan6(in.Self)
}

// vxlanSenders counts the peers (not self) whose leases publish a VTEP.
func vxlanSenders(self string, peers []*lease.Lease) int {
	n := 0
	for _, l := range peers {
		if sendsVXLAN(self, l) {
			n++
		}
	}
	return n
}

func sendsVXLAN(self string, l *lease.Lease) bool {
	return l.Node != self && lease.ValidMAC(l.VTEPMAC)
}

// peerOf is the part of a verdict that follows from the lease (l from enabled).
func peerOf(u Underlay, l subnetLease) Peer {
	return Peer{Node: l.Node, Subnet: l.Subnet, PublicIP: l.PublicIP, Subnet6: l.Subnet6, PublicIP6: l.PublicIP6, UnderlayMAC: underlayMAC(u, l.Lease)}
}

// subnetLease is a lease with only the subnets of the families the config enables. It
// points to the lease it was made from when that has no others (the usual case: the peer
// view drops them too), so the planner keeps no copy of it.
type subnetLease struct{ *lease.Lease }

// enabled is l without its subnets of families the config has off.
func enabled(c config.Network, l *lease.Lease) subnetLease {
	off4, off6 := !c.HasV4() && l.Subnet.IsValid(), !c.HasV6() && l.Subnet6.IsValid()
	if !off4 && !off6 {
		return subnetLease{l}
	}
	cp := *l
	if off4 {
		cp.Subnet = netip.Prefix{}
	}
	if off6 {
		cp.Subnet6 = netip.Prefix{}
	}
	return subnetLease{&cp}
}

// subnets are the valid subnets, IPv4 first, without allocating.
func (l subnetLease) subnets() []netip.Prefix {
	a := [2]netip.Prefix{l.Subnet, l.Subnet6}
	out := a[:0]
	for _, s := range a {
		if s.IsValid() {
			out = append(out, s)
		}
	}
	return out
}

// vxlan6 reports whether VXLAN runs over IPv6: the node has no IPv4 underlay address.
func vxlan6(self lease.Lease) bool { return !self.PublicIP.IsValid() && self.PublicIP6.IsValid() }

// nextHop is the gateway of a direct route to l's subnet of family v6 (invalid: none):
// l's underlay address of that family if it is on-link, else, for IPv4, its IPv6 one.
func nextHop(in Input, l subnetLease, v6 bool) netip.Addr {
	if a := l.PublicIPOf(v6); in.Underlay.onLink(a) {
		return a
	}
	if a := l.PublicIP6; !v6 && in.Underlay.onLink(a) {
		return a
	}
	return netip.Addr{}
}

// direct says whether every subnet of l can be routed directly; if not, why.
func direct(in Input, l subnetLease) (bool, string) {
	if l.Subnet6.IsValid() && !nextHop(in, l, true).IsValid() {
		if l.PublicIP6.IsValid() {
			return false, fmt.Sprintf("%s is not on-link from %s", l.PublicIP6, in.Underlay.Dev)
		}
		return false, "it has no IPv6 underlay address (an IPv6 route needs an IPv6 next hop)"
	}
	if l.Subnet.IsValid() && !nextHop(in, l, false).IsValid() {
		return false, fmt.Sprintf("%s is not on-link from %s", ips(l.Lease), in.Underlay.Dev)
	}
	return true, ""
}

// wgDevice is the WireGuard device of the plan of in (wireguard backend); self is in.Self
// with the enabled families' subnets only.
func wgDevice(in Input, self subnetLease, mtu int) *WGDevice {
	d := &WGDevice{
		Name:      wgDevName(in),
		Port:      in.Config.Backend.Port,
		MTU:       mtu,
		Network:   in.Config.Network,
		Network6:  in.Config.IPv6Network,
		Subnet:    self.Subnet,
		Subnet6:   self.Subnet6,
		Routable6: in.Config.HasV6() && !in.Config.Masquerade6(),
		PSKFile:   in.Config.Backend.PSKFile,
		Underlay:  in.Underlay.Dev,
	}
	if self.Subnet.IsValid() {
		d.Addr = netip.PrefixFrom(self.Subnet.Addr(), 32)
	}
	if self.Subnet6.IsValid() {
		d.Addr6 = netip.PrefixFrom(self.Subnet6.Addr(), 128)
	}
	return d
}

func wgDevName(in Input) string {
	if in.WGDev != "" {
		return in.WGDev
	}
	return DefaultWGDev
}

// wgEndpoint is the address WireGuard reaches peer l at: its IPv4 underlay address when
// both nodes have one, else its IPv6 one when both have that (invalid: no common family).
// Both sides of a pair pick the same family, so each finds the other's packets coming from
// the endpoint it has configured. A dual-stack underlay thus carries WireGuard over IPv4.
func wgEndpoint(self, l *lease.Lease) netip.Addr {
	switch {
	case self.PublicIP.IsValid() && l.PublicIP.IsValid():
		return l.PublicIP
	case self.PublicIP6.IsValid() && l.PublicIP6.IsValid():
		return l.PublicIP6
	}
	return netip.Addr{}
}

// wgPeer is the WireGuard peer of l, a peer in mode WireGuard.
func wgPeer(in Input, l subnetLease) WGPeer {
	return WGPeer{Node: l.Node, PublicKey: l.WGPublicKey, Endpoint: netip.AddrPortFrom(wgEndpoint(&in.Self, l.Lease), uint16(l.WGPort)),
		Subnet: l.Subnet, Subnet6: l.Subnet6}
}

// wgRoute is the route to w's subnet s through the device. The device's MTU is for the
// family WireGuard runs over here (IPv4 when this node has an IPv4 underlay address); a peer
// reached over IPv6 from such a node (it has no IPv4 one) costs 20 bytes more per packet,
// which its routes carry.
func wgRoute(in Input, w WGPeer, s netip.Prefix) Route {
	r := Route{Dst: s, Dev: wgDevName(in)}
	if w.Endpoint.Addr().Is6() && in.Self.PublicIP.IsValid() {
		r.MTU = underlayMTU(in) - wireguard.Overhead(true)
	}
	return r
}

// underlayMTU is the underlay's MTU (1500 when unknown).
func underlayMTU(in Input) int {
	if in.Underlay.MTU == 0 {
		return 1500
	}
	return in.Underlay.MTU
}

// wgKeyHolders maps each WireGuard public key among peers to the nodes publishing it.
func wgKeyHolders(self string, peers []*lease.Lease) map[string][]string {
	m := map[string][]string{}
	for _, l := range peers {
		if l.Node != self && l.WGPublicKey != "" && !slices.Contains(m[l.WGPublicKey], l.Node) {
			m[l.WGPublicKey] = append(m[l.WGPublicKey], l.Node)
		}
	}
	return m
}

// wgShared decides a WireGuard peer whose key holders are known: WireGuard tells peers
// apart by public key only, so two nodes publishing one key (a cloned machine's state
// directory, or a forged lease) are both left out rather than letting input order decide
// which one gets the other's traffic.
func wgShared(l *lease.Lease, holders []string) (Mode, string) {
	if other := otherHolder(l.Node, slices.Values(holders)); other != "" {
		return Unreachable, fmt.Sprintf("its WireGuard public key is also published by %s", other)
	}
	return WireGuard, ""
}

// vtep is a VTEP MAC as an index key.
type vtep [6]byte

// vtepOf is the VTEP MAC l publishes (false: none; a peer without one is no VXLAN peer).
// It does not allocate (net.ParseMAC does): Build takes every peer's.
func vtepOf(l *lease.Lease) (vtep, bool) {
	var k vtep
	s := l.VTEPMAC
	if !lease.ValidMAC(s) {
		return k, false
	}
	for i := range k {
		_, _ = hex.Decode(k[i:i+1], []byte{s[3*i], s[3*i+1]}) // valid: ValidMAC checked
	}
	return k, true
}

// vtepHolders maps each VTEP MAC among peers to the nodes publishing it.
func vtepHolders(self string, peers []*lease.Lease) multimap.Map[vtep, string] {
	m := multimap.New[vtep, string](len(peers))
	for _, l := range peers {
		if k, ok := vtepOf(l); ok && l.Node != self && !m.Contains(k, l.Node) {
			m.Add(k, l.Node)
		}
	}
	return m
}

// vtepShared decides a VXLAN peer whose VTEP MAC's holders are known. The device sends a
// MAC's frames to one underlay address, and the neighbour entries of both nodes would name
// it, so two nodes publishing one MAC (a forged lease copying another node's, or a stale
// one) are both left out, as for a shared WireGuard key: input order must not decide
// which one gets the other's traffic, and no FDB entry serves two peers.
func vtepShared(l *lease.Lease, holders multimap.Map[vtep, string]) (Mode, string) {
	k, _ := vtepOf(l)
	if other := otherHolder(l.Node, func(yield func(string) bool) { holders.Each(k, yield) }); other != "" {
		return Unreachable, fmt.Sprintf("its VTEP MAC is also published by %s", other)
	}
	return VXLAN, ""
}

// otherHolder is the smallest name among holders other than node ("": none); the
// smallest, so a reason naming it does not depend on input order.
func otherHolder(node string, holders iter.Seq[string]) string {
	other := ""
	for n := range holders {
		if n != node && (other == "" || n < other) {
			other = n
		}
	}
	return other
}

// quickInvalid checks what the plan relies on (leases from the store were fully validated
// when decoded; this keeps Build safe for any input without re-parsing every MAC).
func quickInvalid(l subnetLease) string {
	switch {
	case l.Node == "":
		return "lease without a node name"
	case !l.Subnet.IsValid() && !l.Subnet6.IsValid():
		return "no subnet of an enabled family"
	case l.Subnet.IsValid() && (!l.Subnet.Addr().Is4() || l.Subnet != l.Subnet.Masked()):
		return fmt.Sprintf("invalid subnet %s", l.Subnet)
	case l.Subnet6.IsValid() && (!l.Subnet6.Addr().Is6() || l.Subnet6.Addr().Is4In6() || l.Subnet6 != l.Subnet6.Masked()):
		return fmt.Sprintf("invalid IPv6 subnet %s", l.Subnet6)
	case !l.PublicIP.IsValid() && !l.PublicIP6.IsValid():
		return "no public IP"
	case l.PublicIP.IsValid() && (!l.PublicIP.Is4() || l.PublicIP.IsUnspecified()):
		return fmt.Sprintf("invalid public IP %s", l.PublicIP)
	case l.PublicIP6.IsValid() && (!l.PublicIP6.Is6() || l.PublicIP6.Is4In6() || l.PublicIP6.IsUnspecified()):
		return fmt.Sprintf("invalid IPv6 public IP %s", l.PublicIP6)
	}
	return ""
}

func decide(in Input, l subnetLease, owner map[netip.Prefix]string) (Mode, string) {
	if why := quickInvalid(l); why != "" {
		return Unreachable, why
	}
	for _, s := range l.subnets() {
		if why := decideSubnet(in.Config, l.Node, s, owner); why != "" {
			return Unreachable, why
		}
	}
	onLink, why := direct(in, l)
	switch in.Config.Backend.Type {
	case config.HostGW:
		if !onLink {
			return Unreachable, fmt.Sprintf("host-gw: %s (use the hybrid or vxlan backend to reach it)", why)
		}
		return Direct, ""
	case config.Hybrid:
		if onLink {
			return Direct, ""
		}
	case config.WireGuard:
		switch {
		case l.WGPublicKey == "" || l.WGPort == 0:
			return Unreachable, NoWGKey
		case l.WGPublicKey == in.Self.WGPublicKey:
			return Unreachable, "the peer publishes this node's WireGuard public key"
		case !wgEndpoint(&in.Self, l.Lease).IsValid():
			return Unreachable, fmt.Sprintf("WireGuard: the peer's underlay address (%s) is of no family this node has one of", ips(l.Lease))
		}
		return WireGuard, ""
	}
	if !l.PublicIPOf(vxlan6(in.Self)).IsValid() && !onLink {
		family := "IPv4"
		if vxlan6(in.Self) {
			family = "IPv6"
		}
		return Unreachable, fmt.Sprintf("the peer has no %s underlay address, the family this node's VXLAN runs over", family)
	}
	if !lease.ValidMAC(l.VTEPMAC) {
		// A host-gw peer has no VTEP: on-link it is routed directly, as it routes to us
		// (a cluster moving between backends, its agents restarted one by one, stays
		// connected throughout).
		if onLink {
			return Direct, ""
		}
		return Unreachable, "the peer published no VTEP MAC and is not on-link (is it running a vxlan or hybrid backend?)"
	}
	return VXLAN, ""
}

// decideSubnet says why node may not have subnet s (empty: it may).
func decideSubnet(c config.Network, node string, s netip.Prefix, owner map[netip.Prefix]string) string {
	network := c.NetworkOf(s)
	if !network.Contains(s.Addr()) || s.Bits() < network.Bits() {
		return fmt.Sprintf("subnet %s is outside the cluster network %s", s, network)
	}
	if o := owner[s]; o != node {
		return fmt.Sprintf("subnet %s is also held by %s", s, o)
	}
	// Same-length aligned subnets are equal or disjoint, so the owner map settles them; a
	// subnet of another length (a lease from before a config change) is the anomaly and
	// loses to any subnet it overlaps.
	if s.Bits() != c.SubnetLenOf(s) {
		var first netip.Prefix // the lowest overlapping subnet, for a stable reason
		for o := range owner {
			if o != s && o.Overlaps(s) && (!first.IsValid() || o.Addr().Less(first.Addr()) || (o.Addr() == first.Addr() && o.Bits() < first.Bits())) {
				first = o
			}
		}
		if first.IsValid() {
			return fmt.Sprintf("subnet %s overlaps %s of %s", s, first, owner[first])
		}
	}
	return ""
}

// ips names a lease's public IPs.
func ips(l *lease.Lease) string {
	switch {
	case !l.PublicIP6.IsValid():
		return l.PublicIP.String()
	case !l.PublicIP.IsValid():
		return l.PublicIP6.String()
	}
	return l.PublicIP.String() + " and " + l.PublicIP6.String()
}

// underlayMAC is l's underlay MAC when l is on-link (behind a router, frames carry the
// router's MAC instead).
func underlayMAC(u Underlay, l *lease.Lease) string {
	if !lease.ValidMAC(l.UnderlayMAC) {
		return ""
	}
	if u.onLink(l.PublicIP) || u.onLink(l.PublicIP6) {
		return strings.ToLower(l.UnderlayMAC)
	}
	return ""
}

// Count returns how many peers are in each mode.
func (p Plan) Count() map[Mode]int {
	m := map[Mode]int{}
	for _, peer := range p.Peers {
		m[peer.Mode]++
	}
	return m
}

// VXLANDevName is the VXLAN device's name for a VNI.
func VXLANDevName(vni int) string {
	if n := fmt.Sprintf("netagent.%d", vni); len(n) <= 15 {
		return n
	}
	return fmt.Sprintf("na.%d", vni)
}

// VTEPMAC derives the VXLAN device MAC from the node name: stable across restarts and
// device re-creation without any state on disk, so peers never hold a stale entry.
// It is a locally administered unicast address.
func VTEPMAC(node string) net.HardwareAddr {
	h := fnv64(node)
	return net.HardwareAddr{0x0e, byte(h >> 32), byte(h >> 24), byte(h >> 16), byte(h >> 8), byte(h)}
}

func fnv64(s string) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= 1099511628211
	}
	return h
}

// NoWGKey is the reason a wireguard peer without a key is unreachable: a new node publishes
// its key after its first pass, so every join shows it for a moment (logged at info).
const NoWGKey = "the peer published no WireGuard key (a new node publishes it after its first pass; else: is it running the wireguard backend?)"

// Package vxguard is the VXLAN allow-list: a node accepts VXLAN packets only from the
// underlay addresses of its known peers, carrying only inner IPv4 packets whose source is
// that peer's own (its pod subnet or its public address), and — for a peer on the same L2
// that published its underlay MAC — only with that MAC as the outer source. It drops
// VXLAN packets that pods send (so a pod cannot inject frames into the overlay, neither
// into its own node nor, masqueraded to its node's address, into another node).
//
// The inner source check bounds what spoofing a peer's outer address achieves: the
// attacker can only impersonate that one peer's pods, never another node's nor an
// outside address. The MAC binding stops spoofing a same-L2 peer from behind a router
// (frames arrive with the router's MAC) and from a host on the L2 that does not also
// forge the peer's MAC. Without authentication nothing stops an attacker who forges both
// (see SECURITY.md).
//
// It is an nftables table (family ip, "netagent"; and one of family ip6, below) written
// over netlink with github.com/google/nftables, so every change is one atomic transaction
// and costs no process: four concatenated hash sets that lease changes update element by
// element, and two base chains (S: the inner IPv4 source @th,336,32 behind the UDP and
// VXLAN headers; S/len: S masked to the configured subnet length; every accept also needs
// the inner EtherType @th,224,16 to be IPv4):
//
//	input:   udp dport <port> ip saddr . ether saddr . S/len @vxlan-l2 accept
//	         udp dport <port> ip saddr . ether saddr . S     @vxlan-l2-self accept
//	         udp dport <port> ip saddr . S/len @vxlan-peers accept
//	         udp dport <port> ip saddr . S     @vxlan-peers-self accept
//	         udp dport <port> counter drop
//	forward: ip saddr <cluster network> udp dport <port> counter drop
//
// Inner IPv6 (dual-stack and IPv6-only clusters) is matched the same way by two more sets,
// vxlan-l2-6 and vxlan-peers6 (S6: the inner IPv6 source @th,304,128 behind an inner
// EtherType 0x86dd, masked to ipv6SubnetLen).
//
// VXLAN over an IPv6 underlay is held to the same list by a second table of the same
// layout, family ip6 ("ip6 saddr" as the outer source, peers' IPv6 underlay addresses in
// its sets; the -self sets there hold the peer's IPv6 address as an inner IPv6 source),
// with the forward rule for IPv6 pods (ip6 saddr <IPv6 pod network>). It exists
// when the cluster has IPv6 pods or VXLAN runs over IPv6 (Spec.Underlay6); a peer's
// elements go to the table of its outer address's family. Both tables change in one
// transaction.
//
// Exact-match sets with the inner source masked, not interval sets: interval (pipapo)
// sets load thousands of peers far more slowly than hash sets (BENCHMARKS.md, throughput).
// The chains run just before iptables' filter chains (priority -10), so no iptables rule
// (Docker's, kube-proxy's) can accept a packet first.
package vxguard

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/multimap"
	"github.com/netagent/netagent/pkg/netipx"
)

// Names in the kernel.
const (
	Table      = "netagent"
	SetName    = "vxlan-peers"  // routed peers: outer source . inner source subnet
	SetL2      = "vxlan-l2"     // same-L2 peers: outer source . outer MAC . inner source subnet
	SetName6   = "vxlan-peers6" // SetName for inner IPv6
	SetL26     = "vxlan-l2-6"   // SetL2 for inner IPv6
	selfSuffix = "-self"        // the same with the peer's own address as inner source
	ChainIn    = "vxlan-input"
	ChainFwd   = "vxlan-forward"
	priority   = -10
	tagPrefix  = "netagent-vxguard:"
	maxBatched = 1024 // elements per netlink message: its nested element list has a 16-bit length (64 KiB)
)

// ErrNoMirror means Update was called before a Sync established what is in the kernel.
var ErrNoMirror = errors.New("vxguard: no mirror yet")

// Spec is the desired guard.
type Spec struct {
	Port      int          // VXLAN UDP port; 0: no VXLAN here, the table is removed
	Network   netip.Prefix // the cluster pod network: VXLAN from these sources is dropped
	SubnetLen int          // the configured subnet length: inner sources are matched by their subnet
	// SubnetLen6 is the same for inner IPv6 sources (0: inner IPv6 is dropped).
	SubnetLen6 int
	// Network6 is the IPv6 pod network (unset: none): VXLAN over IPv6 from it is dropped.
	Network6 netip.Prefix
	// Underlay6 says VXLAN runs over IPv6 here: peers send from their IPv6 addresses.
	Underlay6 bool
	Peers     map[string]Peer
}

// guards6 reports whether s needs the ip6 table: VXLAN may arrive over IPv6 (an IPv6
// underlay), or IPv6 pods could send VXLAN over IPv6 (to a node whose underlay is IPv6).
func (s Spec) guards6() bool { return s.Port != 0 && (s.Underlay6 || s.Network6.IsValid()) }

// sameShape reports whether a and b differ at most in their peers.
func sameShape(a, b Spec) bool {
	a.Peers, b.Peers = nil, nil
	return a.Port == b.Port && a.Network == b.Network && a.SubnetLen == b.SubnetLen && a.SubnetLen6 == b.SubnetLen6 &&
		a.Network6 == b.Network6 && a.Underlay6 == b.Underlay6
}

// Peer is what VXLAN from one peer may look like.
type Peer struct {
	IP      netip.Addr   // the outer source address; invalid: not a peer
	Subnet  netip.Prefix // inner sources allowed besides IP itself
	Subnet6 netip.Prefix // inner IPv6 sources allowed (unset: none)
	MAC     string       // the outer source MAC (a peer on the same L2); empty: not checked
}

// node is what the sets hold for one node: its Peer as plain values (60 bytes without
// pointers instead of 104 with four; the guard keeps one per peer). Peers that differ
// only in how their MAC is spelled are the same node.
type node struct {
	ip              netipx.AddrKey
	subnet, subnet6 netipx.PrefixKey
	mac             [6]byte
	hasMAC          bool // a valid 6-byte MAC: the node's elements go to the L2 sets
}

func nodeOf(p Peer) node {
	n := node{ip: netipx.AddrKeyOf(p.IP), subnet: netipx.PrefixKeyOf(p.Subnet), subnet6: netipx.PrefixKeyOf(p.Subnet6)}
	if m, err := net.ParseMAC(p.MAC); err == nil && len(m) == 6 {
		n.mac, n.hasMAC = [6]byte(m), true
	}
	return n
}

// elem is one set element in comparable form.
type elem struct {
	outer6   bool // in the ip6 table (the peer's outer address is IPv6)
	set, key string
}

// maxBlocks bounds the subnet-length blocks one peer's subnet is split into (a subnet
// shorter than the configured length is an anomaly the peer view already rejects when it
// overlaps anything).
const maxBlocks = 256

// elems are the set elements of a node: each configured-length block of its subnet, and
// its own address, as inner sources; in the table of its outer address's family (none for
// an IPv6 one when s has no ip6 table).
func (n node) elems(s Spec) []elem {
	subnetLen, subnetLen6 := s.SubnetLen, s.SubnetLen6
	ip := n.ip.Addr()
	outer6 := ip.Is6() && !ip.Is4In6() && !ip.IsUnspecified() && !ip.IsMulticast()
	if !ip.Is4() && !(outer6 && s.guards6()) {
		return nil
	}
	prefix := ip.AsSlice()
	set, set6 := SetName, SetName6
	if n.hasMAC {
		prefix = append(append(slices.Clip(prefix), n.mac[:]...), 0, 0) // concatenated fields are padded to 4 bytes
		set, set6 = SetL2, SetL26
	}
	key := func(a netip.Addr) string {
		b := a.AsSlice()
		return string(append(slices.Clip(prefix), b...))
	}
	out := []elem{{outer6, set + selfSuffix, key(ip)}}
	if s6 := n.subnet6.Prefix(); s6.IsValid() && s6.Addr().Is6() && !s6.Addr().Is4In6() && subnetLen6 > 0 && subnetLen6 <= 128 {
		s6 = s6.Masked()
		if s6.Bits() >= subnetLen6 { // inside one block
			out = append(out, elem{outer6, set6, key(netip.PrefixFrom(s6.Addr(), subnetLen6).Masked().Addr())})
		} else {
			a := s6.Addr()
			for range min(1<<min(subnetLen6-s6.Bits(), 16), maxBlocks) {
				out = append(out, elem{outer6, set6, key(a)})
				a = addBlock6(a, subnetLen6)
			}
		}
	}
	sub := n.subnet.Prefix()
	if !sub.IsValid() || !sub.Addr().Is4() || subnetLen <= 0 || subnetLen > 32 {
		return out
	}
	sub = sub.Masked()
	if sub.Bits() >= subnetLen { // inside one block: the block is allowed
		return append(out, elem{outer6, set, key(netip.PrefixFrom(sub.Addr(), subnetLen).Masked().Addr())})
	}
	a := sub.Addr()
	for range min(1<<(subnetLen-sub.Bits()), maxBlocks) {
		out = append(out, elem{outer6, set, key(a)})
		b := a.As4()
		binary.BigEndian.PutUint32(b[:], binary.BigEndian.Uint32(b[:])+1<<(32-subnetLen))
		a = netip.AddrFrom4(b)
	}
	return out
}

// addBlock6 is a plus one block of length bits (at most 128).
func addBlock6(a netip.Addr, n int) netip.Addr {
	b := a.As16()
	hi, lo := binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])
	var addHi, addLo uint64
	if n > 64 {
		addLo = 1 << (128 - n)
	} else {
		addHi = 1 << (64 - n)
	}
	lo, carry := bits.Add64(lo, addLo, 0)
	hi, _ = bits.Add64(hi, addHi, carry)
	binary.BigEndian.PutUint64(b[:8], hi)
	binary.BigEndian.PutUint64(b[8:], lo)
	return netip.AddrFrom16(b)
}

// Stats say what a pass changed.
type Stats struct {
	Rebuilt       bool // table, set, chains or rules were (re)created
	Added, Delete int  // set elements
}

// Changed reports whether anything was written.
func (s Stats) Changed() bool { return s.Rebuilt || s.Added+s.Delete > 0 }

// Guard reconciles the table in the network namespace it was created in.
type Guard struct {
	mu    sync.Mutex
	conn  *nftables.Conn
	spec  Spec
	nodes map[string]node // what the sets hold for each node (as spec shapes it)
	// byIP is the nodes by outer address (normally one each): every element starts with
	// its node's outer address, so only nodes of the same address can share one, and
	// whether an element is still used is asked of them (no map of every element: with
	// thousands of peers it was the guard's biggest structure).
	byIP  multimap.Map[netipx.AddrKey, string]
	valid bool   // nodes mirror the kernel's sets
	base  uint64 // drops counted by rules that were since rebuilt
}

// New opens a netlink connection in the current network namespace.
func New() (*Guard, error) {
	c, err := nftables.New(nftables.AsLasting(), nftables.WithSockOptions(bigSendBuffer))
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	return &Guard{conn: c}, nil
}

// sendBuffer bounds one transaction: nftables sends a whole batch in one sendmsg, which
// the kernel refuses (EMSGSIZE) beyond the socket's send buffer (wmem_default, ~208 KiB).
// A full sync of 5,000 dual-stack peers is larger than that, and must stay one
// transaction so the sets are never seen half-written.
const sendBuffer = 32 << 20

// bigSendBuffer raises the send buffer past net.core.wmem_max (SO_SNDBUFFORCE, which
// the agent's CAP_NET_ADMIN allows), else as far as wmem_max lets it.
func bigSendBuffer(c *netlink.Conn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, sendBuffer)
	}); err != nil {
		return err
	}
	if serr != nil {
		return c.SetWriteBuffer(sendBuffer)
	}
	return nil
}

// Close releases the connection.
func (g *Guard) Close() error { return g.conn.CloseLasting() }

// table is the guard's table for VXLAN over IPv4 (outer6: over IPv6).
func table(outer6 bool) *nftables.Table {
	if outer6 {
		return &nftables.Table{Name: Table, Family: nftables.TableFamilyIPv6}
	}
	return &nftables.Table{Name: Table, Family: nftables.TableFamilyIPv4}
}

// families are the outer families, ip then ip6.
var families = []bool{false, true}

func is6(t *nftables.Table) bool { return t.Family == nftables.TableFamilyIPv6 }

var setNames = []string{SetL2, SetL2 + selfSuffix, SetName, SetName + selfSuffix, SetL26, SetName6}

// inner6 reports whether set name of table t holds inner IPv6 sources: the IPv6 subnet
// sets, and in the ip6 table the -self sets (a peer's own address is of its outer family).
func inner6(t *nftables.Table, name string) bool {
	return name == SetL26 || name == SetName6 || is6(t) && strings.HasSuffix(name, selfSuffix)
}

func setOf(t *nftables.Table, name string) *nftables.Set {
	outer, inner := nftables.TypeIPAddr, nftables.TypeIPAddr
	if is6(t) {
		outer = nftables.TypeIP6Addr
	}
	if inner6(t, name) {
		inner = nftables.TypeIP6Addr
	}
	typ := nftables.MustConcatSetType(outer, inner)
	if strings.HasPrefix(name, SetL2) {
		typ = nftables.MustConcatSetType(outer, nftables.TypeEtherAddr, inner)
	}
	return &nftables.Set{Table: t, Name: name, KeyType: typ, Concatenation: true}
}

func chains(t *nftables.Table) (in, fwd *nftables.Chain) {
	p := nftables.ChainPriorityRef(priority)
	in = &nftables.Chain{Name: ChainIn, Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookInput, Priority: p}
	fwd = &nftables.Chain{Name: ChainFwd, Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookForward, Priority: p}
	return in, fwd
}

// tag identifies the rules of a spec, so a Sync can tell its own rules from changed ones
// (each table's tag names what its rules depend on).
func tag(t *nftables.Table, chain string, i int, s Spec) []byte {
	if is6(t) {
		return fmt.Appendf(nil, "%s%s/%d ip6 v1 port=%d network6=%s subnetLen=%d subnetLen6=%d", tagPrefix, chain, i, s.Port, s.Network6, s.SubnetLen, s.SubnetLen6)
	}
	return fmt.Appendf(nil, "%s%s/%d v3 port=%d network=%s subnetLen=%d subnetLen6=%d", tagPrefix, chain, i, s.Port, s.Network, s.SubnetLen, s.SubnetLen6)
}

func udpDport(port int) []expr.Any {
	p := make([]byte, 2)
	binary.BigEndian.PutUint16(p, uint16(port))
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_UDP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: p},
	}
}

// saddr loads the outer source address (of t's family) into reg.
func saddr(t *nftables.Table, reg uint32) *expr.Payload {
	if is6(t) {
		return &expr.Payload{DestRegister: reg, Base: expr.PayloadBaseNetworkHeader, Offset: 8, Len: 16}
	}
	return &expr.Payload{DestRegister: reg, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4}
}

// Inner headers, from the start of the outer UDP header: UDP (8) and VXLAN (8) headers,
// then the inner Ethernet header (its EtherType at 12) and IPv4 header (its source at 12)
// or IPv6 header (its source at 8).
const (
	innerEtherType = 8 + 8 + 12
	innerIPSrc     = 8 + 8 + 14 + 12
	innerIP6Src    = 8 + 8 + 14 + 8
)

func rules(t *nftables.Table, s Spec) []*nftables.Rule {
	in, fwd := chains(t)
	innerType := func(v6 bool) []expr.Any {
		et := []byte{0x08, 0x00}
		if v6 {
			et = []byte{0x86, 0xdd}
		}
		return []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: innerEtherType, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: et},
		}
	}
	// Concatenations load field after field into consecutive 32-bit registers (8 is the
	// first, which the 128-bit register 1 aliases); a 6-byte MAC takes two.
	inner := func(reg uint32, masked, v6 bool) []expr.Any {
		off, n, mask := uint32(innerIPSrc), uint32(4), netipMask(s.SubnetLen)
		if v6 {
			off, n, mask = innerIP6Src, 16, mask6(s.SubnetLen6)
		}
		e := []expr.Any{&expr.Payload{DestRegister: reg, Base: expr.PayloadBaseTransportHeader, Offset: off, Len: n}}
		if masked {
			e = append(e, &expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: n, Mask: mask, Xor: make([]byte, n)})
		}
		return e
	}
	accept := func(set string, l2, masked bool) []expr.Any {
		outer := saddr(t, 8)
		e := slices.Concat(udpDport(s.Port), innerType(inner6(t, set)), []expr.Any{outer})
		reg := 8 + outer.Len/4
		if l2 {
			e = append(e, &expr.Payload{DestRegister: reg, Base: expr.PayloadBaseLLHeader, Offset: 6, Len: 6})
			reg += 2
		}
		return slices.Concat(e, inner(reg, masked, inner6(t, set)), []expr.Any{
			&expr.Lookup{SourceRegister: 8, SetName: set},
			&expr.Verdict{Kind: expr.VerdictAccept},
		})
	}
	drop := append(udpDport(s.Port), &expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop})
	var out []*nftables.Rule
	for i, name := range setNames {
		if inner6(t, name) && s.SubnetLen6 == 0 {
			continue // no IPv6 in the cluster: its rules would match nothing
		}
		ex := accept(name, strings.HasPrefix(name, SetL2), !strings.HasSuffix(name, selfSuffix))
		out = append(out, &nftables.Rule{Table: t, Chain: in, Exprs: ex, UserData: tag(t, ChainIn, i, s)})
	}
	out = append(out, &nftables.Rule{Table: t, Chain: in, Exprs: drop, UserData: tag(t, ChainIn, len(setNames), s)})
	// VXLAN sent by pods of this table's family (it would leave masqueraded to this node's
	// address, a peer's for the others).
	pods, mask := s.Network, netipMask(s.Network.Bits())
	if is6(t) {
		pods, mask = s.Network6, mask6(s.Network6.Bits())
	}
	if !pods.IsValid() || pods.Addr().Is6() != is6(t) {
		return out // no pods of this family
	}
	src := saddr(t, 1)
	fwdExprs := append([]expr.Any{
		src,
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: src.Len, Mask: mask, Xor: make([]byte, src.Len)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: pods.Masked().Addr().AsSlice()},
	}, udpDport(s.Port)...)
	fwdExprs = append(fwdExprs, &expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop})
	return append(out, &nftables.Rule{Table: t, Chain: fwd, Exprs: fwdExprs, UserData: tag(t, ChainFwd, 0, s)})
}

// mask6 is the 16-byte mask of an IPv6 prefix length.
func mask6(bits int) []byte {
	return net.CIDRMask(bits, 128)
}

func netipMask(bits int) []byte {
	m := make([]byte, 4)
	binary.BigEndian.PutUint32(m, ^uint32(0)<<(32-bits))
	return m
}

func elements(es []elem) []nftables.SetElement {
	out := make([]nftables.SetElement, 0, len(es))
	for _, e := range es {
		out = append(out, nftables.SetElement{Key: []byte(e.key)})
	}
	return out
}

// Sync makes the kernel's tables equal to spec, reading what is there first. It rebuilds a
// table when its structure is not exactly ours, and otherwise only adds and removes set
// elements; all in one transaction.
func (g *Guard) Sync(spec Spec) (Stats, error) {
	nodes := make(map[string]node, len(spec.Peers))
	for n, p := range spec.Peers {
		nodes[n] = nodeOf(p)
	}
	spec.Peers = nil
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.sync(spec, nodes)
}

// sync is Sync of spec with nodes, which becomes the mirror (caller holds mu).
func (g *Guard) sync(spec Spec, nodes map[string]node) (Stats, error) {
	g.valid = false
	if spec.Port == 0 {
		var st Stats
		for _, v6 := range families {
			if g.dropTable(table(v6)) {
				st.Rebuilt = true
			}
		}
		if st.Rebuilt {
			if err := g.conn.Flush(); err != nil {
				return Stats{}, fmt.Errorf("vxguard: remove table: %w", err)
			}
		}
		g.spec, g.nodes, g.byIP, g.valid = spec, map[string]node{}, multimap.Map[netipx.AddrKey, string]{}, true
		return st, nil
	}
	byIP := multimap.New[netipx.AddrKey, string](len(nodes))
	wanted := make(map[elem]bool, 3*len(nodes)) // for this pass only
	for n, p := range nodes {
		es := p.elems(spec)
		if len(es) == 0 {
			delete(nodes, n)
			continue
		}
		byIP.Add(p.ip, n)
		for _, e := range es {
			wanted[e] = true
		}
	}
	want := make([]elem, 0, len(wanted))
	for e := range wanted {
		want = append(want, e)
	}
	// In a stable order: the kernel lists interval sets in insertion order, and a rebuilt
	// table should read the same as before (drift checks compare listings).
	slices.SortFunc(want, func(a, b elem) int {
		return cmp.Or(cmp.Compare(a.set, b.set), cmp.Compare(a.key, b.key))
	})
	var st Stats
	for _, v6 := range families {
		t := table(v6)
		if v6 && !spec.guards6() {
			if g.dropTable(t) {
				st.Rebuilt = true
			}
			continue
		}
		mine := slices.DeleteFunc(slices.Clone(want), func(e elem) bool { return e.outer6 != v6 })
		if err := g.syncTable(t, spec, mine, wanted, &st); err != nil {
			return Stats{}, err
		}
	}
	if st.Changed() {
		if err := g.conn.Flush(); err != nil {
			return Stats{}, fmt.Errorf("vxguard: sync tables: %w", err)
		}
	}
	g.spec, g.nodes, g.byIP, g.valid = spec, nodes, byIP, true
	return st, nil
}

// dropTable queues the removal of t if it exists (its drops are kept in base).
func (g *Guard) dropTable(t *nftables.Table) bool {
	if cur, err := g.conn.ListTableOfFamily(t.Name, t.Family); err != nil || cur == nil {
		return false
	}
	g.base += g.counters(t)
	g.conn.DelTable(t)
	return true
}

// syncTable queues what makes table t hold spec's structure and the elements want (of
// its family; wanted holds every wanted element), adding to st.
func (g *Guard) syncTable(t *nftables.Table, spec Spec, want []elem, wanted map[elem]bool, st *Stats) error {
	cur, err := g.conn.ListTableOfFamily(t.Name, t.Family)
	exists := err == nil && cur != nil
	have, ok := g.structureOK(t, spec)
	if exists && cur.Flags != 0 {
		ok = false // e.g. "dormant": a table that is there but switched off
	}
	if ok {
		var add, del []elem
		for _, e := range want {
			if !have[e] {
				add = append(add, e)
			}
		}
		for e := range have {
			if !wanted[e] {
				del = append(del, e)
			}
		}
		st.Added, st.Delete = st.Added+len(add), st.Delete+len(del)
		if err := g.addElements(add); err != nil {
			return err
		}
		return g.eachSet(del, g.conn.SetDeleteElements, "delete")
	}
	// Rebuilt within the one transaction: nothing of a half-changed table is ever in force.
	if exists {
		g.base += g.counters(t)
		g.conn.DelTable(t)
	}
	g.conn.AddTable(t)
	for _, name := range setNames {
		if err := g.conn.AddSet(setOf(t, name), nil); err != nil {
			return fmt.Errorf("vxguard: set: %w", err)
		}
	}
	in, fwd := chains(t)
	g.conn.AddChain(in)
	g.conn.AddChain(fwd)
	for _, r := range rules(t, spec) {
		g.conn.AddRule(r)
	}
	st.Rebuilt, st.Added = true, st.Added+len(want)
	return g.addElements(want)
}

// Invalidate makes the next Set read the kernel (someone else changed the table).
func (g *Guard) Invalidate() {
	g.mu.Lock()
	g.valid = false
	g.mu.Unlock()
}

// Set makes the kernel's table equal to spec like Sync, but against the mirror when it is
// valid and spec keeps the port, network and subnet length: only peers that differ are
// written, and the kernel is not read.
func (g *Guard) Set(spec Spec) (Stats, error) {
	g.mu.Lock()
	if !g.valid || !sameShape(g.spec, spec) {
		g.mu.Unlock()
		return g.Sync(spec)
	}
	changes := map[string]Peer{}
	for n, p := range spec.Peers {
		if cur, ok := g.nodes[n]; !ok || cur != nodeOf(p) {
			changes[n] = p
		}
	}
	for n := range g.nodes {
		if _, ok := spec.Peers[n]; !ok {
			changes[n] = Peer{}
		}
	}
	g.mu.Unlock()
	return g.Update(changes)
}

// Resync is Sync with the last spec and the peers as updated since (after someone else
// changed the table).
func (g *Guard) Resync() (Stats, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.valid {
		return Stats{}, ErrNoMirror
	}
	return g.sync(g.spec, g.nodes)
}

// structureOK reads table t and reports its sets' elements and whether the sets, the two
// chains and their rules are exactly ours for spec.
func (g *Guard) structureOK(t *nftables.Table, spec Spec) (map[elem]bool, bool) {
	have := map[elem]bool{}
	for _, name := range setNames {
		want := setOf(t, name)
		set, err := g.conn.GetSetByName(t, name)
		if err != nil || set == nil || set.KeyType.Name != want.KeyType.Name || set.Interval || !set.Concatenation {
			return nil, false
		}
		els, err := g.conn.GetSetElements(set)
		if err != nil {
			return nil, false
		}
		for _, e := range els {
			have[elem{is6(t), name, string(e.Key)}] = true
		}
	}
	in, fwd := chains(t)
	byChain := map[string][][]byte{}
	for _, r := range rules(t, spec) {
		byChain[r.Chain.Name] = append(byChain[r.Chain.Name], r.UserData)
	}
	for _, c := range []*nftables.Chain{in, fwd} {
		kc, err := g.conn.ListChain(t, c.Name)
		if err != nil || kc.Type != c.Type || kc.Hooknum == nil || *kc.Hooknum != *c.Hooknum || kc.Priority == nil || *kc.Priority != *c.Priority ||
			kc.Policy != nil && *kc.Policy != nftables.ChainPolicyAccept {
			return nil, false
		}
		rs, err := g.conn.GetRules(t, c)
		if err != nil || len(rs) != len(byChain[c.Name]) {
			return nil, false
		}
		for i, r := range rs {
			if string(r.UserData) != string(byChain[c.Name][i]) {
				return nil, false
			}
		}
	}
	return have, true
}

// addElements queues es (in their tables' sets) for the next Flush.
func (g *Guard) addElements(es []elem) error {
	return g.eachSet(es, g.conn.SetAddElements, "add")
}

func (g *Guard) eachSet(es []elem, op func(*nftables.Set, []nftables.SetElement) error, what string) error {
	for _, v6 := range families {
		t := table(v6)
		for _, name := range setNames {
			var part []elem
			for _, e := range es {
				if e.set == name && e.outer6 == v6 {
					part = append(part, e)
				}
			}
			for c := range slices.Chunk(part, maxBatched) {
				if err := op(setOf(t, name), elements(c)); err != nil {
					return fmt.Errorf("vxguard: %s elements: %w", what, err)
				}
			}
		}
	}
	return nil
}

// changeElements adds and removes elements in one transaction.
func (g *Guard) changeElements(add, del []elem) error {
	if err := g.addElements(add); err != nil {
		return err
	}
	if err := g.eachSet(del, g.conn.SetDeleteElements, "delete"); err != nil {
		return err
	}
	if err := g.conn.Flush(); err != nil {
		return fmt.Errorf("vxguard: update peers: %w", err)
	}
	return nil
}

// Update applies peer changes (node -> what it may send now; the zero Peer: gone or not
// a peer any more) without reading the kernel: only elements whose last user left or
// whose first user arrived are written. It needs a Sync first (ErrNoMirror).
func (g *Guard) Update(changes map[string]Peer) (Stats, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.valid {
		return Stats{}, ErrNoMirror
	}
	if g.spec.Port == 0 {
		return Stats{}, nil
	}
	// Whether each touched element is in a set before and after this batch: a batch can
	// move an element from one node to another, which must not write anything.
	type touched struct {
		ip  netipx.AddrKey
		was bool
	}
	touch := map[elem]*touched{}
	moved := map[string]node{}
	for n, p := range changes {
		c := nodeOf(p)
		old, had := g.nodes[n]
		if had && old == c {
			continue
		}
		moved[n] = c
		for _, q := range []node{old, c} {
			for _, e := range q.elems(g.spec) {
				if _, ok := touch[e]; !ok {
					touch[e] = &touched{ip: q.ip, was: g.uses(q.ip, e)}
				}
			}
		}
	}
	for n, c := range moved {
		if old, had := g.nodes[n]; had {
			g.byIP.Remove(old.ip, n)
			delete(g.nodes, n)
		}
		if len(c.elems(g.spec)) > 0 {
			g.nodes[n] = c
			g.byIP.Add(c.ip, n)
		}
	}
	var add, del []elem
	for e, t := range touch {
		switch now := g.uses(t.ip, e); {
		case now && !t.was:
			add = append(add, e)
		case t.was && !now:
			del = append(del, e)
		}
	}
	if len(add)+len(del) == 0 {
		return Stats{}, nil
	}
	if err := g.changeElements(add, del); err != nil {
		g.valid = false
		return Stats{}, err
	}
	return Stats{Added: len(add), Delete: len(del)}, nil
}

// uses reports whether a node of outer address ip has element e (caller holds mu).
func (g *Guard) uses(ip netipx.AddrKey, e elem) bool {
	found := false
	g.byIP.Each(ip, func(n string) bool {
		found = slices.Contains(g.nodes[n].elems(g.spec), e)
		return !found
	})
	return found
}

// Dropped is how many packets the guard has dropped since it was created (rules rebuilt
// in between included).
func (g *Guard) Dropped() uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.base + g.countersLocked()
}

func (g *Guard) countersLocked() uint64 {
	var n uint64
	for _, v6 := range families {
		n += g.counters(table(v6))
	}
	return n
}

// counters sums the drop counters of table t (0 if it is not there).
func (g *Guard) counters(t *nftables.Table) uint64 {
	in, fwd := chains(t)
	var n uint64
	for _, c := range []*nftables.Chain{in, fwd} {
		rs, err := g.conn.GetRules(t, c)
		if err != nil {
			continue
		}
		n += Packets(rs)
	}
	return n
}

// Packets sums the packet counters of rules.
func Packets(rs []*nftables.Rule) uint64 {
	var n uint64
	for _, r := range rs {
		for _, e := range r.Exprs {
			if c, ok := e.(*expr.Counter); ok {
				n += c.Packets
			}
		}
	}
	return n
}

// Remove deletes the tables if they exist (netagent cleanup).
func Remove() error {
	return errors.Join(RemoveTable(Table), removeTable(table(true)))
}

// RemoveTable deletes the ip-family table name if it exists.
func RemoveTable(name string) error {
	return removeTable(&nftables.Table{Name: name, Family: nftables.TableFamilyIPv4})
}

// RemoveTable6 deletes the ip6-family table name if it exists.
func RemoveTable6(name string) error {
	return removeTable(&nftables.Table{Name: name, Family: nftables.TableFamilyIPv6})
}

func removeTable(t *nftables.Table) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	if cur, err := c.ListTableOfFamily(t.Name, t.Family); err != nil || cur == nil {
		return nil
	}
	c.DelTable(t)
	return c.Flush()
}

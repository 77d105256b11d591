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
// It is one nftables table (family ip, "netagent") written over netlink with
// github.com/google/nftables, so every change is one atomic transaction and costs no
// process: four concatenated hash sets that lease changes update element by element, and
// two base chains (S: the inner IPv4 source @th,336,32 behind the UDP and VXLAN headers;
// S/len: S masked to the configured subnet length; every accept also needs the inner
// EtherType @th,224,16 to be IPv4):
//
//	input:   udp dport <port> ip saddr . ether saddr . S/len @vxlan-l2 accept
//	         udp dport <port> ip saddr . ether saddr . S     @vxlan-l2-self accept
//	         udp dport <port> ip saddr . S/len @vxlan-peers accept
//	         udp dport <port> ip saddr . S     @vxlan-peers-self accept
//	         udp dport <port> counter drop
//	forward: ip saddr <cluster network> udp dport <port> counter drop
//
// Inner IPv6 (dual-stack and IPv6-only clusters over an IPv4 underlay) is matched the same
// way by two more sets, vxlan-l2-6 and vxlan-peers6 (S6: the inner IPv6 source
// @th,304,128 behind an inner EtherType 0x86dd, masked to ipv6SubnetLen). Nothing here
// sees VXLAN over an IPv6 underlay (this is an ip-family table): an IPv6 underlay is not
// guarded yet.
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
	Peers      map[string]Peer
}

// Peer is what VXLAN from one peer may look like.
type Peer struct {
	IP      netip.Addr   // the outer source address; invalid: not a peer
	Subnet  netip.Prefix // inner sources allowed besides IP itself
	Subnet6 netip.Prefix // inner IPv6 sources allowed (unset: none)
	MAC     string       // the outer source MAC (a peer on the same L2); empty: not checked
}

// elem is one set element in comparable form.
type elem struct {
	set, key string
}

// maxBlocks bounds the subnet-length blocks one peer's subnet is split into (a subnet
// shorter than the configured length is an anomaly the peer view already rejects when it
// overlaps anything).
const maxBlocks = 256

// elems are the set elements of a peer: each configured-length block of its subnet, and
// its own address, as inner sources.
func (p Peer) elems(subnetLen, subnetLen6 int) []elem {
	if !p.IP.Is4() {
		return nil
	}
	ip := p.IP.As4()
	prefix := ip[:]
	set, set6 := SetName, SetName6
	if m, err := net.ParseMAC(p.MAC); err == nil && len(m) == 6 {
		prefix = append(append(slices.Clip(prefix), m...), 0, 0) // concatenated fields are padded to 4 bytes
		set, set6 = SetL2, SetL26
	}
	key := func(a netip.Addr) string {
		b := a.AsSlice()
		return string(append(slices.Clip(prefix), b...))
	}
	out := []elem{{set + selfSuffix, key(p.IP)}}
	if s6 := p.Subnet6; s6.IsValid() && s6.Addr().Is6() && !s6.Addr().Is4In6() && subnetLen6 > 0 && subnetLen6 <= 128 {
		s6 = s6.Masked()
		if s6.Bits() >= subnetLen6 { // inside one block
			out = append(out, elem{set6, key(netip.PrefixFrom(s6.Addr(), subnetLen6).Masked().Addr())})
		} else {
			a := s6.Addr()
			for range min(1<<min(subnetLen6-s6.Bits(), 16), maxBlocks) {
				out = append(out, elem{set6, key(a)})
				a = addBlock6(a, subnetLen6)
			}
		}
	}
	if !p.Subnet.IsValid() || !p.Subnet.Addr().Is4() || subnetLen <= 0 || subnetLen > 32 {
		return out
	}
	s := p.Subnet.Masked()
	if s.Bits() >= subnetLen { // inside one block: the block is allowed
		return append(out, elem{set, key(netip.PrefixFrom(s.Addr(), subnetLen).Masked().Addr())})
	}
	a := s.Addr()
	for range min(1<<(subnetLen-s.Bits()), maxBlocks) {
		out = append(out, elem{set, key(a)})
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
	nodes map[string]Peer // node -> what the sets hold for it (at spec.SubnetLen)
	refs  map[elem]int    // element -> how many nodes use it
	valid bool            // nodes/refs mirror the kernel's set
	base  uint64          // drops counted by rules that were since rebuilt
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

func table() *nftables.Table { return &nftables.Table{Name: Table, Family: nftables.TableFamilyIPv4} }

var (
	routedType  = nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeIPAddr)
	l2Type      = nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeEtherAddr, nftables.TypeIPAddr)
	routedType6 = nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeIP6Addr)
	l2Type6     = nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeEtherAddr, nftables.TypeIP6Addr)
	setNames    = []string{SetL2, SetL2 + selfSuffix, SetName, SetName + selfSuffix, SetL26, SetName6}
)

// inner6 reports whether set name holds inner IPv6 sources.
func inner6(name string) bool { return name == SetL26 || name == SetName6 }

func setOf(t *nftables.Table, name string) *nftables.Set {
	typ := routedType
	switch {
	case name == SetL26:
		typ = l2Type6
	case name == SetName6:
		typ = routedType6
	case strings.HasPrefix(name, SetL2):
		typ = l2Type
	}
	return &nftables.Set{Table: t, Name: name, KeyType: typ, Concatenation: true}
}

func chains(t *nftables.Table) (in, fwd *nftables.Chain) {
	p := nftables.ChainPriorityRef(priority)
	in = &nftables.Chain{Name: ChainIn, Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookInput, Priority: p}
	fwd = &nftables.Chain{Name: ChainFwd, Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookForward, Priority: p}
	return in, fwd
}

// tag identifies the rules of a spec, so a Sync can tell its own rules from changed ones.
func tag(chain string, i int, s Spec) []byte {
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

func ipSaddr() *expr.Payload {
	return &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4}
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
		e := slices.Concat(udpDport(s.Port), innerType(inner6(set)),
			[]expr.Any{&expr.Payload{DestRegister: 8, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4}})
		reg := uint32(9)
		if l2 {
			e = append(e, &expr.Payload{DestRegister: 9, Base: expr.PayloadBaseLLHeader, Offset: 6, Len: 6})
			reg = 11
		}
		return slices.Concat(e, inner(reg, masked, inner6(set)), []expr.Any{
			&expr.Lookup{SourceRegister: 8, SetName: set},
			&expr.Verdict{Kind: expr.VerdictAccept},
		})
	}
	drop := append(udpDport(s.Port), &expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop})
	var out []*nftables.Rule
	for i, name := range setNames {
		if inner6(name) && s.SubnetLen6 == 0 {
			continue // no IPv6 in the cluster: its rules would match nothing
		}
		ex := accept(name, strings.HasPrefix(name, SetL2), !strings.HasSuffix(name, selfSuffix))
		out = append(out, &nftables.Rule{Table: t, Chain: in, Exprs: ex, UserData: tag(ChainIn, i, s)})
	}
	out = append(out, &nftables.Rule{Table: t, Chain: in, Exprs: drop, UserData: tag(ChainIn, len(setNames), s)})
	if !s.Network.Addr().Is4() {
		// IPv6-only: no IPv4 pods to send VXLAN over this (IPv4) table's underlay.
		return out
	}
	net4 := s.Network.Masked().Addr().As4()
	mask := netipMask(s.Network.Bits())
	fwdExprs := append([]expr.Any{
		ipSaddr(),
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: []byte{0, 0, 0, 0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: net4[:]},
	}, udpDport(s.Port)...)
	fwdExprs = append(fwdExprs, &expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop})
	return append(out, &nftables.Rule{Table: t, Chain: fwd, Exprs: fwdExprs, UserData: tag(ChainFwd, 0, s)})
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

// Sync makes the kernel's table equal to spec, reading what is there first; it keeps
// spec.Peers (the caller must not use it afterwards). It rebuilds
// the table when its structure is not exactly ours, and otherwise only adds and removes
// set elements.
func (g *Guard) Sync(spec Spec) (Stats, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.valid = false
	t := table()
	cur, err := g.conn.ListTableOfFamily(Table, nftables.TableFamilyIPv4)
	exists := err == nil && cur != nil
	if spec.Port == 0 {
		if !exists {
			g.spec, g.nodes, g.refs, g.valid = spec, map[string]Peer{}, map[elem]int{}, true
			return Stats{}, nil
		}
		g.base += g.countersLocked()
		g.conn.DelTable(t)
		if err := g.conn.Flush(); err != nil {
			return Stats{}, fmt.Errorf("vxguard: remove table: %w", err)
		}
		g.spec, g.nodes, g.refs, g.valid = spec, map[string]Peer{}, map[elem]int{}, true
		return Stats{Rebuilt: true}, nil
	}
	// spec.Peers becomes the mirror of what each node put in the sets (no copy: with
	// thousands of peers the maps are most of the guard's memory).
	nodes, refs := spec.Peers, make(map[elem]int, 2*len(spec.Peers))
	if nodes == nil {
		nodes = map[string]Peer{}
	}
	for n, p := range nodes {
		es := p.elems(spec.SubnetLen, spec.SubnetLen6)
		if len(es) == 0 {
			delete(nodes, n)
			continue
		}
		for _, e := range es {
			refs[e]++
		}
	}
	want := make([]elem, 0, len(refs))
	for e := range refs {
		want = append(want, e)
	}
	// In a stable order: the kernel lists interval sets in insertion order, and a rebuilt
	// table should read the same as before (drift checks compare listings).
	slices.SortFunc(want, func(a, b elem) int {
		return cmp.Or(cmp.Compare(a.set, b.set), cmp.Compare(a.key, b.key))
	})
	var st Stats
	have, ok := g.structureOK(spec)
	if exists && cur.Flags != 0 {
		ok = false // e.g. "dormant": a table that is there but switched off
	}
	if !ok {
		// Rebuild in one transaction: nothing of a half-changed table is ever in force.
		if exists {
			g.base += g.countersLocked()
			g.conn.DelTable(t)
		}
		g.conn.AddTable(t)
		for _, name := range setNames {
			if err := g.conn.AddSet(setOf(t, name), nil); err != nil {
				return Stats{}, fmt.Errorf("vxguard: set: %w", err)
			}
		}
		in, fwd := chains(t)
		g.conn.AddChain(in)
		g.conn.AddChain(fwd)
		for _, r := range rules(t, spec) {
			g.conn.AddRule(r)
		}
		if err := g.addElements(want); err != nil {
			return Stats{}, err
		}
		if err := g.conn.Flush(); err != nil {
			return Stats{}, fmt.Errorf("vxguard: create table: %w", err)
		}
		st = Stats{Rebuilt: true, Added: len(want)}
	} else {
		var add, del []elem
		for _, e := range want {
			if !have[e] {
				add = append(add, e)
			}
		}
		for e := range have {
			if refs[e] == 0 {
				del = append(del, e)
			}
		}
		if len(add)+len(del) > 0 {
			if err := g.changeElements(add, del); err != nil {
				return Stats{}, err
			}
		}
		st = Stats{Added: len(add), Delete: len(del)}
	}
	spec.Peers = nil
	g.spec, g.nodes, g.refs, g.valid = spec, nodes, refs, true
	return st, nil
}

// Invalidate makes the next Set read the kernel (someone else changed the table).
func (g *Guard) Invalidate() {
	g.mu.Lock()
	g.valid = false
	g.mu.Unlock()
}

// Set makes the kernel's table equal to spec like Sync, but against the mirror when it is
// valid and spec keeps the port, network and subnet length: only peers that differ are
// written, and the kernel is not read. Like Sync it keeps spec.Peers.
func (g *Guard) Set(spec Spec) (Stats, error) {
	g.mu.Lock()
	if !g.valid || g.spec.Port != spec.Port || g.spec.Network != spec.Network || g.spec.SubnetLen != spec.SubnetLen || g.spec.SubnetLen6 != spec.SubnetLen6 {
		g.mu.Unlock()
		return g.Sync(spec)
	}
	changes := map[string]Peer{}
	for n, p := range spec.Peers {
		if cur, ok := g.nodes[n]; !ok || cur != p {
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
	if !g.valid {
		g.mu.Unlock()
		return Stats{}, ErrNoMirror
	}
	spec := g.spec
	spec.Peers = g.nodes
	g.mu.Unlock()
	return g.Sync(spec)
}

// structureOK reads the table and reports its sets' elements and whether the sets, the two
// chains and their rules are exactly ours for spec.
func (g *Guard) structureOK(spec Spec) (map[elem]bool, bool) {
	t := table()
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
			have[elem{name, string(e.Key)}] = true
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

// addElements queues es (in both sets) for the next Flush.
func (g *Guard) addElements(es []elem) error {
	return g.eachSet(es, g.conn.SetAddElements, "add")
}

func (g *Guard) eachSet(es []elem, op func(*nftables.Set, []nftables.SetElement) error, what string) error {
	t := table()
	for _, name := range setNames {
		var part []elem
		for _, e := range es {
			if e.set == name {
				part = append(part, e)
			}
		}
		for c := range slices.Chunk(part, maxBatched) {
			if err := op(setOf(t, name), elements(c)); err != nil {
				return fmt.Errorf("vxguard: %s elements: %w", what, err)
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
	// Whether each touched element was in a set before this batch: a batch can move an
	// element from one node to another, which must not write anything.
	before := map[elem]bool{}
	touch := func(e elem) {
		if _, ok := before[e]; !ok {
			before[e] = g.refs[e] > 0
		}
	}
	for n, p := range changes {
		old, had := g.nodes[n]
		if had && old == p {
			continue
		}
		if had {
			for _, e := range old.elems(g.spec.SubnetLen, g.spec.SubnetLen6) {
				touch(e)
				if g.refs[e]--; g.refs[e] <= 0 {
					delete(g.refs, e)
				}
			}
			delete(g.nodes, n)
		}
		if es := p.elems(g.spec.SubnetLen, g.spec.SubnetLen6); len(es) > 0 {
			for _, e := range es {
				touch(e)
				g.refs[e]++
			}
			g.nodes[n] = p
		}
	}
	var add, del []elem
	for e, was := range before {
		switch now := g.refs[e] > 0; {
		case now && !was:
			add = append(add, e)
		case was && !now:
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

// Dropped is how many packets the guard has dropped since it was created (rules rebuilt
// in between included).
func (g *Guard) Dropped() uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.base + g.countersLocked()
}

func (g *Guard) countersLocked() uint64 {
	t := table()
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

// Remove deletes the table if it exists (netagent cleanup).
func Remove() error { return RemoveTable(Table) }

// RemoveTable deletes the ip-family table name if it exists.
func RemoveTable(name string) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	if t, err := c.ListTableOfFamily(name, nftables.TableFamilyIPv4); err != nil || t == nil {
		return nil
	}
	c.DelTable(&nftables.Table{Name: name, Family: nftables.TableFamilyIPv4})
	return c.Flush()
}

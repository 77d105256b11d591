// Package wgguard is the WireGuard backend's underlay guard: with WireGuard, pod traffic
// between nodes arrives on the WireGuard device only, so a packet addressed to the pod
// network that arrives on the underlay unencrypted is someone injecting it (a host on the
// underlay routing to a pod subnet, or a spoofed peer) and is dropped.
//
// It is one nftables table per pod network family, both named "netagent-wg" (family ip for
// the IPv4 pod network, ip6 for the IPv6 one), written over netlink with
// github.com/google/nftables, replaced whole in one transaction when they differ:
//
//	prerouting (priority raw, -300): iifname <underlay> ip daddr <pod network> counter drop
//	                                 iifname <underlay> ip6 daddr <IPv6 pod network> counter drop
//
// Where IPv6 pods are not masqueraded (a routable prefix: outside hosts reach them with
// their own addresses, in clear, by design), the IPv6 rule drops only what claims to come
// from the pod network (`ip6 saddr <IPv6 pod network>` too): pods' traffic between nodes
// still arrives through WireGuard only, and no host on the underlay can pose as a pod.
//
// At raw priority the destination is still the one on the wire, before any DNAT: replies
// to masqueraded pod egress and hostPort traffic are addressed to the node, not the pod
// network, and pass; decrypted pod traffic arrives on the WireGuard device and passes. The
// family of the underlay does not matter: the rules look at the inner (pod) packets.
//
// With the device's listen port in the Spec, each table also records where WireGuard
// handshake messages come from, whether the device accepts them or not:
//
//	udp dport <port> udp length 156 @th,64,32 0x1000000 update @initiations { ip saddr }
//	udp dport <port> udp length 100 @th,64,32 0x2000000 update @responses { ip saddr }
//
// (an initiation is a 148-byte message of type 1, a response a 92-byte one of type 2, the
// type's byte followed by three zero bytes). A device drops an initiation from a peer it
// does not know yet, and a response to a handshake it no longer waits for, without a
// trace; the records are how pkg/wireguard learns that a peer it leaves the first
// handshake to has already tried, or that two handshakes crossed (see Handshakes). Both
// family tables exist then, whatever the pod networks, as the underlay may be either.
//
// Scale: three rules per family whatever the number of peers, and two sets of at most
// recordMax addresses; a check is one dump of a chain per family.
package wgguard

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/vxguard"
)

// Names in the kernel.
const (
	Table    = "netagent-wg"
	Chain    = "underlay-guard"
	priority = -300
	tagText  = "netagent-wgguard v1 "

	// recordFor is how long an address stays in a record after its last message: longer
	// than pkg/wireguard looks for a first handshake.
	recordFor = 10 * time.Second
	// recordMax bounds a record (anyone on the underlay can send these messages); a full
	// one records no new address, and a peer's first handshake then waits for WireGuard's
	// or pkg/wireguard's own timers.
	recordMax = 4096
)

// message is a handshake message the guard records, in the set of its name.
type message struct {
	set    string
	typ    byte
	length uint16 // UDP length: the header and the message
}

var messages = [2]message{{"initiations", 1, 8 + 148}, {"responses", 2, 8 + 92}}

// Spec is what the guard protects; the zero Spec removes the tables.
type Spec struct {
	Underlay string       // the underlay device
	Network  netip.Prefix // the IPv4 pod network (unset: no IPv4 table)
	Network6 netip.Prefix // the IPv6 pod network (unset: no IPv6 table)
	// Routable6 says IPv6 pods are not masqueraded, so replies from the outside reach them
	// from the underlay: only packets from the IPv6 pod network are dropped.
	Routable6 bool
	// Port is the WireGuard device's listen port: handshake messages to it are recorded
	// (0: none are).
	Port uint16
}

// Guard owns the tables in the network namespace it was created in.
type Guard struct {
	mu   sync.Mutex
	conn *nftables.Conn
	spec Spec
	set  bool // spec was written (and not found changed since)
}

// New opens a netlink connection in the current network namespace.
func New() (*Guard, error) {
	c, err := nftables.New(nftables.AsLasting())
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	return &Guard{conn: c}, nil
}

// family is one table of the guard: the pod network of its family, and the handshake
// messages that come over an underlay of its family.
type family struct {
	table    *nftables.Table
	network  netip.Prefix // unset: no drop rule
	src, dst uint32       // offsets of the addresses in the network header
	routable bool         // match the source too (see Spec.Routable6)
	port     uint16       // 0: no handshake messages recorded
}

func (s Spec) families() [2]family {
	return [2]family{
		{table: &nftables.Table{Name: Table, Family: nftables.TableFamilyIPv4}, network: s.Network, src: 12, dst: 16, port: s.Port},
		{table: &nftables.Table{Name: Table, Family: nftables.TableFamilyIPv6}, network: s.Network6, src: 8, dst: 24, routable: s.Routable6, port: s.Port},
	}
}

// wanted says whether the family's table exists.
func (f family) wanted() bool { return f.network.IsValid() || f.port != 0 }

// tags are the user data of the rules the family's chain holds, in order.
func (f family) tags(underlay string) [][]byte {
	var ts [][]byte
	if f.network.IsValid() {
		ts = append(ts, tag(underlay, f))
	}
	if f.port != 0 {
		for _, m := range messages {
			ts = append(ts, recordTag(f, m))
		}
	}
	return ts
}

// addrLen is the length of the family's addresses.
func (f family) addrLen() uint32 {
	if f.table.Family == nftables.TableFamilyIPv6 {
		return 16
	}
	return 4
}

func recordSet(f family, m message) *nftables.Set {
	kt := nftables.TypeIPAddr
	if f.table.Family == nftables.TableFamilyIPv6 {
		kt = nftables.TypeIP6Addr
	}
	return &nftables.Set{Table: f.table, Name: m.set, KeyType: kt, Dynamic: true, HasTimeout: true, Timeout: recordFor, Size: recordMax}
}

func recordTag(f family, m message) []byte {
	return fmt.Appendf(nil, "%s%s port=%d", tagText, m.set, f.port)
}

// recordRule puts the source of every message m to the port in set.
func recordRule(f family, m message, set *nftables.Set) *nftables.Rule {
	port, length := binary.BigEndian.AppendUint16(nil, f.port), binary.BigEndian.AppendUint16(nil, m.length)
	exprs := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_UDP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2}, // udp dport
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: port},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 4, Len: 2}, // udp length
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: length},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 8, Len: 4}, // message type
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{m.typ, 0, 0, 0}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: f.src, Len: f.addrLen()},
		&expr.Dynset{SrcRegKey: 1, SetName: set.Name, SetID: set.ID, Operation: unix.NFT_DYNSET_OP_UPDATE},
	}
	return &nftables.Rule{Table: f.table, Chain: chain(f.table), UserData: recordTag(f, m), Exprs: exprs}
}

// recordLen is how many expressions recordRule makes.
const recordLen = 10

func chain(t *nftables.Table) *nftables.Chain {
	return &nftables.Chain{Name: Chain, Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRef(priority)}
}

func tag(underlay string, f family) []byte {
	b := fmt.Appendf(nil, "%sdev=%s network=%s", tagText, underlay, f.network.Masked())
	if f.routable {
		b = append(b, " routable"...)
	}
	return b
}

func rule(f family, underlay string) *nftables.Rule {
	name := make([]byte, unix.IFNAMSIZ)
	copy(name, underlay)
	exprs := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: name},
	}
	if f.routable {
		exprs = append(exprs, inNetwork(f.network, f.src)...) // ip6 saddr
	}
	exprs = append(append(exprs, inNetwork(f.network, f.dst)...), // ip(6) daddr
		&expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop})
	return &nftables.Rule{Table: f.table, Chain: chain(f.table), UserData: tag(underlay, f), Exprs: exprs}
}

// ruleLen is how many expressions rule makes for f.
func ruleLen(f family) int {
	if f.routable {
		return 10
	}
	return 7
}

// inNetwork matches the address at offset in the network header against network.
func inNetwork(network netip.Prefix, offset uint32) []expr.Any {
	n := network.Masked()
	mask := net.CIDRMask(n.Bits(), n.Addr().BitLen())
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: uint32(len(mask))},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: uint32(len(mask)), Mask: mask, Xor: make([]byte, len(mask))},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: n.Addr().AsSlice()},
	}
}

// Set makes the tables hold spec's rules (the zero Spec: no tables). It reads the kernel
// only when the spec changed or a check found it changed.
func (g *Guard) Set(s Spec) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.set && g.spec == s && g.checkLocked() == "" {
		return nil
	}
	if s != (Spec{}) {
		switch {
		case s.Underlay == "" || (!s.Network.IsValid() && !s.Network6.IsValid() && s.Port == 0):
			return fmt.Errorf("wireguard underlay guard: want an underlay device and a pod network or a port, have %q, %s, %s and %d", s.Underlay, s.Network, s.Network6, s.Port)
		case s.Network.IsValid() && !s.Network.Addr().Is4():
			return fmt.Errorf("wireguard underlay guard: IPv4 pod network %s is not IPv4", s.Network)
		case s.Network6.IsValid() && (!s.Network6.Addr().Is6() || s.Network6.Addr().Is4In6()):
			return fmt.Errorf("wireguard underlay guard: IPv6 pod network %s is not IPv6", s.Network6)
		case s.Routable6 && !s.Network6.IsValid():
			return errors.New("wireguard underlay guard: routable IPv6 pods without an IPv6 pod network")
		}
	}
	for _, f := range s.families() {
		// Add-then-delete makes the delete valid whether or not the table exists; the new
		// table follows in the same transaction, so no packet sees it missing.
		g.conn.AddTable(f.table)
		g.conn.DelTable(f.table)
		if !f.wanted() {
			continue
		}
		g.conn.AddTable(f.table)
		g.conn.AddChain(chain(f.table))
		if f.network.IsValid() {
			g.conn.AddRule(rule(f, s.Underlay))
		}
		if f.port != 0 {
			for _, m := range messages {
				set := recordSet(f, m)
				if err := g.conn.AddSet(set, nil); err != nil {
					return fmt.Errorf("wireguard underlay guard: set %s: %w", m.set, err)
				}
				g.conn.AddRule(recordRule(f, m, set))
			}
		}
	}
	if err := g.conn.Flush(); err != nil {
		g.set = false
		return fmt.Errorf("wireguard underlay guard: write tables %s: %w", Table, err)
	}
	g.spec, g.set = s, true
	return nil
}

// Drifted reports why the tables no longer hold the last spec set ("": they do).
func (g *Guard) Drifted() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.set || g.spec == (Spec{}) {
		return ""
	}
	return g.checkLocked()
}

func (g *Guard) checkLocked() string {
	for _, f := range g.spec.families() {
		if why := g.check(f); why != "" {
			return why
		}
	}
	return ""
}

// check reports how f's table differs from what it should be.
func (g *Guard) check(f family) string {
	t := f.table
	if !f.wanted() {
		if cur, err := g.conn.ListTableOfFamily(Table, t.Family); err == nil && cur != nil {
			return fmt.Sprintf("table %s %s is back", familyName(t), Table)
		}
		return ""
	}
	c, err := g.conn.ListChain(t, Chain)
	if err != nil || c == nil {
		return familyName(t) + " underlay guard chain missing"
	}
	if c.Hooknum == nil || *c.Hooknum != *nftables.ChainHookPrerouting || c.Priority == nil || *c.Priority != *nftables.ChainPriorityRef(priority) ||
		(c.Policy != nil && *c.Policy != nftables.ChainPolicyAccept) {
		return familyName(t) + " underlay guard chain changed"
	}
	rs, err := g.conn.GetRules(t, chain(t))
	tags := f.tags(g.spec.Underlay)
	if err != nil || len(rs) != len(tags) {
		return familyName(t) + " underlay guard rule missing or changed"
	}
	for i, r := range rs {
		n := recordLen
		if i == 0 && f.network.IsValid() {
			n = ruleLen(f)
		}
		if !bytes.Equal(r.UserData, tags[i]) || len(r.Exprs) != n {
			return familyName(t) + " underlay guard rule missing or changed"
		}
	}
	return ""
}

func familyName(t *nftables.Table) string {
	if t.Family == nftables.TableFamilyIPv6 {
		return "ip6"
	}
	return "ip"
}

// Dropped is how many packets the rules have dropped (since the tables were last written).
func (g *Guard) Dropped() uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.set {
		return 0
	}
	var n uint64
	for _, f := range g.spec.families() {
		if !f.wanted() {
			continue
		}
		if rs, err := g.conn.GetRules(f.table, chain(f.table)); err == nil {
			n += vxguard.Packets(rs)
		}
	}
	return n
}

// Handshakes reports, for each underlay address a handshake initiation (response) to the
// port came from in the last few seconds, how long ago the last one arrived (nil without a
// port).
func (g *Guard) Handshakes() (initiations, responses map[netip.Addr]time.Duration, err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.set || g.spec.Port == 0 {
		return nil, nil, nil
	}
	var seen [len(messages)]map[netip.Addr]time.Duration
	for i, m := range messages {
		seen[i] = map[netip.Addr]time.Duration{}
		for _, f := range g.spec.families() {
			es, err := g.conn.GetSetElements(recordSet(f, m))
			if err != nil {
				return nil, nil, fmt.Errorf("wireguard underlay guard: read set %s %s: %w", familyName(f.table), m.set, err)
			}
			for _, e := range es {
				a, ok := netip.AddrFromSlice(e.Key)
				timeout := cmp.Or(e.Timeout, recordFor)
				if ok && e.Expires <= timeout {
					seen[i][a] = timeout - e.Expires
				}
			}
		}
	}
	return seen[0], seen[1], nil
}

// Remove deletes the tables if they exist (netagent cleanup).
func Remove() error {
	return errors.Join(vxguard.RemoveTable(Table), vxguard.RemoveTable6(Table))
}

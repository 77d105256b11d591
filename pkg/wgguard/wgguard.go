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
// Scale: one rule per family whatever the number of peers; a check is one dump of a chain
// per family.
package wgguard

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"

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
)

// Spec is what the guard protects; the zero Spec removes the tables.
type Spec struct {
	Underlay string       // the underlay device
	Network  netip.Prefix // the IPv4 pod network (unset: no IPv4 table)
	Network6 netip.Prefix // the IPv6 pod network (unset: no IPv6 table)
	// Routable6 says IPv6 pods are not masqueraded, so replies from the outside reach them
	// from the underlay: only packets from the IPv6 pod network are dropped.
	Routable6 bool
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

// family is one table of the guard: the pod network of its family.
type family struct {
	table    *nftables.Table
	network  netip.Prefix // unset: the table is not wanted
	src, dst uint32       // offsets of the addresses in the network header
	routable bool         // match the source too (see Spec.Routable6)
}

func (s Spec) families() [2]family {
	return [2]family{
		{table: &nftables.Table{Name: Table, Family: nftables.TableFamilyIPv4}, network: s.Network, src: 12, dst: 16},
		{table: &nftables.Table{Name: Table, Family: nftables.TableFamilyIPv6}, network: s.Network6, src: 8, dst: 24, routable: s.Routable6},
	}
}

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
		case s.Underlay == "" || (!s.Network.IsValid() && !s.Network6.IsValid()):
			return fmt.Errorf("wireguard underlay guard: want an underlay device and a pod network, have %q, %s and %s", s.Underlay, s.Network, s.Network6)
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
		if f.network.IsValid() {
			g.conn.AddTable(f.table)
			g.conn.AddChain(chain(f.table))
			g.conn.AddRule(rule(f, s.Underlay))
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
	if !f.network.IsValid() {
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
	if err != nil || len(rs) != 1 || !bytes.Equal(rs[0].UserData, tag(g.spec.Underlay, f)) || len(rs[0].Exprs) != ruleLen(f) {
		return familyName(t) + " underlay guard rule missing or changed"
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
		if !f.network.IsValid() {
			continue
		}
		if rs, err := g.conn.GetRules(f.table, chain(f.table)); err == nil {
			n += vxguard.Packets(rs)
		}
	}
	return n
}

// Remove deletes the tables if they exist (netagent cleanup).
func Remove() error {
	return errors.Join(vxguard.RemoveTable(Table), vxguard.RemoveTable6(Table))
}

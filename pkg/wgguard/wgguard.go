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
	table   *nftables.Table
	network netip.Prefix // unset: the table is not wanted
	offset  uint32       // of the destination address in the network header
}

func (s Spec) families() [2]family {
	return [2]family{
		{table: &nftables.Table{Name: Table, Family: nftables.TableFamilyIPv4}, network: s.Network, offset: 16},
		{table: &nftables.Table{Name: Table, Family: nftables.TableFamilyIPv6}, network: s.Network6, offset: 24},
	}
}

func chain(t *nftables.Table) *nftables.Chain {
	return &nftables.Chain{Name: Chain, Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRef(priority)}
}

func tag(underlay string, network netip.Prefix) []byte {
	return fmt.Appendf(nil, "%sdev=%s network=%s", tagText, underlay, network)
}

func rule(f family, underlay string) *nftables.Rule {
	name := make([]byte, unix.IFNAMSIZ)
	copy(name, underlay)
	n := f.network.Masked()
	mask := net.CIDRMask(n.Bits(), n.Addr().BitLen())
	return &nftables.Rule{Table: f.table, Chain: chain(f.table), UserData: tag(underlay, n), Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: name},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: f.offset, Len: uint32(len(mask))}, // ip(6) daddr
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: uint32(len(mask)), Mask: mask, Xor: make([]byte, len(mask))},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: n.Addr().AsSlice()},
		&expr.Counter{},
		&expr.Verdict{Kind: expr.VerdictDrop},
	}}
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
	if err != nil || len(rs) != 1 || !bytes.Equal(rs[0].UserData, tag(g.spec.Underlay, f.network.Masked())) || len(rs[0].Exprs) != 7 {
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

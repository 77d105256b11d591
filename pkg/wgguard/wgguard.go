// Package wgguard is the WireGuard backend's underlay guard: with WireGuard, pod traffic
// between nodes arrives on the WireGuard device only, so a packet addressed to the pod
// network that arrives on the underlay unencrypted is someone injecting it (a host on the
// underlay routing to a pod subnet, or a spoofed peer) and is dropped.
//
// It is one nftables table (family ip, "netagent-wg") written over netlink with
// github.com/google/nftables, replaced whole in one transaction when it differs:
//
//	prerouting (priority raw, -300): iifname <underlay> ip daddr <pod network> counter drop
//
// At raw priority the destination is still the one on the wire, before any DNAT: replies
// to masqueraded pod egress and hostPort traffic are addressed to the node, not the pod
// network, and pass; decrypted pod traffic arrives on the WireGuard device and passes.
//
// Scale: one rule whatever the number of peers; a check is one dump of one chain.
package wgguard

import (
	"bytes"
	"encoding/binary"
	"fmt"
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

// Spec is what the guard protects; the zero Spec removes the table.
type Spec struct {
	Underlay string       // the underlay device
	Network  netip.Prefix // the pod network (IPv4)
}

// Guard owns the table in the network namespace it was created in.
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

func table() *nftables.Table { return &nftables.Table{Name: Table, Family: nftables.TableFamilyIPv4} }

func chain(t *nftables.Table) *nftables.Chain {
	return &nftables.Chain{Name: Chain, Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRef(priority)}
}

func tag(s Spec) []byte {
	return fmt.Appendf(nil, "%sdev=%s network=%s", tagText, s.Underlay, s.Network)
}

func rule(t *nftables.Table, s Spec) *nftables.Rule {
	name := make([]byte, unix.IFNAMSIZ)
	copy(name, s.Underlay)
	mask := make([]byte, 4)
	binary.BigEndian.PutUint32(mask, ^uint32(0)<<(32-s.Network.Bits()))
	net4 := s.Network.Masked().Addr().As4()
	return &nftables.Rule{Table: t, Chain: chain(t), UserData: tag(s), Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: name},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4}, // ip daddr
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: []byte{0, 0, 0, 0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: net4[:]},
		&expr.Counter{},
		&expr.Verdict{Kind: expr.VerdictDrop},
	}}
}

// Set makes the table hold spec's rule (the zero Spec: no table). It reads the kernel
// only when the spec changed or a check found it changed.
func (g *Guard) Set(s Spec) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.set && g.spec == s && g.checkLocked() == "" {
		return nil
	}
	if s != (Spec{}) && (s.Underlay == "" || !s.Network.Addr().Is4()) {
		return fmt.Errorf("wireguard underlay guard: want an underlay device and an IPv4 pod network, have %q and %s", s.Underlay, s.Network)
	}
	t := table()
	// Add-then-delete makes the delete valid whether or not the table exists; the new
	// table follows in the same transaction, so no packet sees it missing.
	g.conn.AddTable(t)
	g.conn.DelTable(t)
	if s != (Spec{}) {
		g.conn.AddTable(t)
		g.conn.AddChain(chain(t))
		g.conn.AddRule(rule(t, s))
	}
	if err := g.conn.Flush(); err != nil {
		g.set = false
		return fmt.Errorf("wireguard underlay guard: write table %s: %w", Table, err)
	}
	g.spec, g.set = s, true
	return nil
}

// Drifted reports why the table no longer holds the last spec set ("": it does).
func (g *Guard) Drifted() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.set || g.spec == (Spec{}) {
		return ""
	}
	return g.checkLocked()
}

func (g *Guard) checkLocked() string {
	if g.spec == (Spec{}) {
		if t, err := g.conn.ListTableOfFamily(Table, nftables.TableFamilyIPv4); err == nil && t != nil {
			return "table " + Table + " is back"
		}
		return ""
	}
	t := table()
	c, err := g.conn.ListChain(t, Chain)
	if err != nil || c == nil {
		return "underlay guard chain missing"
	}
	if c.Hooknum == nil || *c.Hooknum != *nftables.ChainHookPrerouting || c.Priority == nil || *c.Priority != *nftables.ChainPriorityRef(priority) ||
		(c.Policy != nil && *c.Policy != nftables.ChainPolicyAccept) {
		return "underlay guard chain changed"
	}
	rs, err := g.conn.GetRules(t, chain(t))
	if err != nil || len(rs) != 1 || !bytes.Equal(rs[0].UserData, tag(g.spec)) || len(rs[0].Exprs) != 7 {
		return "underlay guard rule missing or changed"
	}
	return ""
}

// Dropped is how many packets the rule has dropped (since the table was last written).
func (g *Guard) Dropped() uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.set || g.spec == (Spec{}) {
		return 0
	}
	t := table()
	rs, err := g.conn.GetRules(t, chain(t))
	if err != nil {
		return 0
	}
	return vxguard.Packets(rs)
}

// Remove deletes the table if it exists (netagent cleanup).
func Remove() error { return vxguard.RemoveTable(Table) }

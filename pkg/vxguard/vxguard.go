// Package vxguard is the VXLAN allow-list: a node accepts VXLAN packets only from the
// underlay addresses of its known peers, and drops VXLAN packets that pods send (so a pod
// cannot inject frames into the overlay, neither into its own node nor, masqueraded to its
// node's address, into another node).
//
// It is one nftables table (family ip, "netagent") written over netlink with
// github.com/google/nftables, so every change is one atomic transaction and costs no
// process: a set of peer addresses that lease changes update element by element, and two
// base chains with one rule each:
//
//	input:   udp dport <port> ip saddr != @vxlan-peers counter drop
//	forward: ip saddr <cluster network> udp dport <port> counter drop
//
// The chains run just before iptables' filter chains (priority -10), so no iptables rule
// (Docker's, kube-proxy's) can accept a packet first.
package vxguard

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Names in the kernel.
const (
	Table      = "netagent"
	SetName    = "vxlan-peers"
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
	Port    int          // VXLAN UDP port; 0: no VXLAN here, the table is removed
	Network netip.Prefix // the cluster pod network: VXLAN from these sources is dropped
	Peers   map[string]netip.Addr
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
	nodes map[string]netip.Addr // node -> its address in the set
	refs  map[netip.Addr]int    // address -> how many nodes use it
	valid bool                  // nodes/refs mirror the kernel's set
	base  uint64                // drops counted by rules that were since rebuilt
}

// New opens a netlink connection in the current network namespace.
func New() (*Guard, error) {
	c, err := nftables.New(nftables.AsLasting())
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	return &Guard{conn: c}, nil
}

// Close releases the connection.
func (g *Guard) Close() error { return g.conn.CloseLasting() }

func table() *nftables.Table { return &nftables.Table{Name: Table, Family: nftables.TableFamilyIPv4} }

func peerSet(t *nftables.Table) *nftables.Set {
	return &nftables.Set{Table: t, Name: SetName, KeyType: nftables.TypeIPAddr}
}

func chains(t *nftables.Table) (in, fwd *nftables.Chain) {
	p := nftables.ChainPriorityRef(priority)
	in = &nftables.Chain{Name: ChainIn, Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookInput, Priority: p}
	fwd = &nftables.Chain{Name: ChainFwd, Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookForward, Priority: p}
	return in, fwd
}

// tag identifies the rules of a spec, so a Sync can tell its own rules from changed ones.
func tag(chain string, s Spec) []byte {
	return fmt.Appendf(nil, "%s%s port=%d network=%s", tagPrefix, chain, s.Port, s.Network)
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

func rules(t *nftables.Table, set *nftables.Set, s Spec) []*nftables.Rule {
	in, fwd := chains(t)
	inExprs := append(udpDport(s.Port),
		ipSaddr(),
		&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID, Invert: true},
		&expr.Counter{},
		&expr.Verdict{Kind: expr.VerdictDrop},
	)
	net4 := s.Network.Masked().Addr().As4()
	mask := netipMask(s.Network.Bits())
	fwdExprs := append([]expr.Any{
		ipSaddr(),
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: []byte{0, 0, 0, 0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: net4[:]},
	}, udpDport(s.Port)...)
	fwdExprs = append(fwdExprs, &expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop})
	return []*nftables.Rule{
		{Table: t, Chain: in, Exprs: inExprs, UserData: tag(ChainIn, s)},
		{Table: t, Chain: fwd, Exprs: fwdExprs, UserData: tag(ChainFwd, s)},
	}
}

func netipMask(bits int) []byte {
	m := make([]byte, 4)
	binary.BigEndian.PutUint32(m, ^uint32(0)<<(32-bits))
	return m
}

func elements(addrs []netip.Addr) []nftables.SetElement {
	out := make([]nftables.SetElement, 0, len(addrs))
	for _, a := range addrs {
		b := a.As4()
		out = append(out, nftables.SetElement{Key: b[:]})
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
			g.spec, g.nodes, g.refs, g.valid = spec, map[string]netip.Addr{}, map[netip.Addr]int{}, true
			return Stats{}, nil
		}
		g.base += g.countersLocked()
		g.conn.DelTable(t)
		if err := g.conn.Flush(); err != nil {
			return Stats{}, fmt.Errorf("vxguard: remove table: %w", err)
		}
		g.spec, g.nodes, g.refs, g.valid = spec, map[string]netip.Addr{}, map[netip.Addr]int{}, true
		return Stats{Rebuilt: true}, nil
	}
	// spec.Peers becomes the mirror of which node holds which address (no copy: with
	// thousands of peers the maps are most of the guard's memory).
	nodes, refs := spec.Peers, make(map[netip.Addr]int, len(spec.Peers))
	if nodes == nil {
		nodes = map[string]netip.Addr{}
	}
	for n, a := range nodes {
		if !a.Is4() {
			delete(nodes, n)
			continue
		}
		refs[a]++
	}
	want := make([]netip.Addr, 0, len(refs))
	for a := range refs {
		want = append(want, a)
	}
	var st Stats
	set := peerSet(t)
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
		if err := g.conn.AddSet(set, nil); err != nil {
			return Stats{}, fmt.Errorf("vxguard: set: %w", err)
		}
		in, fwd := chains(t)
		g.conn.AddChain(in)
		g.conn.AddChain(fwd)
		for _, r := range rules(t, set, spec) {
			g.conn.AddRule(r)
		}
		if err := g.addElements(set, want); err != nil {
			return Stats{}, err
		}
		if err := g.conn.Flush(); err != nil {
			return Stats{}, fmt.Errorf("vxguard: create table: %w", err)
		}
		st = Stats{Rebuilt: true, Added: len(want)}
	} else {
		var add, del []netip.Addr
		for _, a := range want {
			if !have[a] {
				add = append(add, a)
			}
		}
		for a := range have {
			if refs[a] == 0 {
				del = append(del, a)
			}
		}
		if len(add)+len(del) > 0 {
			if err := g.changeElements(set, add, del); err != nil {
				return Stats{}, err
			}
		}
		st = Stats{Added: len(add), Delete: len(del)}
	}
	spec.Peers = nil
	g.spec, g.nodes, g.refs, g.valid = spec, nodes, refs, true
	return st, nil
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

// structureOK reads the table and reports its set's elements and whether the set, the two
// chains and their single rules are exactly ours for spec.
func (g *Guard) structureOK(spec Spec) (map[netip.Addr]bool, bool) {
	t := table()
	set, err := g.conn.GetSetByName(t, SetName)
	if err != nil || set == nil || set.KeyType.Name != nftables.TypeIPAddr.Name {
		return nil, false
	}
	in, fwd := chains(t)
	for _, c := range []*nftables.Chain{in, fwd} {
		kc, err := g.conn.ListChain(t, c.Name)
		if err != nil || kc.Type != c.Type || kc.Hooknum == nil || *kc.Hooknum != *c.Hooknum || kc.Priority == nil || *kc.Priority != *c.Priority ||
			kc.Policy != nil && *kc.Policy != nftables.ChainPolicyAccept {
			return nil, false
		}
		rs, err := g.conn.GetRules(t, c)
		if err != nil || len(rs) != 1 || string(rs[0].UserData) != string(tag(c.Name, spec)) {
			return nil, false
		}
	}
	els, err := g.conn.GetSetElements(set)
	if err != nil {
		return nil, false
	}
	have := make(map[netip.Addr]bool, len(els))
	for _, e := range els {
		if a, ok := netip.AddrFromSlice(e.Key); ok {
			have[a.Unmap()] = true
		}
	}
	return have, true
}

func (g *Guard) addElements(set *nftables.Set, addrs []netip.Addr) error {
	for c := range slices.Chunk(addrs, maxBatched) {
		if err := g.conn.SetAddElements(set, elements(c)); err != nil {
			return fmt.Errorf("vxguard: add elements: %w", err)
		}
	}
	return nil
}

// changeElements adds and removes elements in one transaction.
func (g *Guard) changeElements(set *nftables.Set, add, del []netip.Addr) error {
	if err := g.addElements(set, add); err != nil {
		return err
	}
	for c := range slices.Chunk(del, maxBatched) {
		if err := g.conn.SetDeleteElements(set, elements(c)); err != nil {
			return fmt.Errorf("vxguard: delete elements: %w", err)
		}
	}
	if err := g.conn.Flush(); err != nil {
		return fmt.Errorf("vxguard: update peers: %w", err)
	}
	return nil
}

// Update applies peer changes (node -> its address now; the zero Addr: gone or not a
// peer any more) without reading the kernel: only addresses whose last user left or whose
// first user arrived are written. It needs a Sync first (ErrNoMirror).
func (g *Guard) Update(changes map[string]netip.Addr) (Stats, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.valid {
		return Stats{}, ErrNoMirror
	}
	if g.spec.Port == 0 {
		return Stats{}, nil
	}
	// Whether each touched address was in the set before this batch: a batch can move an
	// address from one node to another, which must not write anything.
	before := map[netip.Addr]bool{}
	touch := func(a netip.Addr) {
		if _, ok := before[a]; !ok {
			before[a] = g.refs[a] > 0
		}
	}
	for n, a := range changes {
		old, had := g.nodes[n]
		if had && old == a {
			continue
		}
		if had {
			touch(old)
			if g.refs[old]--; g.refs[old] == 0 {
				delete(g.refs, old)
			}
			delete(g.nodes, n)
		}
		if a.Is4() {
			touch(a)
			g.nodes[n] = a
			g.refs[a]++
		}
	}
	var add, del []netip.Addr
	for a, was := range before {
		switch now := g.refs[a] > 0; {
		case now && !was:
			add = append(add, a)
		case was && !now:
			del = append(del, a)
		}
	}
	if len(add)+len(del) == 0 {
		return Stats{}, nil
	}
	if err := g.changeElements(peerSet(table()), add, del); err != nil {
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
		for _, r := range rs {
			for _, e := range r.Exprs {
				if c, ok := e.(*expr.Counter); ok {
					n += c.Packets
				}
			}
		}
	}
	return n
}

// Remove deletes the table if it exists (netagent cleanup).
func Remove() error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	if t, err := c.ListTableOfFamily(Table, nftables.TableFamilyIPv4); err != nil || t == nil {
		return nil
	}
	c.DelTable(table())
	return c.Flush()
}

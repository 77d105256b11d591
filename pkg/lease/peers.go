package lease

import (
	"fmt"
	"maps"
	"net/netip"
	"sort"
	"sync"

	"github.com/netagent/netagent/pkg/multimap"
	"github.com/netagent/netagent/pkg/netipx"
)

// Peers is a watched view of all live leases, one per node, that also remembers which
// nodes changed since the last Take, so the agent can do work for the changed leases only.
//
// It is where leases are trusted or not: every lease entering it is checked against Rules,
// and leases whose subnets overlap are settled here, deterministically and whatever the
// order of events: a lease of the configured subnet length wins over one of another
// length; among leases of the same subnet (or two odd-length ones that overlap) the one
// created first wins (etcd's create revision), then the lower key. With keys that must
// match their value (DecodeKey), a single forged key can therefore neither take a live
// node's subnet nor cut into it with a longer or shorter prefix. Every lease not used is
// kept in Invalids with the reason.
//
// A dual-stack lease holds two subnets, one per family: each is settled as above, and the
// lease is used only if it wins both (a forged lease cannot take a live node's IPv6 subnet
// either).
//
// Scale: leases of the configured length are indexed by subnet, so a change costs O(1)
// map work; odd-length leases (normally none) are compared against each other and, when
// shorter than the configured length, against the regular ones.
//
// Memory: each lease is kept once, and Snapshot and Take hand out pointers to it, so the
// planner that plans from them holds the same lease, not a copy (at thousands of peers
// the leases are megabytes). A stored lease is never changed: a changed one is a new
// value. Callers must not change what the pointers point to.
type Peers struct {
	mu       sync.Mutex
	rules    Rules
	cand     map[string]*cand                      // every lease that passed the rules, by store key
	bySubnet multimap.Map[netipx.PrefixKey, *cand] // candidates per subnet (normally one)
	odd      map[string]bool                       // keys whose subnet length is not rules.SubnetLen
	nodes    map[string]*cand                      // node -> its candidates in use (normally one), linked by next
	dirty    map[string]bool                       // nodes changed since Take
	full     bool                                  // the whole view was replaced since Take
	bad      map[string]string                     // keys not in use -> why
}

// cand is a lease that passed the rules, under its store key. Its Entry never changes
// once stored (pointers to its lease are handed out); used and next do.
type cand struct {
	Entry
	key  string
	used bool  // in use: in its node's list in Peers.nodes
	next *cand // the node's next candidate in use
}

// Entry is a lease as a store lists it.
type Entry struct {
	Lease Lease
	Rev   int64 // creation order: etcd's create revision, a Node's creation time
}

// NewPeers returns an empty view that checks only that leases are well-formed and do not
// overlap.
func NewPeers() *Peers { return NewPeersWith(Rules{}) }

// NewPeersWith returns an empty view that uses only leases passing r.
func NewPeersWith(r Rules) *Peers {
	p := &Peers{rules: r}
	p.reset(0)
	return p
}

// reset empties the view, sized for n keys.
func (p *Peers) reset(n int) {
	subnets := n
	if p.rules.Network.IsValid() && p.rules.Network6.IsValid() {
		subnets = 2 * n
	}
	p.cand, p.bySubnet, p.odd = make(map[string]*cand, n), multimap.New[netipx.PrefixKey, *cand](subnets), map[string]bool{}
	p.nodes = make(map[string]*cand, n)
	p.dirty, p.bad = map[string]bool{}, map[string]string{}
}

// put records l, created at rev, under key k (caller holds mu).
func (p *Peers) put(k string, l Lease, rev int64) {
	l = p.rules.Enabled(l)
	if c, ok := p.cand[k]; ok && c.Lease == l && c.Rev == rev {
		return // rewritten as it was (a renewal)
	}
	affected := p.drop(k)
	if err := p.rules.Check(l); err != nil {
		p.bad[k] = err.Error()
		p.settle(affected)
		return
	}
	delete(p.bad, k)
	c := &cand{Entry: Entry{l, rev}, key: k}
	p.cand[k] = c
	for _, s := range l.Subnets() {
		p.bySubnet.Add(netipx.PrefixKeyOf(s), c)
		if p.isOdd(s) {
			p.odd[k] = true
		}
		affected = append(affected, p.around(s)...)
	}
	p.settle(affected)
}

// invalid records that key k holds no usable lease (caller holds mu).
func (p *Peers) invalid(k, why string) {
	p.settle(p.drop(k))
	p.bad[k] = why
}

// del forgets key k (caller holds mu).
func (p *Peers) del(k string) {
	delete(p.bad, k)
	p.settle(p.drop(k))
}

func (p *Peers) isOdd(s netip.Prefix) bool {
	n := p.rules.subnetLen(s)
	return n != 0 && s.Bits() != n
}

// drop removes k's candidate and returns the keys whose standing may change with it.
func (p *Peers) drop(k string) []string {
	c, ok := p.cand[k]
	if !ok {
		return nil
	}
	p.unuse(c)
	delete(p.cand, k)
	delete(p.odd, k)
	var out []string
	for _, s := range c.Lease.Subnets() {
		p.bySubnet.Remove(netipx.PrefixKeyOf(s), c)
		out = append(out, p.around(s)...)
	}
	return out
}

// around is every candidate whose standing depends on subnet s: the keys of s itself and
// the odd-length ones overlapping it.
func (p *Peers) around(s netip.Prefix) []string {
	var out []string
	p.bySubnet.Each(netipx.PrefixKeyOf(s), func(c *cand) bool { out = append(out, c.key); return true })
	for k := range p.odd {
		for _, c := range p.cand[k].Lease.Subnets() {
			if c != s && c.Overlaps(s) {
				out = append(out, k)
			}
		}
	}
	return out
}

// before orders candidates: created first, then the lower key.
func before(a, b Entry, ka, kb string) bool {
	if a.Rev != b.Rev {
		return a.Rev < b.Rev
	}
	return ka < kb
}

// loses says why candidate k may not be used (empty: it may).
func (p *Peers) loses(k string) string {
	e := p.cand[k].Entry
	for _, s := range e.Lease.Subnets() {
		if why := p.losesSubnet(k, e, s); why != "" {
			return why
		}
	}
	return ""
}

// losesSubnet says why candidate k, e may not hold its subnet s (empty: it may).
func (p *Peers) losesSubnet(k string, e Entry, s netip.Prefix) string {
	why := ""
	p.bySubnet.Each(netipx.PrefixKeyOf(s), func(c *cand) bool {
		if o, oe := c.key, c.Entry; o != k && before(oe, e, o, k) {
			why = fmt.Sprintf("subnet %s is held by %s (key %s), which was there first", s, oe.Lease.Node, o)
		}
		return why == ""
	})
	if why != "" {
		return why
	}
	if !p.isOdd(s) {
		return ""
	}
	if o, c, ok := p.regularOverlapping(s); ok {
		return fmt.Sprintf("subnet %s overlaps %s of %s (key %s), which has the configured length /%d", s, c, p.cand[o].Lease.Node, o, p.rules.subnetLen(s))
	}
	for o := range p.odd {
		oe := p.cand[o].Entry
		if o == k || !before(oe, e, o, k) {
			continue
		}
		for _, c := range oe.Lease.Subnets() {
			if c.Overlaps(s) {
				return fmt.Sprintf("subnet %s overlaps %s of %s (key %s), which was there first", s, c, oe.Lease.Node, o)
			}
		}
	}
	return ""
}

// regularOverlapping finds a candidate's subnet of the configured length overlapping odd
// subnet s: the key and that subnet.
func (p *Peers) regularOverlapping(s netip.Prefix) (string, netip.Prefix, bool) {
	n := p.rules.subnetLen(s)
	if s.Bits() > n { // inside at most one regular subnet
		r := netip.PrefixFrom(s.Addr(), n).Masked()
		if c, ok := p.bySubnet.First(netipx.PrefixKeyOf(r)); ok {
			return c.key, r, true
		}
		return "", netip.Prefix{}, false
	}
	// s holds 2^(n-bits) regular subnets: look each up, or scan the candidates when fewer.
	if span := n - s.Bits(); s.Addr().Is4() && span < 20 && 1<<span <= len(p.cand) {
		a := s.Addr()
		step := uint32(1) << (32 - n)
		for range 1 << span {
			if c, ok := p.bySubnet.First(netipx.PrefixKeyOf(netip.PrefixFrom(a, n))); ok {
				return c.key, netip.PrefixFrom(a, n), true
			}
			b := a.As4()
			v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]) + step
			a = netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
		}
		return "", netip.Prefix{}, false
	}
	best, bestSubnet := "", netip.Prefix{}
	for k, e := range p.cand {
		for _, c := range e.Lease.Subnets() {
			if !p.isOdd(c) && c.Overlaps(s) && (best == "" || k < best) {
				best, bestSubnet = k, c
			}
		}
	}
	return best, bestSubnet, best != ""
}

// settle re-decides whether each of keys is used.
func (p *Peers) settle(keys []string) {
	for _, k := range keys {
		c, ok := p.cand[k]
		if !ok {
			continue
		}
		if why := p.loses(k); why != "" {
			p.unuse(c)
			p.bad[k] = why
			continue
		}
		delete(p.bad, k)
		if !c.used {
			// (A candidate's lease changes only through drop, which unuses it.)
			p.use(c)
		}
	}
}

// use puts c in its node's list of candidates in use.
func (p *Peers) use(c *cand) {
	c.used = true
	c.next = p.nodes[c.Lease.Node]
	p.nodes[c.Lease.Node] = c
	p.dirty[c.Lease.Node] = true
}

// unuse takes c out of its node's list.
func (p *Peers) unuse(c *cand) {
	if !c.used {
		return
	}
	n := c.Lease.Node
	switch head := p.nodes[n]; {
	case head == c && c.next == nil:
		delete(p.nodes, n)
	case head == c:
		p.nodes[n] = c.next
	default:
		for x := head; x != nil; x = x.next {
			if x.next == c {
				x.next = c.next
				break
			}
		}
	}
	c.used, c.next = false, nil
	p.dirty[n] = true
}

// replace swaps in a fresh list, with the keys that held nothing usable (caller holds mu).
func (p *Peers) replace(leases map[string]Entry, bad map[string]string) {
	p.reset(len(leases))
	for k, e := range leases {
		p.put(k, e.Lease, e.Rev)
	}
	for k, why := range bad {
		p.bad[k] = why
	}
	p.dirty = map[string]bool{}
	p.full = true
}

// current is node's lease: from its first created key if it somehow holds several (a
// forged key naming a live node cannot displace the node's own).
func (p *Peers) current(node string) (*Lease, bool) {
	best := p.nodes[node]
	if best == nil {
		return nil, false
	}
	for c := best.next; c != nil; c = c.next {
		if before(c.Entry, best.Entry, c.key, best.key) {
			best = c
		}
	}
	return &best.Lease, true
}

// Snapshot returns one lease per node, sorted by node name. The leases are the view's
// own: shared, never to be changed.
func (p *Peers) Snapshot() []*Lease {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]*Lease, 0, len(p.nodes))
	for n := range p.nodes {
		l, _ := p.current(n)
		out = append(out, l)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Node < out[j].Node })
	return out
}

// Node returns node's lease as the view has it.
func (p *Peers) Node(node string) (Lease, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if l, ok := p.current(node); ok {
		return *l, true
	}
	return Lease{}, false
}

// Take returns what changed since the last Take: each changed node's current lease (shared,
// as Snapshot's), or a new Lease{Node: name} for a node that is gone; full means the whole
// view was replaced (a re-list), so the caller should start over from Snapshot.
func (p *Peers) Take() (changed []*Lease, full bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	full = p.full
	for n := range p.dirty {
		if l, ok := p.current(n); ok {
			changed = append(changed, l)
		} else {
			changed = append(changed, &Lease{Node: n})
		}
	}
	p.dirty = map[string]bool{}
	p.full = false
	return changed, full
}

// Len is the number of nodes with a live lease.
func (p *Peers) Len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.nodes)
}

// The methods below let the stores feed the view; each takes the lock itself.

// Replace swaps in a fresh list (a store's re-list): leases by store key, and the keys
// that held nothing usable, with why. Take then reports full.
func (p *Peers) Replace(leases map[string]Entry, bad map[string]string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.replace(leases, bad)
}

// Update applies a store's changes under one lock, so that a reader sees all of them or
// none (the events of one etcd watch response, which may delete one key and create another).
func (p *Peers) Update(fn func(Batch)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fn(Batch{p})
}

// Batch changes the view inside Update, as Peers' Set, Invalid and Delete do outside it.
type Batch struct{ p *Peers }

// Set is Peers.Set inside Update.
func (b Batch) Set(k string, l Lease, rev int64) { b.p.put(k, l, rev) }

// Invalid is Peers.Invalid inside Update.
func (b Batch) Invalid(k, why string) { b.p.invalid(k, why) }

// Delete is Peers.Delete inside Update.
func (b Batch) Delete(k string) { b.p.del(k) }

// Set records l, created at rev (smaller: older), as the lease under store key k.
func (p *Peers) Set(k string, l Lease, rev int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.put(k, l, rev)
}

// Invalid records that the object under key k holds no usable lease (why), dropping any
// lease it had: a peer whose data turned bad is no longer routed to.
func (p *Peers) Invalid(k, why string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.invalid(k, why)
}

// SetSelfIPs changes this node's public IPs in the rules (the node published an address
// it gained): leases already in use that claim one of them are dropped as invalid, as a
// lease arriving later would be.
func (p *Peers) SetSelfIPs(ip, ip6 netip.Addr) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.rules.SelfIP, p.rules.SelfIP6 = ip, ip6
	for k, c := range p.cand {
		if err := p.rules.Check(c.Lease); err != nil {
			p.invalid(k, err.Error())
		}
	}
}

// Delete forgets key k.
func (p *Peers) Delete(k string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.del(k)
}

// Invalids returns the keys whose objects hold no lease in use, with why.
func (p *Peers) Invalids() map[string]string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return maps.Clone(p.bad)
}

package lease

import (
	"maps"
	"slices"
	"sort"
	"sync"
)

// Peers is a watched view of all live leases, one per node, that also remembers which
// nodes changed since the last Take, so the agent can do work for the changed leases only.
type Peers struct {
	mu       sync.Mutex
	byKey    map[string]Lease    // store key -> lease
	nodeKeys map[string][]string // node -> its keys (normally one)
	dirty    map[string]bool     // nodes changed since Take
	full     bool                // the whole view was replaced since Take
	bad      map[string]string   // undecodable keys -> why
}

// NewPeers returns an empty view.
func NewPeers() *Peers {
	return &Peers{byKey: map[string]Lease{}, nodeKeys: map[string][]string{}, dirty: map[string]bool{}, bad: map[string]string{}}
}

// put records l under key k (caller holds mu).
func (p *Peers) put(k string, l Lease) {
	if old, ok := p.byKey[k]; ok && old.Node != l.Node {
		p.unlink(old.Node, k)
	}
	p.byKey[k] = l
	if !slices.Contains(p.nodeKeys[l.Node], k) {
		p.nodeKeys[l.Node] = append(p.nodeKeys[l.Node], k)
	}
	p.dirty[l.Node] = true
}

// del forgets key k (caller holds mu).
func (p *Peers) del(k string) {
	old, ok := p.byKey[k]
	if !ok {
		return
	}
	delete(p.byKey, k)
	p.unlink(old.Node, k)
}

func (p *Peers) unlink(node, k string) {
	keys := slices.DeleteFunc(p.nodeKeys[node], func(x string) bool { return x == k })
	if len(keys) == 0 {
		delete(p.nodeKeys, node)
	} else {
		p.nodeKeys[node] = keys
	}
	p.dirty[node] = true
}

// replace swaps in a fresh list (caller holds mu).
func (p *Peers) replace(byKey map[string]Lease) {
	p.byKey = map[string]Lease{}
	p.nodeKeys = make(map[string][]string, len(byKey))
	for k, l := range byKey {
		p.put(k, l)
	}
	p.dirty = map[string]bool{}
	p.full = true
}

// current is node's lease: from its lowest key if it somehow holds several.
func (p *Peers) current(node string) (Lease, bool) {
	best := ""
	for _, k := range p.nodeKeys[node] {
		if best == "" || k < best {
			best = k
		}
	}
	if best == "" {
		return Lease{}, false
	}
	return p.byKey[best], true
}

// Snapshot returns one lease per node, sorted by node name.
func (p *Peers) Snapshot() []Lease {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]Lease, 0, len(p.nodeKeys))
	for n := range p.nodeKeys {
		l, _ := p.current(n)
		out = append(out, l)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Node < out[j].Node })
	return out
}

// Take returns what changed since the last Take: each changed node's current lease, or
// Lease{Node: name} for a node that is gone; full means the whole view was replaced (a
// re-list), so the caller should start over from Snapshot.
func (p *Peers) Take() (changed []Lease, full bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	full = p.full
	for n := range p.dirty {
		if l, ok := p.current(n); ok {
			changed = append(changed, l)
		} else {
			changed = append(changed, Lease{Node: n})
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
	return len(p.nodeKeys)
}

// The methods below let stores outside this package (the Kubernetes subnet manager) feed
// the view; each takes the lock itself.

// Set records l as the lease under store key k.
func (p *Peers) Set(k string, l Lease) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.bad, k)
	p.put(k, l)
}

// Invalid records that the object under key k holds no usable lease (why), dropping any
// lease it had: a peer whose data turned bad is no longer routed to.
func (p *Peers) Invalid(k, why string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.bad[k] = why
	p.del(k)
}

// Delete forgets key k.
func (p *Peers) Delete(k string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.bad, k)
	p.del(k)
}

// Invalids returns the keys whose objects hold no usable lease, with why.
func (p *Peers) Invalids() map[string]string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return maps.Clone(p.bad)
}

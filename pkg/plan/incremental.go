package plan

import (
	"iter"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/multimap"
	"github.com/netagent/netagent/pkg/netipx"
)

// Planner keeps a plan up to date one lease at a time, so a lease event costs work for
// that lease (and the few that claim the same subnet), not for every peer. It makes the
// same decisions as Build — the tests apply random sequences of changes and check that
// each Delta turns Build of the set before into Build of the set after — and the agent
// still starts a new Planner for its full passes (start, resync, config or underlay
// change); Update covers the lease events in between.
type Planner struct {
	gen    uint64
	base   Plan                                   // Build(in) without peers: the device, NAT, MTU and allow-list header
	in     Input                                  // without Peers
	peers  map[string]peer                        // by node: its lease (enabled families only) and verdict
	claim  multimap.Map[netipx.PrefixKey, string] // subnet (either family) -> nodes claiming it (almost always one)
	wgKeys map[string][]string                    // WireGuard public key -> nodes publishing it (one)
	vteps  multimap.Map[vtep, string]             // VTEP MAC -> nodes publishing it (one); VXLAN backends only

	// The desired routes, neighbour and FDB entries and WireGuard peers are not kept: each
	// follows from its node's lease and verdict (a subnet's route is its owner's, see
	// routeTo; a MAC's FDB entry its one VXLAN holder's, see vtepShared), so they are
	// rendered when asked for. With thousands of peers a map of them was the planner's
	// biggest structure.
	odd   map[string]bool // nodes whose subnet length differs from the config's
	modes map[Mode]int    // peers per mode

	tunnelMTU, podMTU int
	senders           int // peers publishing a VTEP (see Plan.KeepVXLAN)
}

// peer is a node's lease and the plan's verdict on it (the rest of its Peer follows from
// the lease).
type peer struct {
	subnetLease
	verdict
}

// verdict is the plan's decision on a peer.
type verdict struct {
	mode   Mode
	reason string
}

// contribution is the keys of one node's share of the desired state, for taking it out
// again: its routes' destinations (one per family) and, for a VXLAN peer, its FDB entry
// (its neighbour entries are keyed by the routes' destination addresses, its VTEP
// addresses). It follows from the node's lease and verdict (Planner.contribution), so it
// is computed when needed, not kept: with thousands of peers the planner is the agent's
// biggest structure.
type contribution struct {
	dst   [2]netip.Prefix // IPv4, IPv6; either invalid
	fdb   FDB             // valid only when vxlan
	vxlan bool
	wg    bool // a WireGuard peer (keyed by node)
}

// Changes names the desired entries an update touched (added, changed or removed).
type Changes struct {
	Routes []netip.Prefix
	Neighs []netip.Prefix // the VXLAN routes whose neighbour entries changed (keyed by their address)
	FDB    []FDB          // removed or added entries (an FDB entry is its own key)
	WG     []string       // nodes whose WireGuard peer changed
	Nodes  []string       // peers whose verdict may have changed
}

// Delta is how one plan differs from the one before it: each entry that changed, with its
// new value or Del. A key appears at most once.
type Delta struct {
	From   uint64 // the Gen of the plan this one follows
	Routes []RouteChange
	Neighs []NeighChange
	FDB    []FDBChange
	// Allow has the allow-list entry of every peer whose entry may have changed; ok false:
	// the peer is not allowed any more.
	Allow []AllowChange
	// Peers are the verdicts of the peers the change touched that still have a lease.
	Peers []Peer
	// WGPeers are the WireGuard peers that changed (wireguard backend), by node.
	WGPeers []WGPeerChange
}

// WGPeerChange is a node's new WireGuard peer, or Del.
type WGPeerChange struct {
	Node string
	Peer WGPeer
	Del  bool
}

// RouteChange is the new desired route to Dst, or Del.
type RouteChange struct {
	Dst   netip.Prefix
	Route Route
	Del   bool
}

// NeighChange is the new desired neighbour entry for IP, or Del.
type NeighChange struct {
	IP    netip.Addr
	Neigh Neigh
	Del   bool
}

// FDBChange is an FDB entry now desired, or (Del) no longer.
type FDBChange struct {
	FDB FDB
	Del bool
}

// AllowChange is a peer's new allow-list entry, or (Del) none.
type AllowChange struct {
	Node    string
	Allowed Allowed
	Del     bool
}

// Empty reports whether nothing changed.
func (d *Delta) Empty() bool {
	return len(d.Routes)+len(d.Neighs)+len(d.FDB)+len(d.Allow)+len(d.WGPeers) == 0
}

// gens numbers plans across Planners, so a Delta can never be taken for one that follows
// another Planner's plan.
var gens atomic.Uint64

// NewPlanner starts from a full input (its Peers included); it also returns Build(in),
// numbered.
func NewPlanner(in Input) (*Planner, Plan) {
	if in.VXLANDev == "" {
		in.VXLANDev = VXLANDevName(in.Config.Backend.VNI)
	}
	full := Build(in)
	p := &Planner{
		gen:    gens.Add(1),
		in:     in,
		peers:  make(map[string]peer, len(in.Peers)),
		claim:  multimap.New[netipx.PrefixKey, string](subnetsOf(in.Config, len(in.Peers))),
		wgKeys: map[string][]string{},
		odd:    map[string]bool{},
		modes:  map[Mode]int{},
	}
	p.in.Peers = nil
	full.Gen = p.gen
	p.base = Build(p.in)
	if p.base.VXLAN != nil {
		p.vteps = multimap.New[vtep, string](len(in.Peers))
	}
	p.podMTU = full.PodMTU
	if full.VXLAN != nil {
		p.tunnelMTU = full.VXLAN.MTU
	}
	for _, l := range in.Peers {
		if l.Node != in.Self.Node {
			e := enabled(in.Config, l)
			p.peers[l.Node] = peer{subnetLease: e}
			p.addClaim(e)
		}
	}
	for _, e := range p.peers { // once per node, whatever in.Peers repeats
		if sendsVXLAN(in.Self.Node, e.Lease) {
			p.senders++
		}
	}
	for _, v := range full.Peers {
		e := p.peers[v.Node]
		e.verdict = verdict{v.Mode, v.Reason}
		p.peers[v.Node] = e
		p.modes[v.Mode]++
	}
	return p, full
}

// subnetsOf is how many subnets n peers claim in the families c has.
func subnetsOf(c config.Network, n int) int {
	if c.HasV4() && c.HasV6() {
		return 2 * n
	}
	return n
}

func (p *Planner) addClaim(l subnetLease) {
	if k := l.WGPublicKey; k != "" && !slices.Contains(p.wgKeys[k], l.Node) {
		p.wgKeys[k] = append(p.wgKeys[k], l.Node)
	}
	if k, ok := p.vtepOf(l); ok && !p.vteps.Contains(k, l.Node) {
		p.vteps.Add(k, l.Node)
	}
	if quickInvalid(l) != "" {
		return
	}
	for _, s := range l.subnets() {
		if s.Bits() != p.in.Config.SubnetLenOf(s) {
			p.odd[l.Node] = true
		}
		p.claim.Add(netipx.PrefixKeyOf(s), l.Node)
	}
}

func (p *Planner) dropClaim(l subnetLease) {
	if k := l.WGPublicKey; k != "" {
		if c := slices.DeleteFunc(p.wgKeys[k], func(n string) bool { return n == l.Node }); len(c) == 0 {
			delete(p.wgKeys, k)
		} else {
			p.wgKeys[k] = c
		}
	}
	if k, ok := p.vtepOf(l); ok {
		p.vteps.Remove(k, l.Node)
	}
	delete(p.odd, l.Node)
	for _, s := range l.subnets() {
		p.claim.Remove(netipx.PrefixKeyOf(s), l.Node)
	}
}

// vtepOf is l's VTEP MAC when the plan has a VXLAN device (else no peer is in mode VXLAN,
// and the planner keeps no index of them).
func (p *Planner) vtepOf(l subnetLease) (vtep, bool) {
	if p.base.VXLAN == nil {
		return vtep{}, false
	}
	return vtepOf(l.Lease)
}

// selfOwns reports whether s is one of this node's own subnets.
func (p *Planner) selfOwns(s netip.Prefix) bool {
	self := enabled(p.in.Config, &p.in.Self)
	return s.IsValid() && (s == self.Subnet || s == self.Subnet6)
}

// owners builds the owner map decide() needs for the given subnets, as Build would.
func (p *Planner) owners(subnets map[netip.Prefix]bool) map[netip.Prefix]string {
	o := make(map[netip.Prefix]string, len(subnets)+2)
	for _, s := range enabled(p.in.Config, &p.in.Self).subnets() {
		o[s] = p.in.Self.Node
	}
	for s := range subnets {
		if p.selfOwns(s) {
			continue
		}
		p.claim.Each(netipx.PrefixKeyOf(s), func(n string) bool {
			if cur, ok := o[s]; !ok || n < cur {
				o[s] = n
			}
			return true
		})
	}
	return o
}

// Update applies changed leases (a lease naming only a node, lease.Gone, removes it) and
// returns the next plan: the header of a full plan (device, NAT, MTU) and the Delta from
// the previous one. The planner keeps the leases (see Input.Peers).
func (p *Planner) Update(changed []*lease.Lease) Plan {
	ch := p.update(changed)
	d := &Delta{From: p.gen}
	p.gen = gens.Add(1)
	each(ch.Routes, func(dst netip.Prefix) {
		r, _, ok := p.routeTo(dst)
		d.Routes = append(d.Routes, RouteChange{Dst: dst, Route: r, Del: !ok})
	})
	// Of the routes touched with one address, at most one is a VXLAN route now: its
	// neighbour entry is the address's, else the entry goes.
	at := make(map[netip.Addr]int, len(ch.Neighs))
	for _, dst := range ch.Neighs {
		ip := dst.Addr()
		i, seen := at[ip]
		if !seen {
			i, at[ip] = len(d.Neighs), len(d.Neighs)
			d.Neighs = append(d.Neighs, NeighChange{IP: ip, Del: true})
		}
		if _, mac, ok := p.routeTo(dst); ok && mac != "" {
			d.Neighs[i] = NeighChange{IP: ip, Neigh: Neigh{IP: ip, MAC: mac}}
		}
	}
	each(ch.FDB, func(f FDB) { d.FDB = append(d.FDB, FDBChange{FDB: f, Del: !p.fdbWanted(f)}) })
	each(ch.WG, func(n string) {
		w, ok := p.wgPeer(n)
		d.WGPeers = append(d.WGPeers, WGPeerChange{Node: n, Peer: w, Del: !ok})
	})
	each(ch.Nodes, func(n string) {
		// The allow-list entry follows from the verdict (not kept twice: with thousands of
		// peers the planner is the agent's biggest structure).
		v, ok := p.Peer(n)
		if ok {
			d.Peers = append(d.Peers, v)
		}
		a, allow := allowed(v, vxlan6(p.in.Self))
		d.Allow = append(d.Allow, AllowChange{Node: n, Allowed: a, Del: !ok || !allow})
	})
	out := p.header()
	out.Delta = d
	return out
}

// fdbWanted reports whether FDB entry f is desired: a VXLAN peer publishing its MAC has it
// (one at most: see vtepShared).
func (p *Planner) fdbWanted(f FDB) bool {
	k, _ := vtepOf(&lease.Lease{VTEPMAC: f.MAC})
	wanted := false
	p.vteps.Each(k, func(n string) bool {
		c, ok := p.contribution(p.peers[n])
		wanted = ok && c.vxlan && c.fdb == f
		return !wanted
	})
	return wanted
}

// each calls f once for every distinct key, in order.
func each[K comparable](keys []K, f func(K)) {
	seen := make(map[K]bool, len(keys))
	for _, k := range keys {
		if !seen[k] {
			seen[k] = true
			f(k)
		}
	}
}

// header is the current plan without its per-peer lists.
func (p *Planner) header() Plan {
	out := p.base
	out.Gen = p.gen
	out.Allow.Peers = nil
	keepVXLAN(&out, p.in, p.senders > 0)
	if out.VXLAN != nil {
		v := *out.VXLAN
		out.VXLAN = &v
	}
	if out.WireGuard != nil {
		w := *out.WireGuard
		out.WireGuard = &w
	}
	out.WGPeers = nil
	return out
}

// update applies changed leases and returns the keys of the entries it touched.
func (p *Planner) update(changed []*lease.Lease) Changes {
	var ch Changes
	// Every node that claims a subnet touched by the change may win or lose it.
	subnets := map[netip.Prefix]bool{}
	keys := map[string]bool{} // WireGuard keys gained or lost: their other holders' verdicts change
	macs := map[vtep]bool{}   // VTEP MACs gained or lost, likewise
	// The leases and verdicts the current entries of changed nodes follow from (removal
	// needs them).
	planned := map[string]plannedLease{}
	for _, changedLease := range changed {
		if changedLease.Node == p.in.Self.Node {
			continue
		}
		l := enabled(p.in.Config, changedLease)
		keys[l.WGPublicKey] = true
		if k, ok := p.vtepOf(l); ok {
			macs[k] = true
		}
		if _, ok := planned[l.Node]; !ok {
			old, had := p.peers[l.Node]
			planned[l.Node] = plannedLease{old, had}
		}
		if old, ok := p.peers[l.Node]; ok {
			keys[old.WGPublicKey] = true
			if k, ok := p.vtepOf(old.subnetLease); ok {
				macs[k] = true
			}
			for _, s := range old.subnets() {
				subnets[s] = true
			}
			p.dropClaim(old.subnetLease)
			delete(p.peers, l.Node)
			if sendsVXLAN(p.in.Self.Node, old.Lease) {
				p.senders--
			}
		}
		if !changedLease.Gone() {
			p.peers[l.Node] = peer{subnetLease: l} // decided below
			p.addClaim(l)
			if sendsVXLAN(p.in.Self.Node, l.Lease) {
				p.senders++
			}
			for _, s := range l.subnets() {
				subnets[s] = true
			}
		}
	}
	affected := map[string]bool{}
	for _, l := range changed {
		affected[l.Node] = true
	}
	// A lease of another subnet length may have gained or lost an overlap with any changed
	// subnet; they are rare (left from before a config change), so re-decide them all.
	if len(subnets) > 0 {
		for n := range p.odd {
			affected[n] = true
		}
	}
	for s := range subnets {
		p.claim.Each(netipx.PrefixKeyOf(s), func(n string) bool { affected[n] = true; return true })
	}
	if p.base.WireGuard != nil {
		for k := range keys {
			for _, n := range p.wgKeys[k] {
				affected[n] = true
			}
		}
	}
	for k := range macs {
		p.vteps.Each(k, func(n string) bool { affected[n] = true; return true })
	}
	owner := p.owners(subnets)
	// Odd-length subnets are checked against every owner (rare: leases from before a
	// config change); give decide the full picture for those.
	if len(p.odd) > 0 {
		all := make(map[netip.Prefix]bool, p.claim.Len())
		p.claim.Keys(func(s netipx.PrefixKey) bool { all[s.Prefix()] = true; return true })
		owner = p.owners(all)
	}
	// All removals before all additions: a subnet changing hands must end up with the new
	// owner's entries whatever order the nodes come in.
	for n := range affected {
		e, ok := p.peers[n]
		if was, changed := planned[n]; changed {
			e, ok = was.e, was.ok
		}
		if ok {
			p.modes[e.mode]--
			p.touch(e, &ch)
		}
	}
	for n := range affected {
		if n == p.in.Self.Node {
			continue
		}
		ch.Nodes = append(ch.Nodes, n)
		e, ok := p.peers[n]
		if !ok {
			continue
		}
		if quickInvalid(e.subnetLease) == "" {
			for _, s := range e.subnets() {
				if _, known := owner[s]; !known {
					owner[s] = p.ownerOf(s)
				}
			}
		}
		e.mode, e.reason = decide(p.in, e.subnetLease, owner)
		switch e.mode {
		case WireGuard:
			e.mode, e.reason = wgShared(e.Lease, p.wgKeys[e.WGPublicKey])
		case VXLAN:
			e.mode, e.reason = vtepShared(e.Lease, p.vteps)
		}
		p.peers[n] = e
		p.modes[e.mode]++
		p.touch(e, &ch)
	}
	return ch
}

// Count returns how many peers are in each mode.
func (p *Planner) Count() map[Mode]int {
	out := make(map[Mode]int, len(p.modes))
	for m, n := range p.modes {
		if n != 0 {
			out[m] = n
		}
	}
	return out
}

// PodMTU is the plan's pod MTU.
func (p *Planner) PodMTU() int { return p.podMTU }

// Peer returns the verdict on a node.
func (p *Planner) Peer(node string) (Peer, bool) {
	e, ok := p.peers[node]
	if !ok {
		return Peer{}, false
	}
	v := peerOf(p.in.Underlay, e.subnetLease)
	v.Mode, v.Reason = e.mode, e.reason
	return v, true
}

// Lease is the lease node's peer entry was planned from (subnets of families the config
// has off dropped; shared, never to be changed); false: no peer of that name (this node is
// none).
func (p *Planner) Lease(node string) (*lease.Lease, bool) {
	if p == nil {
		return nil, false
	}
	l, ok := p.peers[node]
	return l.Lease, ok
}

// Leases yields the lease of every peer the plan was built from, as Lease returns it. The
// caller must not change the Planner while ranging.
func (p *Planner) Leases() iter.Seq[*lease.Lease] {
	return func(yield func(*lease.Lease) bool) {
		if p == nil {
			return
		}
		for _, e := range p.peers {
			if !yield(e.Lease) {
				return
			}
		}
	}
}

func (p *Planner) ownerOf(s netip.Prefix) string {
	if p.selfOwns(s) {
		return p.in.Self.Node
	}
	best := ""
	p.claim.Each(netipx.PrefixKeyOf(s), func(n string) bool {
		if best == "" || n < best {
			best = n
		}
		return true
	})
	return best
}

// plannedLease is a node's lease and verdict as the desired state has them (ok false:
// none).
type plannedLease struct {
	e  peer
	ok bool
}

// contribution is the keys of what e puts into the desired state; false: nothing.
func (p *Planner) contribution(e peer) (contribution, bool) {
	switch {
	case e.mode == WireGuard:
		return contribution{dst: [2]netip.Prefix{e.Subnet, e.Subnet6}, wg: true}, true
	case e.mode != Direct && e.mode != VXLAN:
		return contribution{}, false
	}
	c := contribution{dst: [2]netip.Prefix{e.Subnet, e.Subnet6}, vxlan: e.mode == VXLAN}
	if c.vxlan {
		c.fdb = FDB{MAC: strings.ToLower(e.VTEPMAC), Dst: e.PublicIPOf(vxlan6(p.in.Self))}
	}
	return c, true
}

// touch adds the keys of e's contribution to ch, as e enters or leaves the desired state
// (as planned from its lease and verdict). The entries themselves follow from the peers,
// so nothing else changes.
func (p *Planner) touch(e peer, ch *Changes) {
	c, ok := p.contribution(e)
	if !ok {
		return
	}
	for _, dst := range c.dst {
		if !dst.IsValid() {
			continue
		}
		ch.Routes = append(ch.Routes, dst)
		if c.vxlan {
			ch.Neighs = append(ch.Neighs, dst)
		}
	}
	if c.wg {
		ch.WG = append(ch.WG, e.Node)
	}
	if c.vxlan {
		ch.FDB = append(ch.FDB, c.fdb)
	}
}

// routeTo is the desired route to dst and, for a VXLAN route, its neighbour entry's MAC
// (the neighbour's address is dst's address); false: none. It is the route of dst's owner
// (as decide picks it) when that node is routed: no other claimant of dst is. (This node
// owns its own subnets, and is no peer.)
func (p *Planner) routeTo(dst netip.Prefix) (Route, string, bool) {
	e, ok := p.peers[p.ownerOf(dst)]
	if !ok || (e.Subnet != dst && e.Subnet6 != dst) {
		return Route{}, "", false
	}
	return p.routeOf(e, dst)
}

// routeOf is the route to e's subnet s by e's verdict, and the MAC of its neighbour entry
// (VXLAN); false: e is not routed.
func (p *Planner) routeOf(e peer, s netip.Prefix) (Route, string, bool) {
	switch e.mode {
	case Direct:
		return Route{Dst: s, Gw: nextHop(p.in, e.subnetLease, s.Addr().Is6()), Dev: p.in.Underlay.Dev}, "", true
	case VXLAN:
		r := Route{Dst: s, Gw: s.Addr(), Dev: p.in.VXLANDev, OnLink: true}
		if p.in.Config.Backend.Type == config.Hybrid && p.podMTU > p.tunnelMTU {
			r.MTU = p.tunnelMTU
		}
		return r, strings.ToLower(e.VTEPMAC), true
	case WireGuard:
		return wgRoute(p.in, wgPeer(p.in, e.subnetLease), s), "", true
	}
	return Route{}, "", false
}

// wgPeer is node's WireGuard peer; false: it is not one.
func (p *Planner) wgPeer(node string) (WGPeer, bool) {
	e, ok := p.peers[node]
	if !ok || e.mode != WireGuard {
		return WGPeer{}, false
	}
	return wgPeer(p.in, e.subnetLease), true
}

// Plan renders the current desired state as a full Plan (for status and full passes).
func (p *Planner) Plan() Plan {
	out := p.header()
	out.Allow.Peers = make(map[string]Allowed, len(p.peers))
	for n, e := range p.peers {
		v, _ := p.Peer(n)
		out.Peers = append(out.Peers, v)
		if a, ok := allowed(v, vxlan6(p.in.Self)); ok {
			out.Allow.Peers[n] = a
		}
		for _, s := range e.subnets() {
			if r, mac, ok := p.routeOf(e, s); ok {
				out.Routes = append(out.Routes, r)
				if mac != "" {
					out.Neighs = append(out.Neighs, Neigh{IP: s.Addr(), MAC: mac})
				}
			}
		}
		if w, ok := p.wgPeer(n); ok {
			out.WGPeers = append(out.WGPeers, w)
		}
		if c, ok := p.contribution(e); ok && c.vxlan {
			out.FDB = append(out.FDB, c.fdb)
		}
	}
	return out
}

// Clone returns a deep copy of p without its Delta.
func Clone(p Plan) Plan {
	p.Routes, p.Neighs, p.FDB, p.Peers = slices.Clone(p.Routes), slices.Clone(p.Neighs), slices.Clone(p.FDB), slices.Clone(p.Peers)
	p.Allow.Peers = maps.Clone(p.Allow.Peers)
	if p.VXLAN != nil {
		v := *p.VXLAN
		p.VXLAN = &v
	}
	p.WGPeers = slices.Clone(p.WGPeers)
	if p.WireGuard != nil {
		w := *p.WireGuard
		p.WireGuard = &w
	}
	p.Delta = nil
	return p
}

// Follow returns the full plan that next, a plan with a Delta, stands for: the entries of
// prev (the full plan the delta follows) with the delta applied, under next's header.
func Follow(prev, next Plan) Plan {
	d := next.Delta
	routes := follow(prev.Routes, func(r Route) netip.Prefix { return r.Dst }, d.Routes,
		func(c RouteChange) (netip.Prefix, Route, bool) { return c.Dst, c.Route, c.Del })
	neighs := follow(prev.Neighs, func(n Neigh) netip.Addr { return n.IP }, d.Neighs,
		func(c NeighChange) (netip.Addr, Neigh, bool) { return c.IP, c.Neigh, c.Del })
	fdb := follow(prev.FDB, func(f FDB) FDB { return f }, d.FDB,
		func(c FDBChange) (FDB, FDB, bool) { return c.FDB, c.FDB, c.Del })
	wg := follow(prev.WGPeers, func(w WGPeer) string { return w.Node }, d.WGPeers,
		func(c WGPeerChange) (string, WGPeer, bool) { return c.Node, c.Peer, c.Del })
	peers := map[string]Peer{}
	for _, v := range prev.Peers {
		peers[v.Node] = v
	}
	allow := maps.Clone(prev.Allow.Peers)
	if allow == nil {
		allow = map[string]Allowed{}
	}
	for _, c := range d.Allow {
		delete(peers, c.Node) // gone unless its verdict is in d.Peers
		if c.Del {
			delete(allow, c.Node)
		} else {
			allow[c.Node] = c.Allowed
		}
	}
	for _, v := range d.Peers {
		peers[v.Node] = v
	}
	out := Clone(next)
	out.Routes = slices.Collect(maps.Values(routes))
	out.Neighs = slices.Collect(maps.Values(neighs))
	out.FDB = slices.Collect(maps.Values(fdb))
	out.WGPeers = slices.Collect(maps.Values(wg))
	out.Peers = slices.Collect(maps.Values(peers))
	out.Allow.Peers = allow
	return out
}

// follow returns prev's entries by key with changes applied (each sets its key's entry,
// or with del removes it).
func follow[K comparable, V, C any](prev []V, key func(V) K, changes []C, change func(C) (K, V, bool)) map[K]V {
	m := make(map[K]V, len(prev))
	for _, v := range prev {
		m[key(v)] = v
	}
	for _, c := range changes {
		if k, v, del := change(c); del {
			delete(m, k)
		} else {
			m[k] = v
		}
	}
	return m
}

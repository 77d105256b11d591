package agent

import (
	"context"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/plan"
)

// StoreStatus is the lease store's reachability as `netagent status` shows it.
type StoreStatus struct {
	State string    `json:"state"` // "connected" or "unreachable"
	Since time.Time `json:"since"`
	Error string    `json:"error,omitempty"`
}

const (
	storeConnected   = "connected"
	storeUnreachable = "unreachable"
)

// watchStore follows the store's health: status, the netagent_store_connected gauge and
// the log say whether it answers; a lost store opens the peers' grace (see grace) and a
// returning one wakes the lease re-claim at once. Warnings repeat at growing intervals
// (10 s doubling to 5 min) so a long outage is visible without flooding the log.
func (a *Agent) watchStore(ctx context.Context, log *slog.Logger, hw lease.HealthWatcher) {
	var down time.Time // zero while the store answers
	var nextWarn time.Time
	every := 10 * time.Second
	hw.WatchHealth(ctx, func(err error) {
		now := time.Now()
		if err == nil {
			a.opt.Metrics.StoreConnected.Set(1)
			if a.storeState().State == storeConnected {
				return
			}
			if !down.IsZero() {
				log.Info("store reachable again; re-claiming the lease if it was lost", "after", now.Sub(down).Round(time.Millisecond))
			}
			down = time.Time{}
			a.setStore(StoreStatus{State: storeConnected, Since: now})
			a.in.post(rStore)
			signal(a.reclaim)
			return
		}
		a.opt.Metrics.StoreConnected.Set(0)
		a.opt.Metrics.Errors.WithLabelValues("store").Inc()
		if down.IsZero() {
			down, nextWarn, every = now, now.Add(10*time.Second), 10*time.Second
			log.Warn("store unreachable; the dataplane stays as it is", "err", err)
			a.setStore(StoreStatus{State: storeUnreachable, Since: now, Error: err.Error()})
			a.in.post(rStore)
			return
		}
		a.setStore(StoreStatus{State: storeUnreachable, Since: down, Error: err.Error()})
		if now.After(nextWarn) {
			log.Warn("store still unreachable; the dataplane stays as it is", "for", now.Sub(down).Round(time.Second), "err", err)
			every = min(2*every, 5*time.Minute)
			nextWarn = now.Add(every)
		}
	})
}

func (a *Agent) setStore(s StoreStatus) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.status.Store = &s
}

// storeState is the store's last known state (State is "" before the first probe, and
// always for stores without a lease.HealthWatcher).
func (a *Agent) storeState() StoreStatus {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.status.Store == nil {
		return StoreStatus{}
	}
	return *a.status.Store
}

// grace keeps a peer in the dataplane when its lease vanishes during a store outage or
// in the window after it: when etcd was down for everyone, every agent lost its
// keepalive, and etcd restores the leases with a fresh TTL; a peer that re-claims a
// little late must not be torn out of every other node's routes, neighbour, FDB and
// allow-list entries in the meantime. The window lasts two lease TTLs from the store's
// return (the restored lease's TTL, then one more for the peer to re-claim); a peer
// still without a lease at its end is removed then. A held peer gives way at once to a
// live lease on its subnet. The loop owns it.
//
// The lease a vanished peer is held with is the one the current plan was built from: the
// planner's, read when the peer vanishes (no copy of every lease is kept for an outage
// that rarely comes).
type grace struct {
	open  bool            // an outage began and its window has not ended
	until time.Time       // the window's end; zero while the store is down
	held  map[string]bool // nodes kept without a live lease
}

func newGrace() *grace {
	return &grace{held: map[string]bool{}}
}

// outage opens the window until the store returns.
func (g *grace) outage() { g.open, g.until = true, time.Time{} }

// recovered starts the window's countdown; it reports whether one was open.
func (g *grace) recovered(now time.Time, window time.Duration) bool {
	if !g.open {
		return false
	}
	g.until = now.Add(window)
	return true
}

func (g *grace) active(now time.Time) bool {
	return g.open && (g.until.IsZero() || now.Before(g.until))
}

// full returns the peers of a full pass: live plus, in the window, those of the current
// plan (prev, nil: none yet) whose node and subnet no live lease has; newly held nodes are
// returned for the log.
func (g *grace) full(now time.Time, live []*lease.Lease, prev *plan.Planner) (peers []*lease.Lease, newlyHeld []string) {
	held := map[string]bool{}
	if g.active(now) {
		nodes := make(map[string]bool, len(live))
		subnets := make(map[netip.Prefix]bool, len(live))
		for _, l := range live {
			nodes[l.Node] = true
			for _, s := range l.Subnets() {
				subnets[s] = true
			}
		}
		for l := range prev.Leases() {
			if n := l.Node; !nodes[n] && !slices.ContainsFunc(l.Subnets(), func(s netip.Prefix) bool { return subnets[s] }) {
				live = append(live, l)
				held[n] = true
				if !g.held[n] {
					newlyHeld = append(newlyHeld, n)
				}
			}
		}
		slices.SortFunc(live, func(x, y *lease.Lease) int { return strings.Compare(x.Node, y.Node) })
		slices.Sort(newlyHeld)
	} else {
		g.open = false
	}
	g.held = held
	return live, newlyHeld
}

// incremental rewrites the changes of an incremental pass to the current plan (cur): in
// the window a vanished peer keeps the lease cur has for it (no change for the planner),
// and a held peer whose subnet a live lease now has is dropped.
func (g *grace) incremental(now time.Time, changed []*lease.Lease, cur *plan.Planner) (out []*lease.Lease, newlyHeld []string) {
	active := g.active(now)
	out = changed[:0:0]
	for _, l := range changed {
		if l.Gone() {
			if old, ok := cur.Lease(l.Node); ok && active {
				if !g.held[l.Node] {
					newlyHeld = append(newlyHeld, l.Node)
				}
				g.held[l.Node] = true
				out = append(out, old)
				continue
			}
			delete(g.held, l.Node)
			out = append(out, l)
			continue
		}
		delete(g.held, l.Node)
		for h := range g.held {
			if old, ok := cur.Lease(h); ok && sharesSubnet(old, l) {
				delete(g.held, h)
				out = append(out, &lease.Lease{Node: h})
			}
		}
		out = append(out, l)
	}
	return out, newlyHeld
}

// sharesSubnet reports whether a and b hold a subnet in common (either family).
func sharesSubnet(a, b *lease.Lease) bool {
	return a.Subnet.IsValid() && a.Subnet == b.Subnet || a.Subnet6.IsValid() && a.Subnet6 == b.Subnet6
}

func logHeld(log *slog.Logger, nodes []string, until time.Time) {
	for _, n := range nodes {
		if until.IsZero() {
			log.Warn("peer's lease vanished during a store outage; keeping its routes until the store is back and the peer has had time to re-claim", "peer", n)
		} else {
			log.Warn("peer's lease vanished after a store outage; keeping its routes for now", "peer", n, "until", until.Round(time.Second))
		}
	}
}

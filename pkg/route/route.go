// Package route makes the kernel's main routing table match the plan's routes, touching
// only routes that carry netagent's own route protocol number (visible as "proto 180" in
// `ip route`), so an operator can always tell which routes are ours and a restart adopts
// them without churn.
//
// Sync is level-triggered: it lists our routes, replaces the ones that differ from the
// plan, adds the missing ones, deletes the rest last, and keeps going past a failure.
//
// Scale: listing means a netlink dump of the whole table (the kernel does not filter by
// protocol), which with thousands of peers costs milliseconds. So the agent runs the
// reconciler with a mirror of our routes that the kernel's own route notifications keep
// current (Observe): a pass diffs the plan against the mirror, and only a notification
// that differs from the mirror (someone else changed or removed our route) triggers one.
// A periodic or post-overflow Invalidate makes the next pass dump again, so a lost
// notification costs one resync period at most.
package route

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/netipx"
	"github.com/netagent/netagent/pkg/plan"
)

// Protocol marks netagent's routes (rtnetlink protocol numbers above 4 belong to routing
// daemons; 180 is not used by any common one).
const Protocol netlink.RouteProtocol = 180

// Kernel is the part of a netlink handle the reconciler needs.
type Kernel interface {
	RouteListFiltered(family int, filter *netlink.Route, mask uint64) ([]netlink.Route, error)
	RouteReplace(*netlink.Route) error
	RouteDel(*netlink.Route) error
	LinkByName(string) (netlink.Link, error)
}

// Reconciler owns netagent's routes in one network namespace.
type Reconciler struct {
	k   Kernel
	log *slog.Logger

	mu        sync.Mutex
	mirror    map[netip.Prefix]netlink.Route // nil: not mirroring, or invalidated
	mirroring bool                           // Mirror was called
}

// New returns a reconciler working through k.
func New(k Kernel, log *slog.Logger) *Reconciler {
	return &Reconciler{k: k, log: log}
}

// Mirror makes Sync work against a mirror of our routes kept current by Observe, instead of
// dumping the table on every pass.
func (r *Reconciler) Mirror() {
	r.mu.Lock()
	r.mirroring = true
	r.mirror = nil
	r.mu.Unlock()
}

// Invalidate makes the next Sync dump the table again.
func (r *Reconciler) Invalidate() {
	r.mu.Lock()
	r.mirror = nil
	r.mu.Unlock()
}

// Observe applies a route notification to the mirror and reports whether it changed it
// (a notification that merely echoes our own write does not).
func (r *Reconciler) Observe(u netlink.RouteUpdate) bool {
	if u.Table != unix.RT_TABLE_MAIN && u.Table != 0 {
		return false
	}
	p, ok := netipx.Prefix(u.Dst)
	if !ok {
		return false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.mirror == nil {
		return r.mirroring && u.Protocol == Protocol
	}
	cur, have := r.mirror[p]
	switch {
	case u.Type == unix.RTM_DELROUTE:
		if have && sameRoute(cur, u.Route) {
			delete(r.mirror, p)
			return true
		}
	case u.Protocol == Protocol:
		if !have || !sameRoute(cur, u.Route) {
			r.mirror[p] = detach(u.Route)
			return true
		}
	case have:
		// Our destination now has someone else's route: ours was replaced.
		delete(r.mirror, p)
		return true
	}
	return false
}

func sameRoute(a, b netlink.Route) bool {
	return a.LinkIndex == b.LinkIndex && a.Gw.Equal(b.Gw) && a.MTU == b.MTU && a.Flags&int(netlink.FLAG_ONLINK) == b.Flags&int(netlink.FLAG_ONLINK)
}

// current returns our routes: the mirror when valid, else a fresh dump (which becomes
// the mirror when mirroring).
func (r *Reconciler) current() (map[netip.Prefix]netlink.Route, error) {
	r.mu.Lock()
	if r.mirror != nil {
		m := r.mirror
		r.mu.Unlock()
		return m, nil
	}
	r.mu.Unlock()
	cur, err := r.Current()
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	if r.mirroring {
		m := make(map[netip.Prefix]netlink.Route, len(cur))
		for k, v := range cur {
			m[k] = detach(v)
		}
		r.mirror = m
	}
	r.mu.Unlock()
	return cur, nil
}

// detach copies what the mirror needs of a route into fresh memory: a route parsed from a
// netlink message points into the message's buffer, and keeping thousands of them would
// keep every dump buffer alive.
func detach(rt netlink.Route) netlink.Route {
	out := netlink.Route{LinkIndex: rt.LinkIndex, MTU: rt.MTU, Flags: rt.Flags, Protocol: rt.Protocol, Table: rt.Table}
	if rt.Dst != nil {
		out.Dst = &net.IPNet{IP: append(net.IP(nil), rt.Dst.IP...), Mask: append(net.IPMask(nil), rt.Dst.Mask...)}
	}
	if rt.Gw != nil {
		out.Gw = append(net.IP(nil), rt.Gw...)
	}
	return out
}

// write performs a kernel change, recording its outcome in the mirror first so that the
// kernel's echo of our own change finds the mirror already right (and triggers nothing);
// if the change fails the mirror gets prev back. A route already gone counts as deleted.
func (r *Reconciler) write(dst netip.Prefix, next, prev *netlink.Route, do func() error) error {
	r.record(dst, next)
	err := do()
	if err != nil && next == nil && errors.Is(err, unix.ESRCH) {
		err = nil
	}
	if err != nil {
		r.record(dst, prev)
	}
	return err
}

func ptr(r netlink.Route, ok bool) *netlink.Route {
	if !ok {
		return nil
	}
	return &r
}

func (r *Reconciler) record(p netip.Prefix, rt *netlink.Route) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.mirror == nil {
		return
	}
	if rt == nil {
		delete(r.mirror, p)
	} else {
		r.mirror[p] = *rt
	}
}

// Stats counts what a Sync changed.
type Stats struct{ Added, Replaced, Deleted int }

// Changed reports whether Sync touched the kernel.
func (s Stats) Changed() bool { return s.Added+s.Replaced+s.Deleted > 0 }

// Current lists our routes, keyed by destination.
func (r *Reconciler) Current() (map[netip.Prefix]netlink.Route, error) {
	routes, err := r.k.RouteListFiltered(unix.AF_INET, &netlink.Route{Protocol: Protocol, Table: unix.RT_TABLE_MAIN},
		netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	out := make(map[netip.Prefix]netlink.Route, len(routes))
	for _, rt := range routes {
		if p, ok := netipx.Prefix(rt.Dst); ok {
			out[p] = rt
		}
	}
	return out, nil
}

// Sync makes our routes equal to want.
func (r *Reconciler) Sync(want []plan.Route) (Stats, error) {
	var st Stats
	cur, err := r.current()
	if err != nil {
		return st, err
	}
	// Work on a copy: the mirror may change under us (Observe runs concurrently).
	r.mu.Lock()
	snapshot := make(map[netip.Prefix]netlink.Route, len(cur))
	for k, v := range cur {
		snapshot[k] = v
	}
	r.mu.Unlock()
	cur = snapshot
	links := map[string]int{}
	var errs []error
	keep := make(map[netip.Prefix]bool, len(want))
	for _, w := range want {
		keep[w.Dst] = true
		idx, ok := links[w.Dev]
		if !ok {
			l, err := r.k.LinkByName(w.Dev)
			if err != nil {
				errs = append(errs, fmt.Errorf("route %s: device %s: %w", w.Dst, w.Dev, err))
				links[w.Dev] = -1
				continue
			}
			idx = l.Attrs().Index
			links[w.Dev] = idx
		}
		if idx < 0 {
			continue
		}
		nr := toNetlink(w, idx)
		c, had := cur[w.Dst]
		if had && same(c, nr) {
			continue
		}
		if err := r.write(w.Dst, nr, ptr(c, had), func() error { return r.k.RouteReplace(nr) }); err != nil {
			errs = append(errs, fmt.Errorf("replace route %s via %s dev %s: %w", w.Dst, w.Gw, w.Dev, err))
			continue
		}
		if had {
			st.Replaced++
		} else {
			st.Added++
		}
		r.log.Debug("route set", "dst", w.Dst, "via", w.Gw, "dev", w.Dev, "mtu", w.MTU)
	}
	for dst, c := range cur {
		if keep[dst] {
			continue
		}
		if err := r.write(dst, nil, &c, func() error { return r.k.RouteDel(&c) }); err != nil {
			errs = append(errs, fmt.Errorf("delete route %s: %w", dst, err))
			continue
		}
		st.Deleted++
		r.log.Debug("route deleted", "dst", dst)
	}
	return st, errors.Join(errs...)
}

func toNetlink(w plan.Route, idx int) *netlink.Route {
	nr := &netlink.Route{
		LinkIndex: idx,
		Dst:       &net.IPNet{IP: w.Dst.Addr().AsSlice(), Mask: net.CIDRMask(w.Dst.Bits(), 32)},
		Gw:        w.Gw.AsSlice(),
		Protocol:  Protocol,
		Table:     unix.RT_TABLE_MAIN,
		MTU:       w.MTU,
	}
	if w.OnLink {
		nr.Flags = int(netlink.FLAG_ONLINK)
	}
	return nr
}

// same compares what we control of a route.
func same(c netlink.Route, w *netlink.Route) bool { return sameRoute(c, *w) }

// ErrNoMirror means Apply needs a valid mirror; the caller runs a full Sync instead.
var ErrNoMirror = errors.New("route mirror not valid: full sync needed")

// Apply fixes only the routes to dsts, given the desired route for each (none: delete).
// It is the per-event path: it needs a valid mirror and touches nothing else.
func (r *Reconciler) Apply(dsts []netip.Prefix, want func(netip.Prefix) (plan.Route, bool)) (Stats, error) {
	var st Stats
	type op struct {
		dst  netip.Prefix
		want *netlink.Route
		cur  *netlink.Route
	}
	links := map[string]int{}
	var errs []error
	var ops []op
	r.mu.Lock()
	if r.mirror == nil {
		r.mu.Unlock()
		return st, ErrNoMirror
	}
	for _, dst := range dsts {
		w, ok := want(dst)
		c, have := r.mirror[dst]
		switch {
		case ok:
			idx, known := links[w.Dev]
			if !known {
				r.mu.Unlock()
				l, err := r.k.LinkByName(w.Dev)
				r.mu.Lock()
				idx = -1
				if err == nil {
					idx = l.Attrs().Index
				} else {
					errs = append(errs, fmt.Errorf("route %s: device %s: %w", dst, w.Dev, err))
				}
				links[w.Dev] = idx
				if r.mirror == nil {
					r.mu.Unlock()
					return st, ErrNoMirror
				}
				c, have = r.mirror[dst]
			}
			if idx < 0 {
				continue
			}
			nr := toNetlink(w, idx)
			if have && same(c, nr) {
				continue
			}
			o := op{dst: dst, want: nr}
			if have {
				o.cur = &c
			}
			ops = append(ops, o)
		case have:
			ops = append(ops, op{dst: dst, cur: &c})
		}
	}
	r.mu.Unlock()
	for _, o := range ops {
		if o.want != nil {
			if err := r.write(o.dst, o.want, o.cur, func() error { return r.k.RouteReplace(o.want) }); err != nil {
				errs = append(errs, fmt.Errorf("replace route %s: %w", o.dst, err))
				continue
			}
			if o.cur != nil {
				st.Replaced++
			} else {
				st.Added++
			}
			continue
		}
		if err := r.write(o.dst, nil, o.cur, func() error { return r.k.RouteDel(o.cur) }); err != nil {
			errs = append(errs, fmt.Errorf("delete route %s: %w", o.dst, err))
			continue
		}
		st.Deleted++
	}
	return st, errors.Join(errs...)
}

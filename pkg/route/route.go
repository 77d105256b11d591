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
	"maps"
	"net"
	"net/netip"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/netipx"
	"github.com/netagent/netagent/pkg/nldump"
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
	mirror    map[netip.Prefix]kroute // nil: not mirroring, or invalidated
	mirroring bool                    // Mirror was called
}

// kroute is what the mirror keeps of one of our routes: the fields that decide whether a
// route is right, and what deleting it takes. A whole netlink.Route is 376 bytes plus three small
// allocations, ~2 MB per 5,000 peers; this is 40 bytes and none.
type kroute struct {
	gw     netip.Addr
	link   int32
	mtu    int32
	onlink bool
}

func compact(rt netlink.Route) kroute {
	k := kroute{link: int32(rt.LinkIndex), mtu: int32(rt.MTU), onlink: rt.Flags&int(netlink.FLAG_ONLINK) != 0}
	if gw, ok := netip.AddrFromSlice(rt.Gw); ok {
		k.gw = gw.Unmap()
	}
	return k
}

// route is the netlink form of a mirrored route, for deleting it.
func (k kroute) route(dst netip.Prefix) *netlink.Route {
	return toNetlink(plan.Route{Dst: dst, Gw: k.gw, OnLink: k.onlink, MTU: int(k.mtu)}, int(k.link))
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
		if have && cur == compact(u.Route) {
			delete(r.mirror, p)
			return true
		}
	case u.Protocol == Protocol:
		if k := compact(u.Route); !have || cur != k {
			r.mirror[p] = k
			return true
		}
	case have:
		// Our destination now has someone else's route: ours was replaced.
		delete(r.mirror, p)
		return true
	}
	return false
}

// current returns our routes: the mirror when valid, else a fresh dump (which becomes
// the mirror when mirroring).
func (r *Reconciler) current() (map[netip.Prefix]kroute, error) {
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
	// The compact form also detaches from the dump: a parsed route points into its
	// message's buffer, and keeping thousands would keep every buffer alive.
	m := make(map[netip.Prefix]kroute, len(cur))
	for k, v := range cur {
		m[k] = compact(v)
	}
	r.mu.Lock()
	if r.mirroring {
		r.mirror = m
	}
	r.mu.Unlock()
	return m, nil
}

// write performs a kernel change, recording its outcome in the mirror first so that the
// kernel's echo of our own change finds the mirror already right (and triggers nothing);
// if the change fails the mirror gets prev back. A route already gone counts as deleted.
func (r *Reconciler) write(dst netip.Prefix, next, prev *kroute, do func() error) error {
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

func ptr(r kroute, ok bool) *kroute {
	if !ok {
		return nil
	}
	return &r
}

func (r *Reconciler) record(p netip.Prefix, rt *kroute) {
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
	routes, err := nldump.Retry(func() ([]netlink.Route, error) {
		return r.k.RouteListFiltered(unix.AF_INET, &netlink.Route{Protocol: Protocol, Table: unix.RT_TABLE_MAIN},
			netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	})
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
	cur = maps.Clone(cur)
	r.mu.Unlock()
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
		next := compact(*nr)
		if had && c == next {
			continue
		}
		if err := r.write(w.Dst, &next, ptr(c, had), func() error { return r.k.RouteReplace(nr) }); err != nil {
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
		if err := r.write(dst, nil, &c, func() error { return r.k.RouteDel(c.route(dst)) }); err != nil {
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

// ErrNoMirror means Apply needs a valid mirror; the caller runs a full Sync instead.
var ErrNoMirror = errors.New("route mirror not valid: full sync needed")

// Apply fixes only the routes a plan delta names (the per-event path): each is set to its
// new value or deleted. It needs a valid mirror and touches nothing else.
func (r *Reconciler) Apply(changes []plan.RouteChange) (Stats, error) {
	var st Stats
	type op struct {
		dst  netip.Prefix
		want *netlink.Route
		cur  *kroute
	}
	links := map[string]int{}
	var errs []error
	var ops []op
	r.mu.Lock()
	if r.mirror == nil {
		r.mu.Unlock()
		return st, ErrNoMirror
	}
	for _, ch := range changes {
		dst, w := ch.Dst, ch.Route
		c, have := r.mirror[dst]
		switch {
		case !ch.Del:
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
			if have && c == compact(*nr) {
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
			next := compact(*o.want)
			if err := r.write(o.dst, &next, o.cur, func() error { return r.k.RouteReplace(o.want) }); err != nil {
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
		if err := r.write(o.dst, nil, o.cur, func() error { return r.k.RouteDel(o.cur.route(o.dst)) }); err != nil {
			errs = append(errs, fmt.Errorf("delete route %s: %w", o.dst, err))
			continue
		}
		st.Deleted++
	}
	return st, errors.Join(errs...)
}

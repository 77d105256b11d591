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
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/mirror"
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

// Batch is a kernel that writes many routes per system call (pkg/nlbatch), each with its
// own outcome; a Kernel that has it gets a pass's writes through it.
type Batch interface {
	ReplaceRoutes(n int, route func(i int) *netlink.Route) []error
	DeleteRoutes(n int, route func(i int) *netlink.Route) []error
}

// Reconciler owns netagent's routes in one network namespace.
type Reconciler struct {
	k      Kernel
	log    *slog.Logger
	mirror mirror.Mirror[netipx.PrefixKey, kroute] // by destination
}

// kroute is what the mirror keeps of one of our routes: the fields that decide whether a
// route is right, and what deleting it takes. A whole netlink.Route is 376 bytes plus three small
// allocations, ~2 MB per 5,000 peers; this is 28 bytes and none, without pointers (as is
// its key).
type kroute struct {
	link   int32
	mtu    int32
	gw     netipx.AddrKey
	onlink bool
}

func compact(rt netlink.Route) kroute {
	k := kroute{link: int32(rt.LinkIndex), mtu: int32(rt.MTU), onlink: rt.Flags&int(netlink.FLAG_ONLINK) != 0}
	if gw, ok := netip.AddrFromSlice(rt.Gw); ok {
		k.gw = netipx.AddrKeyOf(gw.Unmap())
	} else if v, ok := rt.Via.(*netlink.Via); ok && v != nil {
		if gw, ok := netip.AddrFromSlice(v.Addr); ok {
			k.gw = netipx.AddrKeyOf(gw.Unmap())
		}
	}
	return k
}

// route is the netlink form of a mirrored route, for deleting it.
func (k kroute) route(dst netip.Prefix) *netlink.Route {
	nr := toNetlink(plan.Route{Dst: dst, Gw: k.gw.Addr(), OnLink: k.onlink, MTU: int(k.mtu)}, int(k.link))
	// Any scope, as `ip route del`: a delete names the scope it matches, and ours may have
	// been re-added by someone else with another (a scope-link route would survive).
	nr.Scope = netlink.SCOPE_NOWHERE
	return nr
}

// New returns a reconciler working through k.
func New(k Kernel, log *slog.Logger) *Reconciler {
	return &Reconciler{k: k, log: log}
}

// Mirror makes Sync work against a mirror of our routes kept current by Observe, instead of
// dumping the table on every pass.
func (r *Reconciler) Mirror() { r.mirror.Enable() }

// Invalidate makes the next Sync dump the table again.
func (r *Reconciler) Invalidate() { r.mirror.Invalidate() }

// Observe applies a route notification to the mirror and reports whether it changed it
// (a notification that merely echoes our own write does not).
func (r *Reconciler) Observe(u netlink.RouteUpdate) bool {
	if u.Table != unix.RT_TABLE_MAIN && u.Table != 0 {
		return false
	}
	dst, ok := netipx.Prefix(u.Dst)
	if !ok {
		return false
	}
	p := netipx.PrefixKeyOf(dst)
	changed, valid := r.mirror.Observe(func(m map[netipx.PrefixKey]kroute) bool {
		cur, have := m[p]
		switch {
		case u.Type == unix.RTM_DELROUTE:
			if have && cur == compact(u.Route) {
				delete(m, p)
				return true
			}
		case u.Protocol == Protocol:
			if k := compact(u.Route); !have || cur != k {
				m[p] = k
				return true
			}
		case have:
			// Our destination now has someone else's route: ours was replaced.
			delete(m, p)
			return true
		}
		return false
	})
	if !valid {
		return r.mirror.Enabled() && u.Protocol == Protocol
	}
	return changed
}

// current returns a copy of our routes: the mirror when valid, else a fresh dump (which
// becomes the mirror when mirroring).
func (r *Reconciler) current() (map[netipx.PrefixKey]kroute, error) {
	if m, ok := r.mirror.Snapshot(); ok {
		return m, nil
	}
	cur, err := r.Current()
	if err != nil {
		return nil, err
	}
	// The compact form also detaches from the dump: a parsed route points into its
	// message's buffer, and keeping thousands would keep every buffer alive.
	m := make(map[netipx.PrefixKey]kroute, len(cur))
	for k, v := range cur {
		m[netipx.PrefixKeyOf(k)] = compact(v)
	}
	r.mirror.Load(m)
	return m, nil
}

// op is one route write: plan.Dst set to next over device link, or deleted (del), from
// cur (had: present). It keeps values, not netlink.Routes: a cold pass holds thousands
// until its batch is written, and each message is built as it is sent.
type op struct {
	plan      plan.Route // for a deletion, only Dst
	link      int
	del       bool
	next, cur kroute
	had       bool
}

func (o *op) route() *netlink.Route {
	if o.del {
		return o.cur.route(o.plan.Dst)
	}
	return toNetlink(o.plan, o.link)
}

// write performs ops through the mirror, in one batch when the kernel can (a route already
// gone counts as deleted), and returns each one's outcome.
func (r *Reconciler) write(ops []op) []error {
	chs := make([]mirror.Change[netipx.PrefixKey, kroute], len(ops))
	for i := range ops {
		o := &ops[i]
		chs[i].Key = netipx.PrefixKeyOf(o.plan.Dst)
		if o.had {
			chs[i].Prev = &o.cur
		}
		if !o.del {
			chs[i].Next = &o.next
		}
	}
	return r.mirror.WriteAll(chs, unix.ESRCH, func() []error {
		errs := make([]error, len(ops))
		for _, del := range []bool{false, true} { // deletions last
			var idx []int
			for i := range ops {
				if ops[i].del == del {
					idx = append(idx, i)
				}
			}
			for j, err := range r.send(len(idx), func(j int) *netlink.Route { return ops[idx[j]].route() }, del) {
				errs[idx[j]] = err
			}
		}
		return errs
	})
}

// send writes n routes (deletes them, del), batched when the kernel can.
func (r *Reconciler) send(n int, route func(i int) *netlink.Route, del bool) []error {
	if b, ok := r.k.(Batch); ok && n > 0 {
		if del {
			return b.DeleteRoutes(n, route)
		}
		return b.ReplaceRoutes(n, route)
	}
	errs := make([]error, n)
	for i := range n {
		if del {
			errs[i] = r.k.RouteDel(route(i))
		} else {
			errs[i] = r.k.RouteReplace(route(i))
		}
	}
	return errs
}

// Stats counts what a Sync changed.
type Stats struct{ Added, Replaced, Deleted int }

// Changed reports whether Sync touched the kernel.
func (s Stats) Changed() bool { return s.Added+s.Replaced+s.Deleted > 0 }

// Current lists our routes, keyed by destination.
func (r *Reconciler) Current() (map[netip.Prefix]netlink.Route, error) {
	out := map[netip.Prefix]netlink.Route{}
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		routes, err := nldump.Retry(func() ([]netlink.Route, error) {
			return r.k.RouteListFiltered(family, &netlink.Route{Protocol: Protocol, Table: unix.RT_TABLE_MAIN},
				netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
		})
		if err != nil {
			return nil, fmt.Errorf("list routes: %w", err)
		}
		for _, rt := range routes {
			if p, ok := netipx.Prefix(rt.Dst); ok {
				out[p] = rt
			}
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
	links := map[string]int{}
	var errs []error
	var ops []op
	keep := make(map[netipx.PrefixKey]bool, len(want))
	for _, w := range want {
		keep[netipx.PrefixKeyOf(w.Dst)] = true
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
		next := compact(*toNetlink(w, idx))
		c, had := cur[netipx.PrefixKeyOf(w.Dst)]
		if had && c == next {
			continue
		}
		ops = append(ops, op{plan: w, link: idx, next: next, cur: c, had: had})
	}
	for k, c := range cur {
		if !keep[k] {
			ops = append(ops, op{plan: plan.Route{Dst: k.Prefix()}, del: true, cur: c, had: true})
		}
	}
	st.count(r, ops, r.write(ops), &errs)
	return st, errors.Join(errs...)
}

// count adds what ops did (outs: each one's outcome) to st and their failures to errs.
func (st *Stats) count(r *Reconciler, ops []op, outs []error, errs *[]error) {
	for i, o := range ops {
		switch err := outs[i]; {
		case err != nil && !o.del:
			*errs = append(*errs, fmt.Errorf("replace route %s via %s dev %s: %w", o.plan.Dst, o.plan.Gw, o.plan.Dev, err))
		case err != nil:
			*errs = append(*errs, fmt.Errorf("delete route %s: %w", o.plan.Dst, err))
		case o.del:
			st.Deleted++
			r.log.Debug("route deleted", "dst", o.plan.Dst)
		case o.had:
			st.Replaced++
			r.log.Debug("route replaced", "dst", o.plan.Dst, "via", o.plan.Gw, "dev", o.plan.Dev, "mtu", o.plan.MTU)
		default:
			st.Added++
			r.log.Debug("route added", "dst", o.plan.Dst, "via", o.plan.Gw, "dev", o.plan.Dev, "mtu", o.plan.MTU)
		}
	}
}

func toNetlink(w plan.Route, idx int) *netlink.Route {
	nr := &netlink.Route{
		LinkIndex: idx,
		Dst:       netipx.IPNet(w.Dst),
		Gw:        w.Gw.AsSlice(),
		Protocol:  Protocol,
		Table:     unix.RT_TABLE_MAIN,
		MTU:       w.MTU,
	}
	if w.Gw.IsValid() && w.Gw.Is4() != w.Dst.Addr().Is4() {
		// A next hop of the other family (an IPv6 pod subnet via a peer's IPv4 underlay
		// address): RTA_VIA, Linux 5.2+.
		family := unix.AF_INET
		if w.Gw.Is6() {
			family = unix.AF_INET6
		}
		nr.Gw, nr.Via = nil, &netlink.Via{AddrFamily: family, Addr: w.Gw.AsSlice()}
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
	if !r.mirror.Valid() {
		return st, ErrNoMirror
	}
	var errs []error
	links := map[string]int{}
	for _, ch := range changes {
		if dev := ch.Route.Dev; !ch.Del {
			if _, known := links[dev]; known {
				continue
			}
			links[dev] = -1
			if l, err := r.k.LinkByName(dev); err == nil {
				links[dev] = l.Attrs().Index
			} else {
				errs = append(errs, fmt.Errorf("route %s: device %s: %w", ch.Dst, dev, err))
			}
		}
	}
	var ops []op
	if !r.mirror.Read(func(m map[netipx.PrefixKey]kroute) {
		for _, ch := range changes {
			c, have := m[netipx.PrefixKeyOf(ch.Dst)]
			switch {
			case !ch.Del:
				idx := links[ch.Route.Dev]
				if idx < 0 {
					continue
				}
				w := ch.Route
				w.Dst = ch.Dst
				next := compact(*toNetlink(w, idx))
				if have && c == next {
					continue
				}
				ops = append(ops, op{plan: w, link: idx, next: next, cur: c, had: have})
			case have:
				ops = append(ops, op{plan: plan.Route{Dst: ch.Dst}, del: true, cur: c, had: true})
			}
		}
	}) {
		return st, ErrNoMirror
	}
	st.count(r, ops, r.write(ops), &errs)
	return st, errors.Join(errs...)
}

// Package vxlan makes the node's VXLAN device, its FDB and its neighbour entries match the
// plan. The device is netagent's alone (nothing else is on it), so every FDB and neighbour
// entry on it that the plan does not name is removed.
//
// The device runs without learning: each peer gets a permanent neighbour entry (its VTEP
// address -> its VTEP MAC) and a permanent FDB entry (its VTEP MAC -> its underlay IP), so
// the first packet to a new peer needs no ARP or flooding, and the route via the peer's
// VTEP address (onlink) is added by the route reconciler after these exist.
//
// The device's MAC comes from the plan (derived from the node name), so a re-created device
// has the same MAC and peers' entries stay right.
//
// The device is named after its VNI (DevName). A device of netagent's naming that the plan
// does not want (the VNI changed, or the backend became host-gw) is removed by Prune, which
// the agent runs after the routes moved off it, so no peer is ever without a route.
package vxlan

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/nldump"
	"github.com/netagent/netagent/pkg/plan"
)

// Kernel is the part of a netlink handle the reconciler needs.
type Kernel interface {
	LinkByName(string) (netlink.Link, error)
	LinkList() ([]netlink.Link, error)
	LinkAdd(netlink.Link) error
	LinkDel(netlink.Link) error
	LinkSetUp(netlink.Link) error
	LinkSetMTU(netlink.Link, int) error
	LinkSetHardwareAddr(netlink.Link, net.HardwareAddr) error
	AddrList(netlink.Link, int) ([]netlink.Addr, error)
	AddrAdd(netlink.Link, *netlink.Addr) error
	AddrDel(netlink.Link, *netlink.Addr) error
	NeighList(linkIndex, family int) ([]netlink.Neigh, error)
	NeighSet(*netlink.Neigh) error
	NeighDel(*netlink.Neigh) error
}

// Reconciler owns the VXLAN device in one network namespace.
//
// Like the route reconciler it can mirror its entries (Mirror, Observe, Invalidate) so
// that a pass with thousands of peers diffs against memory that the kernel's own
// neighbour notifications keep current, instead of dumping two tables every time.
type Reconciler struct {
	k   Kernel
	log *slog.Logger

	mu        sync.Mutex
	mirroring bool
	idx       int // device index the mirror belongs to; 0: invalid
	neigh     map[netip.Addr]entry
	fdb       map[fdbKey]entry

	// With deferDel, Sync and Apply queue their deletions here for Commit.
	deferDel bool
	pending  []deletion
}

// deletion is a neighbour or FDB entry to remove.
type deletion struct {
	idx  int // the device
	fdb  bool
	ip   netip.Addr // the neighbour's address (for an FDB entry: its destination)
	key  fdbKey
	prev entry
}

func (d deletion) do(r *Reconciler) error {
	if d.fdb {
		return r.writeFDB(d.key, nil, &d.prev, func() error { return r.k.NeighDel(delFDB(d.idx, d.key)) })
	}
	return r.writeNeigh(d.ip, nil, &d.prev, func() error { return r.k.NeighDel(delNeigh(d.idx, d.ip)) })
}

func (d deletion) err(err error) error {
	if d.fdb {
		return fmt.Errorf("delete fdb %s dst %s: %w", net.HardwareAddr(d.key.mac[:]), d.key.dst, err)
	}
	return fmt.Errorf("delete neighbour %s: %w", d.ip, err)
}

// DeferDeletes makes Sync and Apply leave their deletions to Commit, so that the caller
// can move routes off a peer's entries first: a route via a VXLAN peer whose neighbour or
// FDB entry is already gone drops what it carries (a peer moving to direct routing would
// lose packets for as long as the route change takes).
func (r *Reconciler) DeferDeletes() {
	r.mu.Lock()
	r.deferDel = true
	r.mu.Unlock()
}

// Commit removes the entries the last Sync or Apply deferred.
func (r *Reconciler) Commit() (Stats, error) {
	r.mu.Lock()
	pending := r.pending
	r.pending = nil
	r.mu.Unlock()
	var st Stats
	var errs []error
	for _, d := range pending {
		if err := d.do(r); err != nil {
			errs = append(errs, d.err(err))
			continue
		}
		st.count(d)
	}
	return st, errors.Join(errs...)
}

// remove removes d now, or queues it for Commit.
func (r *Reconciler) remove(d deletion, st *Stats) error {
	r.mu.Lock()
	if r.deferDel {
		r.pending = append(r.pending, d)
		r.mu.Unlock()
		return nil
	}
	r.mu.Unlock()
	if err := d.do(r); err != nil {
		return d.err(err)
	}
	st.count(d)
	return nil
}

// entry is what the mirror keeps of a neighbour or FDB entry: what the reconciler compares
// (a netlink.Neigh is 160 bytes plus two allocations, ~2 MB per 5,000 peers for both
// tables; this is 10 bytes). The rest of a kernel entry is implied by the table it is in.
type entry struct {
	state  uint16
	mac    [6]byte
	hasMAC bool
}

type fdbKey struct {
	mac [6]byte
	dst netip.Addr
}

func mac6(hw net.HardwareAddr) ([6]byte, bool) {
	var m [6]byte
	if len(hw) != 6 {
		return m, false
	}
	copy(m[:], hw)
	return m, true
}

func toEntry(n netlink.Neigh) entry {
	m, ok := mac6(n.HardwareAddr)
	return entry{state: uint16(n.State), mac: m, hasMAC: ok}
}

func (e entry) permanent() bool { return int(e.state)&netlink.NUD_PERMANENT != 0 }

// permanentWith reports whether e is a permanent entry with MAC m.
func (e entry) permanentWith(m [6]byte) bool { return e.permanent() && e.hasMAC && e.mac == m }

// planMAC parses a MAC the plan carries (the plan validated it; a bad one is the zero MAC,
// which no entry matches, so the entry is written and the kernel reports the error).
func planMAC(s string) [6]byte {
	hw, _ := net.ParseMAC(s)
	m, _ := mac6(hw)
	return m
}

// fdbKeyOf returns the mirror key of an FDB entry (false for a MAC that is not 6 bytes,
// which an Ethernet-type device cannot hold).
func fdbKeyOf(hw net.HardwareAddr, ip net.IP) (fdbKey, bool) {
	m, ok := mac6(hw)
	a, _ := netip.AddrFromSlice(ip)
	return fdbKey{m, a.Unmap()}, ok
}

// delNeigh and delFDB are the netlink forms of mirrored entries, for deleting them;
// setNeigh and setFDB those of the permanent entries the plan wants.
func delNeigh(idx int, ip netip.Addr) *netlink.Neigh {
	return &netlink.Neigh{LinkIndex: idx, Family: unix.AF_INET, IP: ip.AsSlice()}
}

func delFDB(idx int, k fdbKey) *netlink.Neigh {
	return &netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, IP: k.dst.AsSlice(), HardwareAddr: net.HardwareAddr(k.mac[:])}
}

func setNeigh(idx int, ip netip.Addr, m [6]byte) *netlink.Neigh {
	n := delNeigh(idx, ip)
	n.State, n.HardwareAddr = netlink.NUD_PERMANENT, net.HardwareAddr(m[:])
	return n
}

func setFDB(idx int, k fdbKey) *netlink.Neigh {
	n := delFDB(idx, k)
	n.State = netlink.NUD_PERMANENT
	return n
}

// Mirror turns mirroring on.
func (r *Reconciler) Mirror() {
	r.mu.Lock()
	r.mirroring, r.idx = true, 0
	r.mu.Unlock()
}

// Invalidate makes the next Sync dump the tables again.
func (r *Reconciler) Invalidate() {
	r.mu.Lock()
	r.idx = 0
	r.mu.Unlock()
}

// Device returns the index the mirror belongs to (0 when invalid).
func (r *Reconciler) Device() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.idx
}

// Observe applies a neighbour or FDB notification to the mirror and reports whether it
// changed it (echoes of our own writes do not).
func (r *Reconciler) Observe(u netlink.NeighUpdate) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.idx == 0 || u.LinkIndex != r.idx {
		return r.mirroring && r.idx == 0
	}
	ip, ok := netip.AddrFromSlice(u.IP)
	if !ok {
		return false
	}
	ip = ip.Unmap()
	del := u.Type == unix.RTM_DELNEIGH
	switch u.Family {
	case unix.AF_INET:
		cur, have := r.neigh[ip]
		if del {
			if have {
				delete(r.neigh, ip)
				return true
			}
			return false
		}
		e := toEntry(u.Neigh)
		if have && cur == e {
			return false
		}
		r.neigh[ip] = e
		return true
	case unix.AF_BRIDGE:
		k, ok := fdbKeyOf(u.HardwareAddr, u.IP)
		if !ok {
			return false
		}
		cur, have := r.fdb[k]
		if del {
			if have {
				delete(r.fdb, k)
				return true
			}
			return false
		}
		if have && int(cur.state) == u.State {
			return false
		}
		r.fdb[k] = toEntry(u.Neigh)
		return true
	}
	return false
}

// entries returns copies of the current neighbour and FDB entries of device idx, from the
// mirror when it is valid for idx, else from a dump.
func (r *Reconciler) entries(idx int) (map[netip.Addr]entry, map[fdbKey]entry, error) {
	r.mu.Lock()
	if r.mirroring && r.idx == idx {
		n, f := maps.Clone(r.neigh), maps.Clone(r.fdb)
		r.mu.Unlock()
		return n, f, nil
	}
	r.mu.Unlock()
	ns, err := nldump.Retry(func() ([]netlink.Neigh, error) { return r.k.NeighList(idx, unix.AF_INET) })
	if err != nil {
		return nil, nil, fmt.Errorf("list neighbours: %w", err)
	}
	fs, err := nldump.Retry(func() ([]netlink.Neigh, error) { return r.k.NeighList(idx, unix.AF_BRIDGE) })
	if err != nil {
		return nil, nil, fmt.Errorf("list fdb: %w", err)
	}
	// The compact entries also detach from the dumps (a parsed entry points into its
	// dump's buffer, which thousands of kept entries would keep alive).
	neigh := make(map[netip.Addr]entry, len(ns))
	for _, n := range ns {
		if ip, ok := netip.AddrFromSlice(n.IP); ok {
			neigh[ip.Unmap()] = toEntry(n)
		}
	}
	fdb := make(map[fdbKey]entry, len(fs))
	for _, f := range fs {
		if k, ok := fdbKeyOf(f.HardwareAddr, f.IP); ok {
			fdb[k] = toEntry(f)
		}
	}
	r.mu.Lock()
	if r.mirroring {
		r.idx = idx
		r.neigh, r.fdb = maps.Clone(neigh), maps.Clone(fdb)
	}
	r.mu.Unlock()
	return neigh, fdb, nil
}

// writeNeigh and writeFDB perform a kernel change, recording its outcome in the mirror
// first so the kernel's echo of our own change triggers nothing; on failure the mirror
// gets prev back. An entry already gone counts as deleted.
func (r *Reconciler) writeNeigh(ip netip.Addr, next, prev *entry, do func() error) error {
	r.recordNeigh(ip, next)
	err := do()
	if err != nil && next == nil && errors.Is(err, unix.ENOENT) {
		err = nil
	}
	if err != nil {
		r.recordNeigh(ip, prev)
	}
	return err
}

func (r *Reconciler) writeFDB(k fdbKey, next, prev *entry, do func() error) error {
	r.recordFDB(k, next)
	err := do()
	if err != nil && next == nil && errors.Is(err, unix.ENOENT) {
		err = nil
	}
	if err != nil {
		r.recordFDB(k, prev)
	}
	return err
}

func nptr(n entry, ok bool) *entry {
	if !ok {
		return nil
	}
	return &n
}

func (r *Reconciler) recordNeigh(ip netip.Addr, n *entry) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.idx == 0 {
		return
	}
	if n == nil {
		delete(r.neigh, ip)
	} else {
		r.neigh[ip] = *n
	}
}

func (r *Reconciler) recordFDB(k fdbKey, n *entry) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.idx == 0 {
		return
	}
	if n == nil {
		delete(r.fdb, k)
	} else {
		r.fdb[k] = *n
	}
}

// New returns a reconciler working through k.
func New(k Kernel, log *slog.Logger) *Reconciler { return &Reconciler{k: k, log: log} }

// Stats counts what a Sync changed.
type Stats struct {
	DeviceCreated bool
	// DeviceFixed counts attributes put back on an existing device (MAC, MTU, up).
	DeviceFixed int
	// Pruned counts devices removed because the plan does not name them (Prune).
	Pruned                             int
	NeighSet, NeighDel, FDBSet, FDBDel int
}

func (s *Stats) count(d deletion) {
	if d.fdb {
		s.FDBDel++
	} else {
		s.NeighDel++
	}
}

// Add adds o's counts to s.
func (s *Stats) Add(o Stats) {
	s.DeviceCreated = s.DeviceCreated || o.DeviceCreated
	s.DeviceFixed += o.DeviceFixed
	s.Pruned += o.Pruned
	s.NeighSet += o.NeighSet
	s.NeighDel += o.NeighDel
	s.FDBSet += o.FDBSet
	s.FDBDel += o.FDBDel
}

// Changed reports whether Sync touched the kernel.
func (s Stats) Changed() bool {
	return s.DeviceCreated || s.DeviceFixed+s.Pruned+s.NeighSet+s.NeighDel+s.FDBSet+s.FDBDel > 0
}

// DeviceChanges counts the devices' own changes (a creation, attributes fixed, removals).
func (s Stats) DeviceChanges() int {
	if s.DeviceCreated {
		return 1 + s.DeviceFixed + s.Pruned
	}
	return s.DeviceFixed + s.Pruned
}

// DevName is the VXLAN device's name for a VNI.
func DevName(vni int) string {
	if n := fmt.Sprintf("netagent.%d", vni); len(n) <= 15 {
		return n
	}
	return fmt.Sprintf("na.%d", vni)
}

// Ours reports whether l is a VXLAN device of netagent's naming.
func Ours(l netlink.Link) bool {
	_, ok := l.(*netlink.Vxlan)
	name := l.Attrs().Name
	return ok && (strings.HasPrefix(name, "netagent.") || strings.HasPrefix(name, "na."))
}

// Sync ensures the device dev on underlay device underlay, with mac, and exactly the given
// neighbour and FDB entries. dev nil (host-gw) ensures nothing: Prune removes devices.
func (r *Reconciler) Sync(dev *plan.VXLANDevice, underlay string, mac net.HardwareAddr, neighs []plan.Neigh, fdb []plan.FDB) (Stats, error) {
	var st Stats
	if dev == nil {
		return st, nil
	}
	link, created, err := r.ensureDevice(dev, underlay, mac, &st)
	if err != nil {
		return st, err
	}
	st.DeviceCreated = created
	var errs []error
	if err := r.ensureAddr(link, dev.Addr); err != nil {
		errs = append(errs, err)
	}
	// Neighbours and FDB before routes (the caller syncs routes after this).
	if err := r.syncEntries(link, neighs, fdb, &st); err != nil {
		errs = append(errs, err)
	}
	return st, errors.Join(errs...)
}

// Prune removes every VXLAN device of netagent's naming except keep ("": all of them),
// with the routes, neighbour and FDB entries on it, and returns the names removed. The
// agent calls it after the routes moved to the device in use (or to the underlay).
func (r *Reconciler) Prune(keep string) ([]string, error) {
	links, err := nldump.Retry(r.k.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	var gone []string
	var errs []error
	for _, l := range links {
		if name := l.Attrs().Name; Ours(l) && name != keep {
			if err := r.k.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
				errs = append(errs, fmt.Errorf("delete stale vxlan device %s: %w", name, err))
				continue
			}
			r.log.Info("vxlan device removed", "dev", name, "reason", "not in the plan")
			gone = append(gone, name)
		}
	}
	return gone, errors.Join(errs...)
}

func (r *Reconciler) ensureDevice(dev *plan.VXLANDevice, underlay string, mac net.HardwareAddr, st *Stats) (netlink.Link, bool, error) {
	ul, err := r.k.LinkByName(underlay)
	if err != nil {
		return nil, false, fmt.Errorf("underlay device %s: %w", underlay, err)
	}
	want := &netlink.Vxlan{
		LinkAttrs:    netlink.LinkAttrs{Name: dev.Name, MTU: dev.MTU, HardwareAddr: mac, TxQLen: -1},
		VxlanId:      dev.VNI,
		VtepDevIndex: ul.Attrs().Index,
		SrcAddr:      dev.Local.AsSlice(),
		Port:         dev.Port,
		Learning:     false,
	}
	created := false
	l, err := r.k.LinkByName(dev.Name)
	if err == nil {
		cur, ok := l.(*netlink.Vxlan)
		if !ok || cur.VxlanId != want.VxlanId || cur.Port != want.Port || !cur.SrcAddr.Equal(want.SrcAddr) ||
			cur.VtepDevIndex != want.VtepDevIndex || cur.Learning {
			// Immutable attributes differ: the device has to be re-created.
			r.log.Info("re-creating vxlan device", "dev", dev.Name, "reason", "parameters changed")
			if err := r.k.LinkDel(l); err != nil {
				return nil, false, fmt.Errorf("delete stale %s: %w", dev.Name, err)
			}
			l = nil
		}
	} else {
		l = nil
	}
	if l == nil {
		if err := r.k.LinkAdd(want); err != nil {
			return nil, false, fmt.Errorf("create vxlan device %s (vni %d, port %d, local %s): %w", dev.Name, dev.VNI, dev.Port, dev.Local, err)
		}
		created = true
		r.log.Info("vxlan device created", "dev", dev.Name, "vni", dev.VNI, "mac", mac.String())
		if l, err = r.k.LinkByName(dev.Name); err != nil {
			return nil, false, err
		}
	}
	a := l.Attrs()
	// A repair of an existing device is logged and counted like every other repair; the
	// attributes of a device just created are part of creating it.
	fixed := func(attr string, from, to any) {
		if !created {
			st.DeviceFixed++
			r.log.Info("vxlan device repaired", "dev", dev.Name, "attr", attr, "from", from, "to", to)
		}
	}
	if a.HardwareAddr.String() != mac.String() {
		if err := r.k.LinkSetHardwareAddr(l, mac); err != nil {
			return nil, created, fmt.Errorf("set %s mac: %w", dev.Name, err)
		}
		fixed("mac", a.HardwareAddr.String(), mac.String())
	}
	if a.MTU != dev.MTU {
		if err := r.k.LinkSetMTU(l, dev.MTU); err != nil {
			return nil, created, fmt.Errorf("set %s mtu %d: %w", dev.Name, dev.MTU, err)
		}
		fixed("mtu", a.MTU, dev.MTU)
	}
	if a.Flags&net.FlagUp == 0 {
		if err := r.k.LinkSetUp(l); err != nil {
			return nil, created, fmt.Errorf("set %s up: %w", dev.Name, err)
		}
		fixed("state", "down", "up")
	}
	return l, created, nil
}

func (r *Reconciler) ensureAddr(l netlink.Link, want netip.Prefix) error {
	addrs, err := nldump.Retry(func() ([]netlink.Addr, error) { return r.k.AddrList(l, unix.AF_INET) })
	if err != nil {
		return fmt.Errorf("list addresses of %s: %w", l.Attrs().Name, err)
	}
	found := false
	var errs []error
	for _, a := range addrs {
		ones, _ := a.Mask.Size()
		if ip, ok := netip.AddrFromSlice(a.IP); ok && netip.PrefixFrom(ip.Unmap(), ones) == want {
			found = true
			continue
		}
		if err := r.k.AddrDel(l, &a); err != nil {
			errs = append(errs, fmt.Errorf("remove stale %s from %s: %w", a.IPNet, l.Attrs().Name, err))
		}
	}
	if !found {
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: want.Addr().AsSlice(), Mask: net.CIDRMask(want.Bits(), 32)}}
		if err := r.k.AddrAdd(l, addr); err != nil && !errors.Is(err, unix.EEXIST) {
			errs = append(errs, fmt.Errorf("add %s to %s: %w", want, l.Attrs().Name, err))
		}
	}
	return errors.Join(errs...)
}

func (r *Reconciler) syncEntries(l netlink.Link, neighs []plan.Neigh, fdb []plan.FDB, st *Stats) error {
	idx := l.Attrs().Index
	r.mu.Lock()
	r.pending = nil // this pass decides afresh what goes
	r.mu.Unlock()
	have, haveFDB, err := r.entries(idx)
	if err != nil {
		return err
	}
	var errs []error
	keep := make(map[netip.Addr]bool, len(neighs))
	for _, w := range neighs {
		keep[w.IP] = true
		c, ok := have[w.IP]
		m := planMAC(w.MAC)
		if ok && c.permanentWith(m) {
			continue
		}
		n := setNeigh(idx, w.IP, m)
		next := toEntry(*n)
		if err := r.writeNeigh(w.IP, &next, nptr(c, ok), func() error { return r.k.NeighSet(n) }); err != nil {
			errs = append(errs, fmt.Errorf("set neighbour %s %s: %w", w.IP, w.MAC, err))
			continue
		}
		st.NeighSet++
	}
	for ip, c := range have {
		if !keep[ip] {
			if err := r.remove(deletion{idx: idx, ip: ip, prev: c}, st); err != nil {
				errs = append(errs, err)
			}
		}
	}
	keepFDB := make(map[fdbKey]bool, len(fdb))
	for _, w := range fdb {
		k := fdbKey{planMAC(w.MAC), w.Dst}
		keepFDB[k] = true
		c, ok := haveFDB[k]
		if ok && c.permanent() {
			continue
		}
		n := setFDB(idx, k)
		next := toEntry(*n)
		if err := r.writeFDB(k, &next, nptr(c, ok), func() error { return r.k.NeighSet(n) }); err != nil {
			errs = append(errs, fmt.Errorf("set fdb %s dst %s: %w", w.MAC, w.Dst, err))
			continue
		}
		st.FDBSet++
	}
	for k, c := range haveFDB {
		if !keepFDB[k] {
			if err := r.remove(deletion{idx: idx, fdb: true, ip: k.dst, key: k, prev: c}, st); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// ErrNoMirror means Apply needs a valid mirror; the caller runs a full Sync instead.
var ErrNoMirror = errors.New("vxlan mirror not valid: full sync needed")

// Apply fixes only the given neighbour and FDB entries (the per-event path): wantNeigh
// gives the desired entry for an address (none: delete), wantFDB whether an FDB entry is
// desired. It needs a valid mirror of the current device.
func (r *Reconciler) Apply(ips []netip.Addr, fdbs []plan.FDB, wantNeigh func(netip.Addr) (plan.Neigh, bool), wantFDB func(plan.FDB) bool) (Stats, error) {
	var st Stats
	r.mu.Lock()
	idx := r.idx
	if !r.mirroring || idx == 0 {
		r.mu.Unlock()
		return st, ErrNoMirror
	}
	type nop struct {
		ip   netip.Addr
		set  *netlink.Neigh
		next *entry // the mirror's form of set
		prev *entry
		fdb  bool
		fkey fdbKey
	}
	var ops []nop
	var dels []deletion
	for _, ip := range ips {
		w, ok := wantNeigh(ip)
		c, have := r.neigh[ip]
		switch {
		case ok:
			m := planMAC(w.MAC)
			if have && c.permanentWith(m) {
				continue
			}
			n := setNeigh(idx, ip, m)
			next := toEntry(*n)
			ops = append(ops, nop{ip: ip, prev: nptr(c, have), set: n, next: &next})
		case have:
			dels = append(dels, deletion{idx: idx, ip: ip, prev: c})
		}
	}
	for _, f := range fdbs {
		k := fdbKey{planMAC(f.MAC), f.Dst}
		c, have := r.fdb[k]
		if wantFDB(f) {
			if have && c.permanent() {
				continue
			}
			n := setFDB(idx, k)
			next := toEntry(*n)
			ops = append(ops, nop{ip: f.Dst, fdb: true, fkey: k, prev: nptr(c, have), set: n, next: &next})
		} else if have {
			dels = append(dels, deletion{idx: idx, fdb: true, ip: f.Dst, key: k, prev: c})
		}
	}
	r.mu.Unlock()
	var errs []error
	for _, o := range ops {
		do := func() error { return r.k.NeighSet(o.set) }
		var err error
		if o.fdb {
			err = r.writeFDB(o.fkey, o.next, o.prev, do)
		} else {
			err = r.writeNeigh(o.ip, o.next, o.prev, do)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("neighbour/fdb %s: %w", o.ip, err))
			continue
		}
		if o.fdb {
			st.FDBSet++
		} else {
			st.NeighSet++
		}
	}
	for _, d := range dels {
		if err := r.remove(d, &st); err != nil {
			errs = append(errs, err)
		}
	}
	return st, errors.Join(errs...)
}

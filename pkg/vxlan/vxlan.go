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
package vxlan

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/mirror"
	"github.com/netagent/netagent/pkg/netipx"
	"github.com/netagent/netagent/pkg/nldump"
	"github.com/netagent/netagent/pkg/plan"
)

// Kernel is the part of a netlink handle the reconciler needs.
type Kernel interface {
	LinkList() ([]netlink.Link, error)
	LinkByName(string) (netlink.Link, error)
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
	idx atomic.Int32 // the device the mirrors belong to; 0: none
	// none: the last Sync wanted no device (a host-gw or wireguard plan), so there is
	// nothing to mirror: no neighbour notification concerns us, and a delta without
	// neighbour or FDB changes applies.
	none  atomic.Bool
	neigh mirror.Mirror[netipx.AddrKey, entry] // by address
	fdb   mirror.Mirror[fdbKey, entry]

	// With deferDel set, Sync and Apply leave their deletions in pending for Commit.
	deferDel atomic.Bool
	mu       sync.Mutex
	pending  []deletion
}

// deletion is a neighbour or FDB entry to remove.
type deletion struct {
	idx  int // the device
	fdb  bool
	ip   netip.Addr // the neighbour's address (an FDB entry's destination)
	key  fdbKey
	prev entry
}

func (r *Reconciler) do(d deletion) error {
	var err error
	if d.fdb {
		err = r.writeFDB(d.key, nil, &d.prev, func() error { return r.k.NeighDel(delFDB(d.idx, d.key)) })
	} else {
		err = r.writeNeigh(d.ip, nil, &d.prev, func() error { return r.k.NeighDel(delNeigh(d.idx, d.ip)) })
	}
	switch {
	case err == nil:
		return nil
	case d.fdb:
		return fmt.Errorf("delete fdb %s dst %s: %w", net.HardwareAddr(d.key.mac[:]), d.key.dst.Addr(), err)
	}
	return fmt.Errorf("delete neighbour %s: %w", d.ip, err)
}

// DeferDeletes makes Sync and Apply leave their deletions to Commit, so the caller can
// move routes off a peer's entries first: a route via a VXLAN peer whose neighbour or FDB
// entry is already gone drops what it carries (a peer moving to direct routing would lose
// packets for as long as the route change takes).
func (r *Reconciler) DeferDeletes() { r.deferDel.Store(true) }

// Commit removes the entries the last Sync or Apply deferred.
func (r *Reconciler) Commit() (Stats, error) {
	r.mu.Lock()
	pending := r.pending
	r.pending = nil
	r.mu.Unlock()
	var st Stats
	var errs []error
	for _, d := range pending {
		if err := r.do(d); err != nil {
			errs = append(errs, err)
			continue
		}
		st.count(d)
	}
	return st, errors.Join(errs...)
}

// remove removes d now, or queues it for Commit.
func (r *Reconciler) remove(d deletion, st *Stats) error {
	if r.deferDel.Load() {
		r.mu.Lock()
		r.pending = append(r.pending, d)
		r.mu.Unlock()
		return nil
	}
	if err := r.do(d); err != nil {
		return err
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

// fdbKey is an FDB entry's MAC and destination (no pointers, as entry: the mirrors hold
// thousands).
type fdbKey struct {
	mac [6]byte
	dst netipx.AddrKey
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
	return fdbKey{m, netipx.AddrKeyOf(a.Unmap())}, ok
}

// delNeigh and delFDB are the netlink forms of mirrored entries, for deleting them;
// setNeigh and setFDB those of the permanent entries the plan wants.
func delNeigh(idx int, ip netip.Addr) *netlink.Neigh {
	family := unix.AF_INET
	if ip.Is6() {
		family = unix.AF_INET6
	}
	return &netlink.Neigh{LinkIndex: idx, Family: family, IP: ip.AsSlice()}
}

func delFDB(idx int, k fdbKey) *netlink.Neigh {
	return &netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, IP: k.dst.Addr().AsSlice(), HardwareAddr: net.HardwareAddr(k.mac[:])}
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
	r.idx.Store(0)
	r.none.Store(false)
	r.neigh.Enable()
	r.fdb.Enable()
}

// Invalidate makes the next Sync dump the tables again.
func (r *Reconciler) Invalidate() {
	r.idx.Store(0)
	r.neigh.Invalidate()
	r.fdb.Invalidate()
}

// Device returns the index the mirror belongs to (0 when invalid).
func (r *Reconciler) Device() int { return int(r.idx.Load()) }

// Observe applies a neighbour or FDB notification to the mirror and reports whether it
// changed it (echoes of our own writes do not).
func (r *Reconciler) Observe(u netlink.NeighUpdate) bool {
	idx := r.Device()
	if idx == 0 || u.LinkIndex != idx {
		// An invalid mirror may be missing this entry (a pass rebuilds it), unless no
		// device is wanted: then it is some other device's neighbour (a pod's, the
		// underlay's ARP), and every ARP exchange would cost a full pass.
		return idx == 0 && r.neigh.Enabled() && !r.none.Load()
	}
	ip, ok := netip.AddrFromSlice(u.IP)
	if !ok {
		return false
	}
	ip = ip.Unmap()
	if ip.IsMulticast() {
		return false // the kernel's own (IPv6 multicast, NOARP): not ours
	}
	del := u.Type == unix.RTM_DELNEIGH
	var changed bool
	switch u.Family {
	case unix.AF_INET, unix.AF_INET6:
		k := netipx.AddrKeyOf(ip)
		changed, _ = r.neigh.Observe(func(m map[netipx.AddrKey]entry) bool {
			cur, have := m[k]
			if del {
				delete(m, k)
				return have
			}
			e := toEntry(u.Neigh)
			if have && cur == e {
				return false
			}
			m[k] = e
			return true
		})
	case unix.AF_BRIDGE:
		k, ok := fdbKeyOf(u.HardwareAddr, u.IP)
		if !ok {
			return false
		}
		changed, _ = r.fdb.Observe(func(m map[fdbKey]entry) bool {
			cur, have := m[k]
			if del {
				delete(m, k)
				return have
			}
			if have && int(cur.state) == u.State {
				return false
			}
			m[k] = toEntry(u.Neigh)
			return true
		})
	}
	return changed
}

// entries returns copies of the current neighbour and FDB entries of device idx, from the
// mirrors when they are valid for idx, else from a dump.
func (r *Reconciler) entries(idx int) (map[netipx.AddrKey]entry, map[fdbKey]entry, error) {
	if r.Device() == idx {
		n, okN := r.neigh.Snapshot()
		f, okF := r.fdb.Snapshot()
		if okN && okF {
			return n, f, nil
		}
	}
	var ns []netlink.Neigh
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		part, err := nldump.Retry(func() ([]netlink.Neigh, error) { return r.k.NeighList(idx, family) })
		if err != nil {
			return nil, nil, fmt.Errorf("list neighbours: %w", err)
		}
		ns = append(ns, part...)
	}
	fs, err := nldump.Retry(func() ([]netlink.Neigh, error) { return r.k.NeighList(idx, unix.AF_BRIDGE) })
	if err != nil {
		return nil, nil, fmt.Errorf("list fdb: %w", err)
	}
	// The compact entries also detach from the dumps (a parsed entry points into its
	// dump's buffer, which thousands of kept entries would keep alive).
	neigh := make(map[netipx.AddrKey]entry, len(ns))
	for _, n := range ns {
		// Multicast entries are the kernel's (IPv6 multicast, NOARP): everything else on
		// our device is ours.
		if ip, ok := netip.AddrFromSlice(n.IP); ok && !ip.IsMulticast() {
			neigh[netipx.AddrKeyOf(ip.Unmap())] = toEntry(n)
		}
	}
	fdb := make(map[fdbKey]entry, len(fs))
	for _, f := range fs {
		if k, ok := fdbKeyOf(f.HardwareAddr, f.IP); ok {
			fdb[k] = toEntry(f)
		}
	}
	if r.neigh.Enabled() {
		r.neigh.Load(neigh)
		r.fdb.Load(fdb)
		r.idx.Store(int32(idx))
	}
	return neigh, fdb, nil
}

// writeNeigh and writeFDB perform a kernel change through the mirrors (an entry already
// gone counts as deleted).
func (r *Reconciler) writeNeigh(ip netip.Addr, next, prev *entry, do func() error) error {
	return r.neigh.Write(netipx.AddrKeyOf(ip), next, prev, unix.ENOENT, do)
}

func (r *Reconciler) writeFDB(k fdbKey, next, prev *entry, do func() error) error {
	return r.fdb.Write(k, next, prev, unix.ENOENT, do)
}

// Batch is a kernel that sets many neighbour and FDB entries per system call
// (pkg/nlbatch), each with its own outcome; a full pass's sets go through it when the
// Kernel has it.
type Batch interface {
	SetNeighs(n int, neigh func(i int) *netlink.Neigh) []error
}

// setAll sets n entries, batched when the kernel can, and returns each one's outcome.
func (r *Reconciler) setAll(n int, neigh func(i int) *netlink.Neigh) []error {
	if b, ok := r.k.(Batch); ok && n > 0 {
		return b.SetNeighs(n, neigh)
	}
	errs := make([]error, n)
	for i := range n {
		errs[i] = r.k.NeighSet(neigh(i))
	}
	return errs
}

// set is one entry a pass sets: its key, from prev (had: present) to next.
type set[K comparable] struct {
	key        K
	next, prev entry
	had        bool
}

// setEntries writes sets through m (neigh(i) is set i's kernel form, built as it is sent)
// and reports each failure by what(i).
func setEntries[K comparable](r *Reconciler, m *mirror.Mirror[K, entry], sets []set[K], neigh func(i int) *netlink.Neigh, what func(i int) string) (n int, errs []error) {
	chs := make([]mirror.Change[K, entry], len(sets))
	for i := range sets {
		s := &sets[i]
		chs[i] = mirror.Change[K, entry]{Key: s.key, Next: &s.next}
		if s.had {
			chs[i].Prev = &s.prev
		}
	}
	for i, err := range m.WriteAll(chs, unix.ENOENT, func() []error { return r.setAll(len(sets), neigh) }) {
		if err != nil {
			errs = append(errs, fmt.Errorf("set %s: %w", what(i), err))
			continue
		}
		n++
	}
	return n, errs
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

// Ours reports whether l is a VXLAN device of netagent's naming (plan.VXLANDevName).
func Ours(l netlink.Link) bool {
	_, ok := l.(*netlink.Vxlan)
	name := l.Attrs().Name
	return ok && (strings.HasPrefix(name, "netagent.") || strings.HasPrefix(name, "na."))
}

// Prune removes every VXLAN device of netagent's naming except keep ("": all of them),
// with the routes, neighbour and FDB entries on it, and returns the names removed. The
// caller runs it after the routes moved to the device in use (or to the underlay).
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

// Sync ensures the device dev with exactly the given neighbour and FDB entries; dev nil
// (no VXLAN in the plan) ensures nothing: Prune removes devices.
func (r *Reconciler) Sync(dev *plan.VXLANDevice, neighs []plan.Neigh, fdb []plan.FDB) (Stats, error) {
	var st Stats
	r.none.Store(dev == nil)
	if dev == nil {
		return st, nil
	}
	mac, err := net.ParseMAC(dev.MAC)
	if err != nil {
		return st, fmt.Errorf("vxlan device %s: mac %q: %w", dev.Name, dev.MAC, err)
	}
	link, created, err := r.ensureDevice(dev, dev.Underlay, mac, &st)
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

// ensureAddr makes want the device's only IPv4 address (want invalid: none, in an
// IPv6-only cluster); its IPv6 link-local address is the kernel's.
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
	if !found && want.IsValid() {
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
	keep := make(map[netipx.AddrKey]bool, len(neighs))
	var sets []set[netipx.AddrKey]
	var whats []plan.Neigh
	for _, w := range neighs {
		k := netipx.AddrKeyOf(w.IP)
		keep[k] = true
		c, ok := have[k]
		m := planMAC(w.MAC)
		if ok && c.permanentWith(m) {
			continue
		}
		sets, whats = append(sets, set[netipx.AddrKey]{key: k, next: toEntry(*setNeigh(idx, w.IP, m)), prev: c, had: ok}), append(whats, w)
	}
	n, failed := setEntries(r, &r.neigh, sets,
		func(i int) *netlink.Neigh { return setNeigh(idx, whats[i].IP, planMAC(whats[i].MAC)) },
		func(i int) string { return fmt.Sprintf("neighbour %s %s", whats[i].IP, whats[i].MAC) })
	st.NeighSet += n
	errs = append(errs, failed...)
	for k, c := range have {
		if !keep[k] {
			if err := r.remove(deletion{idx: idx, ip: k.Addr(), prev: c}, st); err != nil {
				errs = append(errs, err)
			}
		}
	}
	keepFDB := make(map[fdbKey]bool, len(fdb))
	var fsets []set[fdbKey]
	var fwhats []plan.FDB
	for _, w := range fdb {
		k := fdbKey{planMAC(w.MAC), netipx.AddrKeyOf(w.Dst)}
		keepFDB[k] = true
		c, ok := haveFDB[k]
		if ok && c.permanent() {
			continue
		}
		fsets, fwhats = append(fsets, set[fdbKey]{key: k, next: toEntry(*setFDB(idx, k)), prev: c, had: ok}), append(fwhats, w)
	}
	n, failed = setEntries(r, &r.fdb, fsets,
		func(i int) *netlink.Neigh { return setFDB(idx, fsets[i].key) },
		func(i int) string { return fmt.Sprintf("fdb %s dst %s", fwhats[i].MAC, fwhats[i].Dst) })
	st.FDBSet += n
	errs = append(errs, failed...)
	for k, c := range haveFDB {
		if !keepFDB[k] {
			if err := r.remove(deletion{idx: idx, fdb: true, ip: k.dst.Addr(), key: k, prev: c}, st); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// ErrNoMirror means Apply needs a valid mirror; the caller runs a full Sync instead.
var ErrNoMirror = errors.New("vxlan mirror not valid: full sync needed")

// Apply fixes only the neighbour and FDB entries a plan delta names (the per-event path):
// each is set to its new value or deleted. It needs a valid mirror of the current device.
func (r *Reconciler) Apply(neighs []plan.NeighChange, fdbs []plan.FDBChange) (Stats, error) {
	var st Stats
	if len(neighs)+len(fdbs) == 0 {
		return st, nil // (a host-gw or wireguard delta: no device, no mirror to need)
	}
	idx := r.Device()
	if idx == 0 {
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
	okN := r.neigh.Read(func(m map[netipx.AddrKey]entry) {
		for _, ch := range neighs {
			ip, w := ch.IP, ch.Neigh
			c, have := m[netipx.AddrKeyOf(ip)]
			switch {
			case !ch.Del:
				mac := planMAC(w.MAC)
				if have && c.permanentWith(mac) {
					continue
				}
				n := setNeigh(idx, ip, mac)
				next := toEntry(*n)
				ops = append(ops, nop{ip: ip, prev: mirror.Ptr(c, have), set: n, next: &next})
			case have:
				dels = append(dels, deletion{idx: idx, ip: ip, prev: c})
			}
		}
	})
	okF := r.fdb.Read(func(m map[fdbKey]entry) {
		for _, ch := range fdbs {
			f := ch.FDB
			k := fdbKey{planMAC(f.MAC), netipx.AddrKeyOf(f.Dst)}
			c, have := m[k]
			if !ch.Del {
				if have && c.permanent() {
					continue
				}
				n := setFDB(idx, k)
				next := toEntry(*n)
				ops = append(ops, nop{ip: f.Dst, fdb: true, fkey: k, prev: mirror.Ptr(c, have), set: n, next: &next})
			} else if have {
				dels = append(dels, deletion{idx: idx, fdb: true, ip: f.Dst, key: k, prev: c})
			}
		}
	})
	if !okN || !okF {
		return st, ErrNoMirror
	}
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

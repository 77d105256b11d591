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

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/plan"
)

// Kernel is the part of a netlink handle the reconciler needs.
type Kernel interface {
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
type Reconciler struct {
	k   Kernel
	log *slog.Logger
}

// New returns a reconciler working through k.
func New(k Kernel, log *slog.Logger) *Reconciler { return &Reconciler{k: k, log: log} }

// Stats counts what a Sync changed.
type Stats struct {
	DeviceCreated                      bool
	NeighSet, NeighDel, FDBSet, FDBDel int
}

// Changed reports whether Sync touched the kernel.
func (s Stats) Changed() bool {
	return s.DeviceCreated || s.NeighSet+s.NeighDel+s.FDBSet+s.FDBDel > 0
}

// Sync ensures the device dev (nil: remove a device of that name if present) on underlay
// device underlay, with mac, and exactly the given neighbour and FDB entries.
func (r *Reconciler) Sync(dev *plan.VXLANDevice, name, underlay string, mac net.HardwareAddr, neighs []plan.Neigh, fdb []plan.FDB) (Stats, error) {
	var st Stats
	if dev == nil {
		return st, r.remove(name)
	}
	link, created, err := r.ensureDevice(dev, underlay, mac)
	if err != nil {
		return st, err
	}
	st.DeviceCreated = created
	var errs []error
	if err := r.ensureAddr(link, dev.Addr); err != nil {
		errs = append(errs, err)
	}
	// Neighbours and FDB before routes (the caller syncs routes after this).
	n, d, err := r.syncNeighs(link, neighs)
	st.NeighSet, st.NeighDel = n, d
	if err != nil {
		errs = append(errs, err)
	}
	n, d, err = r.syncFDB(link, fdb)
	st.FDBSet, st.FDBDel = n, d
	if err != nil {
		errs = append(errs, err)
	}
	return st, errors.Join(errs...)
}

func (r *Reconciler) remove(name string) error {
	l, err := r.k.LinkByName(name)
	if err != nil {
		return nil
	}
	if _, ok := l.(*netlink.Vxlan); !ok {
		return nil
	}
	if err := r.k.LinkDel(l); err != nil {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}

func (r *Reconciler) ensureDevice(dev *plan.VXLANDevice, underlay string, mac net.HardwareAddr) (netlink.Link, bool, error) {
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
	if a.HardwareAddr.String() != mac.String() {
		if err := r.k.LinkSetHardwareAddr(l, mac); err != nil {
			return nil, created, fmt.Errorf("set %s mac: %w", dev.Name, err)
		}
	}
	if a.MTU != dev.MTU {
		if err := r.k.LinkSetMTU(l, dev.MTU); err != nil {
			return nil, created, fmt.Errorf("set %s mtu %d: %w", dev.Name, dev.MTU, err)
		}
	}
	if a.Flags&net.FlagUp == 0 {
		if err := r.k.LinkSetUp(l); err != nil {
			return nil, created, fmt.Errorf("set %s up: %w", dev.Name, err)
		}
	}
	return l, created, nil
}

func (r *Reconciler) ensureAddr(l netlink.Link, want netip.Prefix) error {
	addrs, err := r.k.AddrList(l, unix.AF_INET)
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

func (r *Reconciler) syncNeighs(l netlink.Link, want []plan.Neigh) (set, del int, err error) {
	cur, err := r.k.NeighList(l.Attrs().Index, unix.AF_INET)
	if err != nil {
		return 0, 0, fmt.Errorf("list neighbours: %w", err)
	}
	have := map[netip.Addr]netlink.Neigh{}
	for _, n := range cur {
		if ip, ok := netip.AddrFromSlice(n.IP); ok {
			have[ip.Unmap()] = n
		}
	}
	var errs []error
	keep := map[netip.Addr]bool{}
	for _, w := range want {
		keep[w.IP] = true
		if c, ok := have[w.IP]; ok && c.State&netlink.NUD_PERMANENT != 0 && strings.EqualFold(c.HardwareAddr.String(), w.MAC) {
			continue
		}
		mac, _ := net.ParseMAC(w.MAC)
		if err := r.k.NeighSet(&netlink.Neigh{LinkIndex: l.Attrs().Index, Family: unix.AF_INET, State: netlink.NUD_PERMANENT, IP: w.IP.AsSlice(), HardwareAddr: mac}); err != nil {
			errs = append(errs, fmt.Errorf("set neighbour %s %s: %w", w.IP, w.MAC, err))
			continue
		}
		set++
	}
	for ip, c := range have {
		if keep[ip] {
			continue
		}
		if err := r.k.NeighDel(&c); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete neighbour %s: %w", ip, err))
			continue
		}
		del++
	}
	return set, del, errors.Join(errs...)
}

func (r *Reconciler) syncFDB(l netlink.Link, want []plan.FDB) (set, del int, err error) {
	cur, err := r.k.NeighList(l.Attrs().Index, unix.AF_BRIDGE)
	if err != nil {
		return 0, 0, fmt.Errorf("list fdb: %w", err)
	}
	type entry struct {
		mac string
		dst netip.Addr
	}
	have := map[string][]netlink.Neigh{}
	for _, n := range cur {
		have[strings.ToLower(n.HardwareAddr.String())] = append(have[strings.ToLower(n.HardwareAddr.String())], n)
	}
	var errs []error
	keep := map[entry]bool{}
	for _, w := range want {
		mac := strings.ToLower(w.MAC)
		keep[entry{mac, w.Dst}] = true
		ok := false
		for _, c := range have[mac] {
			if ip, good := netip.AddrFromSlice(c.IP); good && ip.Unmap() == w.Dst && c.State&netlink.NUD_PERMANENT != 0 {
				ok = true
			}
		}
		if ok {
			continue
		}
		hw, _ := net.ParseMAC(w.MAC)
		if err := r.k.NeighSet(&netlink.Neigh{LinkIndex: l.Attrs().Index, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF,
			State: netlink.NUD_PERMANENT, IP: w.Dst.AsSlice(), HardwareAddr: hw}); err != nil {
			errs = append(errs, fmt.Errorf("set fdb %s dst %s: %w", w.MAC, w.Dst, err))
			continue
		}
		set++
	}
	for mac, entries := range have {
		for _, c := range entries {
			ip, _ := netip.AddrFromSlice(c.IP)
			if keep[entry{mac, ip.Unmap()}] {
				continue
			}
			c.Family = unix.AF_BRIDGE
			c.Flags |= netlink.NTF_SELF
			if err := r.k.NeighDel(&c); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("delete fdb %s dst %s: %w", mac, c.IP, err))
				continue
			}
			del++
		}
	}
	return set, del, errors.Join(errs...)
}

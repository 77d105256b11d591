// Package barework is the kernel work of one pod attachment on a bridge, done with plain
// netlink calls and nothing else: no IPAM, no checks, no lock. The CNI benchmark times it
// from its own process (the kernel floor) and inside a minimal exec'd plugin (the floor of
// any plugin that is a Go program run once per pod).
package barework

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"github.com/vishvananda/netlink"
	vns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Addr is the idx-th pod address of subnet: the ones after the gateway, in order.
func Addr(subnet netip.Prefix, idx int) (netip.Prefix, error) {
	a := subnet.Masked().Addr().Next().Next()
	for range idx {
		a = a.Next()
	}
	if idx < 0 || !subnet.Contains(a.Next()) { // the last address is the broadcast
		return netip.Prefix{}, fmt.Errorf("pod %d does not fit in %s", idx, subnet)
	}
	return netip.PrefixFrom(a, subnet.Bits()), nil
}

// Gateway is subnet's first address, carried by the bridge.
func Gateway(subnet netip.Prefix) netip.Addr { return subnet.Masked().Addr().Next() }

// Setup creates bridge (up, with the gateway address of each subnet, one per family) in
// the namespace of h.
func Setup(h *netlink.Handle, bridge string, subnets ...netip.Prefix) error {
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: bridge, Flags: net.FlagUp}}
	if err := h.LinkAdd(br); err != nil {
		return fmt.Errorf("create bridge %s: %w", bridge, err)
	}
	for _, subnet := range subnets {
		gw := netip.PrefixFrom(Gateway(subnet), subnet.Bits())
		if err := h.AddrAdd(br, addr(gw)); err != nil {
			return fmt.Errorf("bridge %s address %s: %w", bridge, gw, err)
		}
	}
	return nil
}

// Attach creates a veth on bridge (in the calling thread's namespace) with its peer ifName
// in the namespace at podNS, gives the peer addrs (one per family) and a default route via
// each one's subnet gateway, and returns the peer. IPv6 addresses skip duplicate address
// detection, so they are usable when Attach returns, as a plugin's must be.
func Attach(podNS, bridge, hostVeth, ifName string, addrs ...netip.Prefix) (netlink.Link, error) {
	h, err := netlink.NewHandle()
	if err != nil {
		return nil, err
	}
	defer h.Close()
	ns, err := vns.GetFromPath(podNS)
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	br, err := h.LinkByName(bridge)
	if err != nil {
		return nil, fmt.Errorf("bridge %s: %w", bridge, err)
	}
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: hostVeth, MTU: 1500, Flags: net.FlagUp, MasterIndex: br.Attrs().Index},
		PeerName:      ifName,
		PeerNamespace: netlink.NsFd(ns),
	}
	if err := h.LinkAdd(veth); err != nil {
		return nil, fmt.Errorf("create veth %s: %w", hostVeth, err)
	}
	ph, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, err
	}
	defer ph.Close()
	l, err := ph.LinkByName(ifName)
	if err != nil {
		return nil, fmt.Errorf("pod link: %w", err)
	}
	for _, a := range addrs {
		if err := ph.AddrAdd(l, addr(a)); err != nil {
			return nil, fmt.Errorf("pod address %s: %w", a, err)
		}
	}
	if err := ph.LinkSetUp(l); err != nil {
		return nil, fmt.Errorf("pod link up: %w", err)
	}
	for _, a := range addrs {
		gw := Gateway(a.Masked())
		def := ipNet(netip.PrefixFrom(netip.IPv6Unspecified(), 0))
		if gw.Is4() {
			def = ipNet(netip.PrefixFrom(netip.IPv4Unspecified(), 0))
		}
		if err := ph.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: def, Gw: gw.AsSlice()}); err != nil {
			return nil, fmt.Errorf("pod default route via %s: %w", gw, err)
		}
	}
	return l, nil
}

// Detach removes hostVeth (and its peer with it) from the calling thread's namespace; a
// missing one is not an error.
func Detach(hostVeth string) error {
	h, err := netlink.NewHandle()
	if err != nil {
		return err
	}
	defer h.Close()
	l, err := h.LinkByName(hostVeth)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("find %s: %w", hostVeth, err)
	}
	if err := h.LinkDel(l); err != nil && !errors.Is(err, syscall.ENODEV) {
		return fmt.Errorf("delete %s: %w", hostVeth, err)
	}
	return nil
}

// addr is p as an interface address; an IPv6 one without duplicate address detection.
func addr(p netip.Prefix) *netlink.Addr {
	a := &netlink.Addr{IPNet: ipNet(p)}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	return a
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

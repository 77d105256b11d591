package bridge

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/netipx"
)

// A routed pod (the plugin's podInterface "routed", as Calico wires pods) has a veth pair
// with no bridge: the pod's addresses are host routes (/32, /128) over the host end, and
// the pod's default routes go via link-local gateways that the host end answers for. A
// pod's packets then pass one forwarding hop on the node instead of a bridge and a
// forwarding hop, which is where IPv6 host-gw lost its points (BENCHMARKS.md); and a pod's
// link is point-to-point, so nothing it sends can reach another pod without being routed.
//
// Both ends hold permanent neighbour entries for each other (the plugin knows both MACs),
// so no packet waits for ARP or neighbour discovery, and nothing a pod sends can change
// the node's entry for its address. The host end answers ARP (proxy_arp) but carries no
// IPv6 address: fe80::1 on it made a dual-stack DEL about 20 ms dearer (the kernel's IPv6
// teardown of the veth; BENCHMARKS.md), and a pod's neighbour entry for fe80::1 is
// permanent (`ip neigh flush` leaves it; a pod that deletes it cuts itself off).
//
// The node holds the subnet's gateway address on lo (EnsureNodeAddr), as a bridged node
// holds it on the bridge: what the node itself sends its pods (probes, DNS answers) has a
// source address the pods route back to, also on a node with no global address of that
// family of its own (dual-stack pods over an IPv4 underlay).
//
// Anti-spoofing for these pods is antispoof.AddRouted (a chain on the host end's ingress).

// The gateways every routed pod uses, whatever its node and subnet.
var (
	RoutedGateway4 = netip.MustParseAddr("169.254.1.1")
	RoutedGateway6 = netip.MustParseAddr("fe80::1")
)

// RouteProtocol marks the node's host routes to routed pods and the unreachable routes
// of their subnets (netagent's own routes carry 180, which its reconciler owns).
const RouteProtocol = 181

// unreachableMetric puts a subnet's unreachable route behind any other route to it (a
// bridge's subnet route on a node with bridged pods too).
const unreachableMetric = 0xfffffff0

func hostLen(p netip.Prefix) netip.Prefix { return netip.PrefixFrom(p.Addr(), p.Addr().BitLen()) }

// lo is the loopback device, which has index 1 in every network namespace: no lookup.
var lo = &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: 1, Name: "lo"}}

// AddRouted creates p's veth pair with no master and configures the pod end (its
// addresses as host prefixes, its link-local address, permanent neighbour entries for the
// gateways and default routes via them) and the host end (proxy_arp). p.Gateway
// and p.Gateway6 must be RoutedGateway4 and RoutedGateway6 (or invalid). The host end stays
// down until Up; then RouteRouted adds the node's routes to the pod. On error it removes
// what it created.
func AddRouted(h *netlink.Handle, pn *PodNS, p Pod) (Wired, error) {
	p.Routed = true
	return addVeth(h, 0, pn, p)
}

func permanent(index int, ip netip.Addr, mac net.HardwareAddr) *netlink.Neigh {
	return &netlink.Neigh{LinkIndex: index, Family: family(ip), State: netlink.NUD_PERMANENT, IP: ip.AsSlice(), HardwareAddr: mac}
}

// hostRoutes are the node's routes to a routed pod over its host end (index).
func hostRoutes(index int, p Pod) []*netlink.Route {
	var out []*netlink.Route
	for _, a := range p.addrs() {
		r := &netlink.Route{LinkIndex: index, Dst: netipx.IPNet(hostLen(a)), Protocol: RouteProtocol}
		if a.Addr().Is4() {
			r.Scope = netlink.SCOPE_LINK
		}
		out = append(out, r)
	}
	return out
}

// RouteRouted adds the node's permanent neighbour entries for the pod's addresses and its
// routes to them over the host end. It runs after Up: the kernel refuses an IPv4 route
// over a device that is down.
func RouteRouted(h *netlink.Handle, w Wired, p Pod) error {
	for _, a := range p.addrs() {
		if err := h.NeighSet(permanent(w.HostIndex, a.Addr(), w.PodMAC)); err != nil {
			return fmt.Errorf("add neighbour %s on %s: %w", a.Addr(), p.HostVeth, err)
		}
	}
	for _, r := range hostRoutes(w.HostIndex, p) {
		if err := h.RouteReplace(r); err != nil {
			return fmt.Errorf("add route to %s over %s: %w", r.Dst, p.HostVeth, err)
		}
	}
	return nil
}

// EnsureUnreachable makes sure the node has an unreachable route for subnet, a routed
// node subnet: without a bridge holding the subnet, a packet for one of its unused
// addresses would follow the node's default route back out (a loop until its hop limit
// runs out, between the node and its router).
func EnsureUnreachable(h *netlink.Handle, subnet netip.Prefix) error {
	r := &netlink.Route{Dst: netipx.IPNet(subnet.Masked()), Type: unix.RTN_UNREACHABLE, Priority: unreachableMetric, Protocol: RouteProtocol}
	if subnet.Addr().Is6() {
		r.Family = unix.AF_INET6
	}
	// An add, not a listing first: one request whatever the number of routes. A route of
	// this destination and metric that exists is taken to be ours (the metric is ours).
	if err := h.RouteAdd(r); err != nil && !errors.Is(err, syscall.EEXIST) {
		return fmt.Errorf("add unreachable route for %s: %w", subnet, err)
	}
	return nil
}

// EnsureNodeAddr makes sure lo carries gw, a routed node subnet's gateway address, as a
// host prefix (see the comment at the top). One add, whether or not it is there.
func EnsureNodeAddr(h *netlink.Handle, gw netip.Addr) error {
	a := &netlink.Addr{IPNet: netipx.IPNet(netip.PrefixFrom(gw, gw.BitLen())), Flags: addrFlags(gw)}
	err := h.AddrAdd(lo, a)
	if errors.Is(err, syscall.EEXIST) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("add the pods' gateway address %s to lo: %w", a.IPNet, err)
	}
	if gw.Is6() {
		return waitLocal(h, []netip.Addr{gw}, usableWait) // as the pods' own addresses (Usable)
	}
	return nil
}

// CheckRouted verifies the wiring of routed pod p: the host end is an up veth with no
// master whose peer is the pod interface; the pod interface is up with the MTU, its
// addresses as host prefixes, the permanent gateway neighbours and the default routes;
// the node has its routes and neighbour entries to the pod. The first mismatch is
// returned, described for an operator.
func CheckRouted(h *netlink.Handle, p Pod) error {
	host, err := h.LinkByName(p.HostVeth)
	if err != nil {
		return fmt.Errorf("host veth %s is missing: %w", p.HostVeth, err)
	}
	if _, ok := host.(*netlink.Veth); !ok {
		return fmt.Errorf("host interface %s is a %s, not a veth", p.HostVeth, host.Type())
	}
	if host.Attrs().MasterIndex != 0 {
		return fmt.Errorf("host veth %s of a routed pod is attached to a bridge or other master (index %d)", p.HostVeth, host.Attrs().MasterIndex)
	}
	if host.Attrs().Flags&net.FlagUp == 0 {
		return fmt.Errorf("host veth %s is down", p.HostVeth)
	}
	p.Routed = true
	var podMAC net.HardwareAddr
	if err := checkPod(host, p, func(ph *netlink.Handle, pod netlink.Link) error {
		podMAC = pod.Attrs().HardwareAddr
		for _, gw := range p.gateways() {
			if err := hasPermanent(ph, pod.Attrs().Index, gw, host.Attrs().HardwareAddr); err != nil {
				return fmt.Errorf("pod: %w", err)
			}
		}
		return nil
	}); err != nil {
		return err
	}
	for _, a := range p.addrs() {
		if err := hasPermanent(h, host.Attrs().Index, a.Addr(), podMAC); err != nil {
			return fmt.Errorf("node: %w", err)
		}
	}
	for i, want := range hostRoutes(host.Attrs().Index, p) {
		have, err := h.RouteListFiltered(family(p.addrs()[i].Addr()), want, netlink.RT_FILTER_DST|netlink.RT_FILTER_OIF)
		if err != nil || len(have) == 0 {
			return fmt.Errorf("the node has no route to %s over %s", want.Dst, p.HostVeth)
		}
	}
	return nil
}

// CheckRoutedNode verifies what the node holds for a routed node subnet, gw being its
// gateway address with the subnet's prefix length: the gateway on lo (EnsureNodeAddr) and
// the subnet's unreachable route (EnsureUnreachable). Without the first, the node has no
// source address of the family for its own packets to its pods (on a node with no global
// address of that family); without the second, a packet for an unused address of the
// subnet follows the default route back out.
func CheckRoutedNode(h *netlink.Handle, gw netip.Prefix) error {
	host := hostLen(gw)
	if ok, err := hasAddr(h, lo, host); err != nil || !ok {
		return fmt.Errorf("lo does not carry the pods' gateway address %s", host)
	}
	want := &netlink.Route{Dst: netipx.IPNet(gw.Masked()), Type: unix.RTN_UNREACHABLE}
	have, err := h.RouteListFiltered(family(gw.Addr()), want, netlink.RT_FILTER_DST|netlink.RT_FILTER_TYPE)
	if err != nil || len(have) == 0 {
		return fmt.Errorf("the node has no unreachable route for the pods' subnet %s", gw.Masked())
	}
	return nil
}

// hasPermanent checks for a permanent neighbour entry ip -> mac on link index.
func hasPermanent(h *netlink.Handle, index int, ip netip.Addr, mac net.HardwareAddr) error {
	ns, err := h.NeighList(index, family(ip))
	if err != nil {
		return fmt.Errorf("list neighbours: %w", err)
	}
	for _, n := range ns {
		if a, ok := netip.AddrFromSlice(n.IP); ok && a.Unmap() == ip {
			if n.State&netlink.NUD_PERMANENT == 0 || n.HardwareAddr.String() != mac.String() {
				return fmt.Errorf("neighbour entry %s is %s state %#x, want %s permanent", ip, n.HardwareAddr, n.State, mac)
			}
			return nil
		}
	}
	return fmt.Errorf("no neighbour entry for %s", ip)
}

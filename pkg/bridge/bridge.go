// Package bridge wires pods into the node bridge: it ensures the bridge with its gateway
// address, and creates, checks and removes one veth pair per pod attachment.
//
// Speed matters here (every pod ADD runs this), so each step is the fewest netlink
// messages that do the job: the veth pair is created with its pod end already inside the
// pod's namespace, already named as the runtime asked and already with the right MTU and
// MAC, and with its host end up; the pod end is then configured through a netlink socket
// opened in the pod namespace, so no OS thread ever switches namespace. The host end's
// name is a hash of the attachment, so DEL can remove it by name without entering the pod
// namespace, which may already be gone.
//
// IPv6 (see v6.go): a dual-stack pod has a second address and default route; every IPv6
// address this package adds (the bridge's gateway, the pod's address and its link-local
// one) skips duplicate address detection, which would keep it unusable for a second or more
// after ADD returns: the addresses come from our own store, so they cannot be duplicates
// on the pod's link. The host veth gets no IPv6 address at all.
package bridge

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"unsafe"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/netagent/netagent/pkg/netipx"
	"github.com/netagent/netagent/pkg/nldump"
	"golang.org/x/sys/unix"
)

// HostVethPrefix starts the name of every host-side veth this package creates.
const HostVethPrefix = "na"

// HostVethName is the host end's name for an attachment: stable, 13 characters, unique in
// practice (44 bits of a SHA-256).
func HostVethName(containerID, ifName string) string {
	sum := sha256.Sum256([]byte(containerID + "\x00" + ifName))
	return HostVethPrefix + hex.EncodeToString(sum[:])[:11]
}

// ValidIfName reports whether name is usable as a Linux interface name.
func ValidIfName(name string) error {
	switch {
	case name == "":
		return errors.New("is empty")
	case len(name) > 15:
		return fmt.Errorf("%q is longer than 15 characters", name)
	case name == "." || name == "..":
		return fmt.Errorf("%q is not allowed", name)
	case strings.ContainsAny(name, "/: \t\n"):
		return fmt.Errorf("%q contains '/', ':' or white space", name)
	}
	return nil
}

// GatewayMAC is the MAC the bridge gets: fixed and derived from the gateway address, so it
// neither changes as ports come and go (the kernel's default) nor differs across restarts.
func GatewayMAC(gw netip.Addr) net.HardwareAddr { return addrMAC(gw) }

// PodMAC is the MAC a pod interface gets: derived from its address, so a neighbour that
// cached an old pod's MAC for a reused address is still right.
func PodMAC(ip netip.Addr) net.HardwareAddr { return addrMAC(ip) }

// HostMAC is the MAC of a pod's host-side veth: also derived from the pod address (with
// another second octet), so ADD knows it without reading the link back.
func HostMAC(ip netip.Addr) net.HardwareAddr {
	m := addrMAC(ip)
	m[1] = 0x5a
	return m
}

func addrMAC(a netip.Addr) net.HardwareAddr {
	if a.Is4() {
		b := a.As4()
		return net.HardwareAddr{0x0a, 0x58, b[0], b[1], b[2], b[3]}
	}
	b := a.As16()
	return net.HardwareAddr{0x0a, 0x58, b[12], b[13], b[14], b[15]}
}

// Ensure makes sure the bridge name exists, is up and carries gw (the gateway address with
// the subnet's prefix length). It is safe to run concurrently from many plugin processes.
func Ensure(h *netlink.Handle, name string, gw netip.Prefix, mtu int) (*netlink.Bridge, error) {
	br, err := lookup(h, name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if !errors.As(err, &nf) {
			return nil, err
		}
		attrs := netlink.NewLinkAttrs()
		attrs.Name = name
		attrs.MTU = mtu
		attrs.HardwareAddr = GatewayMAC(gw.Addr())
		attrs.Flags = net.FlagUp
		if err := h.LinkAdd(&netlink.Bridge{LinkAttrs: attrs}); err != nil && !errors.Is(err, syscall.EEXIST) {
			return nil, fmt.Errorf("create bridge %s: %w", name, err)
		}
		if br, err = lookup(h, name); err != nil {
			return nil, err
		}
	}
	if br.Attrs().Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(br); err != nil {
			return nil, fmt.Errorf("set bridge %s up: %w", name, err)
		}
	}
	if err := ensureAddr(h, br, gw); err != nil {
		return nil, err
	}
	return br, nil
}

// EnsureGateway makes sure bridge br also carries gw (the second family's gateway of a
// dual-stack network).
func EnsureGateway(h *netlink.Handle, br *netlink.Bridge, gw netip.Prefix) error {
	return ensureAddr(h, br, gw)
}

func lookup(h *netlink.Handle, name string) (*netlink.Bridge, error) {
	l, err := h.LinkByName(name)
	if err != nil {
		return nil, err
	}
	br, ok := l.(*netlink.Bridge)
	if !ok {
		return nil, fmt.Errorf("link %s exists but is a %s, not a bridge", name, l.Type())
	}
	return br, nil
}

// ensureAddr makes sure l carries want; for IPv6, also its link-local address (see
// bridgeLinkLocal), both checked in one listing.
func ensureAddr(h *netlink.Handle, l netlink.Link, want netip.Prefix) error {
	wants := []netip.Prefix{want}
	if ll, ok := bridgeLinkLocal(l, want); ok {
		wants = append(wants, ll)
	}
	addrs, err := nldump.Retry(func() ([]netlink.Addr, error) { return h.AddrList(l, family(want.Addr())) })
	if err != nil {
		return fmt.Errorf("list addresses of %s: %w", l.Attrs().Name, err)
	}
	for _, w := range wants {
		i := slices.IndexFunc(addrs, func(a netlink.Addr) bool { p, ok := netipx.Prefix(a.IPNet); return ok && p == w })
		if i >= 0 && addrs[i].Flags&unix.IFA_F_TENTATIVE == 0 {
			continue
		}
		if i >= 0 {
			// There but tentative (the kernel's own, in duplicate address detection, on a
			// bridge made before we added the link-local ourselves): unusable until it ends.
			if err := h.AddrDel(l, &addrs[i]); err != nil && !errors.Is(err, syscall.EADDRNOTAVAIL) {
				return fmt.Errorf("replace tentative %s on %s: %w", w, l.Attrs().Name, err)
			}
		}
		addr := &netlink.Addr{IPNet: netipx.IPNet(w), Flags: addrFlags(w.Addr())}
		if err := h.AddrAdd(l, addr); err != nil && !errors.Is(err, syscall.EEXIST) {
			return fmt.Errorf("add %s to %s: %w", w, l.Attrs().Name, err)
		}
	}
	return nil
}

// Pod describes one pod attachment to wire.
type Pod struct {
	NetnsFd  int          // an open fd of the pod's network namespace
	IfName   string       // interface name inside the pod
	HostVeth string       // host end name (HostVethName)
	Addr     netip.Prefix // pod address with the subnet's prefix length (IPv4, or IPv6 for IPv6 only)
	Gateway  netip.Addr   // default route via; invalid means no default route
	Addr6    netip.Prefix // the IPv6 address of a dual-stack pod (Addr being IPv4)
	Gateway6 netip.Addr   // its IPv6 default route via; invalid means none
	MTU      int
	Hairpin  bool
	Routed   bool // no bridge: host-prefix addresses, permanent gateway neighbours (routed.go)
}

// Wired is what Add created, for the CNI result.
type Wired struct {
	HostMAC, PodMAC     net.HardwareAddr
	HostIndex, PodIndex int
	V6                  []netip.Addr // the pod's IPv6 addresses, which Usable waits for
}

// ErrLive means an attachment's interfaces already exist and are in use: its host veth is
// up and its peer is the pod interface, carrying the pod's address.
var ErrLive = errors.New("interface already exists")

// Lookup is the link named name, or nil if there is none.
func Lookup(h *netlink.Handle, name string) (netlink.Link, error) {
	l, err := h.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil, nil
		}
		return nil, fmt.Errorf("find %s: %w", name, err)
	}
	return l, nil
}

// Live reports whether host is the host end of a finished attachment, ADD's last step
// being to set the host end up (Up): host is an up veth whose peer is ifName in the
// namespace podNS, carrying addr. Anything else under its name is what an interrupted ADD
// left (a host end still down, a pod end without the address), which ADD may rebuild.
func Live(h *netlink.Handle, podNS netns.NsHandle, host netlink.Link, ifName string, addr netip.Addr) (bool, error) {
	if _, ok := host.(*netlink.Veth); !ok || host.Attrs().Flags&net.FlagUp == 0 || !addr.IsValid() {
		return false, nil
	}
	// The peer must be in podNS: its IFLA_LINK index names a link there only if the
	// host veth's link-netnsid is podNS's id.
	if id, err := h.GetNetNsIdByFd(int(podNS)); err != nil || id < 0 || id != host.Attrs().NetNsID {
		return false, nil
	}
	ph, err := netlink.NewHandleAt(podNS, unix.NETLINK_ROUTE)
	if err != nil {
		return false, fmt.Errorf("netlink in pod namespace: %w", err)
	}
	defer ph.Close()
	pod, err := ph.LinkByName(ifName)
	if err != nil || pod.Attrs().Index != host.Attrs().ParentIndex {
		return false, nil
	}
	return hasAddrOf(ph, pod, addr)
}

// Up sets the host end of an attachment up, ADD's last step, which marks it live (see
// Live), and returns once the pod's path is usable. Setting the host end up turns on the
// carrier of both ends, but the kernel applies a carrier change later, from its link-watch
// work: until then the end opened first (the pod's) sends into a qdisc that drops
// everything, and the bridge keeps the port disabled. Under a burst of ADDs that work runs
// late, and a pod's first packets were lost after ADD returned. Asking a device for its
// link state (ETHTOOL_GLINK) makes the kernel apply its pending link event at once.
func Up(h *netlink.Handle, pn *PodNS, w Wired, hostVeth, ifName string) error {
	if err := h.LinkSetUp(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: w.HostIndex}}); err != nil {
		return fmt.Errorf("set %s up: %w", hostVeth, err)
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	if err := syncLink(fd, hostVeth); err != nil {
		return err
	}
	// The ioctl acts in its socket's namespace: the pod's socket.
	return syncLink(pn.sock, ifName)
}

// syncLink reads the link state of device name through socket fd (SIOCETHTOOL,
// ETHTOOL_GLINK), which applies the device's pending carrier change first.
func syncLink(fd int, name string) error {
	v := struct{ cmd, data uint32 }{cmd: unix.ETHTOOL_GLINK}
	var ifr struct {
		name [unix.IFNAMSIZ]byte
		data unsafe.Pointer
		_    [16]byte
	}
	copy(ifr.name[:], name)
	ifr.data = unsafe.Pointer(&v)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr))); errno != 0 {
		return fmt.Errorf("link state of %s: %w", name, errno)
	}
	if v.data == 0 {
		return fmt.Errorf("%s has no carrier", name)
	}
	return nil
}

// Add creates the veth pair of p on bridge br and configures the pod end through pn (the
// pod's namespace, p.NetnsFd's); the host end stays down until Up. On error it removes what
// it created (the pod end goes with the host end).
func Add(h *netlink.Handle, br *netlink.Bridge, pn *PodNS, p Pod) (Wired, error) {
	return addVeth(h, br.Attrs().Index, pn, p)
}

// addVeth creates p's veth pair, its host end on master (0: none), and configures it; on
// error it removes what it created.
func addVeth(h *netlink.Handle, master int, pn *PodNS, p Pod) (Wired, error) {
	veth := &netlink.Veth{
		LinkAttrs: netlink.LinkAttrs{
			Name:         p.HostVeth,
			MTU:          p.MTU,
			HardwareAddr: HostMAC(p.Addr.Addr()),
			MasterIndex:  master,
			TxQLen:       -1,
		},
		PeerName:         p.IfName,
		PeerHardwareAddr: PodMAC(p.Addr.Addr()),
		PeerNamespace:    netlink.NsFd(p.NetnsFd),
		PeerTxQLen:       -1,
	}
	err := h.LinkAdd(veth)
	if errors.Is(err, syscall.EEXIST) {
		// A host end left by an earlier, interrupted ADD of this same attachment (the name
		// is a hash of it): remove it and try once more.
		if derr := Del(h, p.HostVeth); derr != nil {
			return Wired{}, fmt.Errorf("create veth %s: %w (removing the stale one: %v)", p.HostVeth, err, derr)
		}
		err = h.LinkAdd(veth)
	}
	if err != nil {
		if errors.Is(err, syscall.EEXIST) {
			return Wired{}, fmt.Errorf("create veth %s/%s: interface %s already exists in the pod namespace: %w", p.HostVeth, p.IfName, p.IfName, err)
		}
		return Wired{}, fmt.Errorf("create veth %s/%s: %w", p.HostVeth, p.IfName, err)
	}
	w, err := configure(h, veth, pn.H, p)
	if err != nil {
		_ = h.LinkDel(veth)
		return Wired{}, err
	}
	return w, nil
}

func configure(h *netlink.Handle, veth *netlink.Veth, ph *netlink.Handle, p Pod) (Wired, error) {
	if p.Hairpin {
		if err := h.LinkSetHairpin(veth, true); err != nil {
			return Wired{}, fmt.Errorf("set hairpin on %s: %w", p.HostVeth, err)
		}
	}
	pod, err := ph.LinkByName(p.IfName)
	if err != nil {
		return Wired{}, fmt.Errorf("find %s in pod namespace: %w", p.IfName, err)
	}
	if p.hasV6() {
		if err := setupV6(h, ph, veth, pod, p); err != nil {
			return Wired{}, err
		}
	}
	if p.Routed && p.Addr.Addr().Is4() {
		if err := writeSysctl("/proc/sys/net/ipv4/conf/"+p.HostVeth+"/proxy_arp", "1"); err != nil {
			return Wired{}, err
		}
	}
	for _, a := range p.ifAddrs() {
		if err := ph.AddrAdd(pod, &netlink.Addr{IPNet: netipx.IPNet(a), Flags: addrFlags(a.Addr())}); err != nil {
			return Wired{}, fmt.Errorf("add %s to %s: %w", a, p.IfName, err)
		}
	}
	if err := ph.LinkSetUp(pod); err != nil {
		return Wired{}, fmt.Errorf("set %s up: %w", p.IfName, err)
	}
	hostMAC := HostMAC(p.Addr.Addr())
	for _, gw := range p.gateways() {
		r := &netlink.Route{
			LinkIndex: pod.Attrs().Index,
			Dst:       defaultDst(gw),
			Gw:        gw.AsSlice(),
		}
		if p.Routed {
			if err := ph.NeighSet(permanent(pod.Attrs().Index, gw, hostMAC)); err != nil {
				return Wired{}, fmt.Errorf("add neighbour %s in pod: %w", gw, err)
			}
			if gw.Is4() {
				r.Flags = int(netlink.FLAG_ONLINK)
			}
		}
		if err := ph.RouteAdd(r); err != nil {
			return Wired{}, fmt.Errorf("add default route via %s in pod: %w", gw, err)
		}
	}
	w := Wired{HostMAC: hostMAC, PodMAC: pod.Attrs().HardwareAddr, HostIndex: veth.Attrs().Index, PodIndex: pod.Attrs().Index}
	for _, a := range p.ifAddrs() {
		if a.Addr().Is6() {
			w.V6 = append(w.V6, a.Addr())
		}
	}
	return w, nil
}

// Del removes the host end hostVeth (and with it the pod end). A missing link is not an
// error: DEL must be repeatable.
func Del(h *netlink.Handle, hostVeth string) error {
	l, err := Lookup(h, hostVeth)
	if err != nil || l == nil {
		return err
	}
	if _, ok := l.(*netlink.Veth); !ok {
		return fmt.Errorf("refusing to delete %s: it is a %s, not a veth", hostVeth, l.Type())
	}
	if err := h.LinkDel(l); err != nil && !errors.Is(err, syscall.ENODEV) {
		return fmt.Errorf("delete %s: %w", hostVeth, err)
	}
	return nil
}

// Check verifies the wiring of p: the bridge carries the gateway, the host end is an up veth
// on the bridge whose peer is the pod interface, and the pod interface is up with the
// addresses, MTU and default routes. The first mismatch is returned, described for an operator.
//
// gw6 is the bridge's IPv6 gateway address of a dual-stack network (else invalid).
func Check(h *netlink.Handle, bridgeName string, gw, gw6 netip.Prefix, p Pod) error {
	br, err := lookup(h, bridgeName)
	if err != nil {
		return fmt.Errorf("bridge: %w", err)
	}
	for _, g := range []netip.Prefix{gw, gw6} {
		if !g.IsValid() {
			continue
		}
		if ok, err := hasAddr(h, br, g); err != nil || !ok {
			return fmt.Errorf("bridge %s does not carry gateway address %s", bridgeName, g)
		}
	}
	host, err := h.LinkByName(p.HostVeth)
	if err != nil {
		return fmt.Errorf("host veth %s is missing: %w", p.HostVeth, err)
	}
	if _, ok := host.(*netlink.Veth); !ok {
		return fmt.Errorf("host interface %s is a %s, not a veth", p.HostVeth, host.Type())
	}
	if host.Attrs().MasterIndex != br.Attrs().Index {
		return fmt.Errorf("host veth %s is not attached to bridge %s", p.HostVeth, bridgeName)
	}
	if host.Attrs().Flags&net.FlagUp == 0 {
		return fmt.Errorf("host veth %s is down", p.HostVeth)
	}
	return checkPod(host, p, nil)
}

// checkPod checks the pod end of host veth host: the peer of host, up, with p's MTU, its
// addresses (and its link-local one with IPv6), and default routes via p's gateways; then
// more, if set, with a handle in the pod namespace and the pod interface.
func checkPod(host netlink.Link, p Pod, more func(ph *netlink.Handle, pod netlink.Link) error) error {
	ph, err := netlink.NewHandleAt(netns.NsHandle(p.NetnsFd), unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink in pod namespace: %w", err)
	}
	defer ph.Close()
	pod, err := ph.LinkByName(p.IfName)
	if err != nil {
		return fmt.Errorf("pod interface %s is missing: %w", p.IfName, err)
	}
	// For a veth, IFLA_LINK (ParentIndex) is the peer's index in the peer's namespace.
	if idx := host.Attrs().ParentIndex; idx != 0 && idx != pod.Attrs().Index {
		return fmt.Errorf("host veth %s is not the peer of pod interface %s", p.HostVeth, p.IfName)
	}
	if pod.Attrs().Flags&net.FlagUp == 0 {
		return fmt.Errorf("pod interface %s is down", p.IfName)
	}
	if p.MTU > 0 && pod.Attrs().MTU != p.MTU {
		return fmt.Errorf("pod interface %s has MTU %d, want %d", p.IfName, pod.Attrs().MTU, p.MTU)
	}
	for _, a := range p.ifAddrs() {
		if ok, err := hasAddr(ph, pod, a); err != nil || !ok {
			return fmt.Errorf("pod interface %s does not carry %s", p.IfName, a)
		}
	}
	if p.hasV6() {
		ll := LinkLocal(pod.Attrs().HardwareAddr)
		if ok, err := hasAddr(ph, pod, ll); err != nil || !ok {
			return fmt.Errorf("pod interface %s does not carry its link-local address %s", p.IfName, ll)
		}
	}
	for _, gw := range p.gateways() {
		routes, err := nldump.Retry(func() ([]netlink.Route, error) { return ph.RouteList(pod, family(gw)) })
		if err != nil {
			return fmt.Errorf("list pod routes: %w", err)
		}
		found := false
		for _, r := range routes {
			if (r.Dst == nil || isDefault(r.Dst)) && net.IP(gw.AsSlice()).Equal(r.Gw) {
				found = true
			}
		}
		if !found {
			return fmt.Errorf("pod has no default route via %s on %s", gw, p.IfName)
		}
	}
	if more != nil {
		return more(ph, pod)
	}
	return nil
}

func hasAddr(h *netlink.Handle, l netlink.Link, want netip.Prefix) (bool, error) {
	addrs, err := nldump.Retry(func() ([]netlink.Addr, error) { return h.AddrList(l, family(want.Addr())) })
	if err != nil {
		return false, err
	}
	for _, a := range addrs {
		if p, ok := netipx.Prefix(a.IPNet); ok && p == want {
			return true, nil
		}
	}
	return false, nil
}

// hasAddrOf reports whether l carries a, whatever its prefix length.
func hasAddrOf(h *netlink.Handle, l netlink.Link, a netip.Addr) (bool, error) {
	addrs, err := h.AddrList(l, family(a))
	if err != nil {
		return false, fmt.Errorf("list addresses of %s: %w", l.Attrs().Name, err)
	}
	for _, x := range addrs {
		if p, ok := netipx.Prefix(x.IPNet); ok && p.Addr() == a {
			return true, nil
		}
	}
	return false, nil
}

// Veths lists the host-side veths attached to bridge name (for GC).
func Veths(h *netlink.Handle, name string) ([]string, error) {
	br, err := lookup(h, name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil, nil
		}
		return nil, err
	}
	links, err := nldump.Retry(h.LinkList)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, l := range links {
		if _, ok := l.(*netlink.Veth); ok && l.Attrs().MasterIndex == br.Attrs().Index {
			out = append(out, l.Attrs().Name)
		}
	}
	return out, nil
}

// Status reports whether bridge name is usable: absent (ADD creates it) or an up bridge.
func Status(h *netlink.Handle, name string) error {
	br, err := lookup(h, name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return err
	}
	if br.Attrs().Flags&net.FlagUp == 0 {
		return fmt.Errorf("bridge %s is down", name)
	}
	return nil
}

func family(a netip.Addr) int {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

func defaultDst(gw netip.Addr) *net.IPNet {
	if gw.Is4() {
		return &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
	}
	return &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
}

func isDefault(n *net.IPNet) bool {
	ones, _ := n.Mask.Size()
	return ones == 0 && n.IP.IsUnspecified()
}

package bridge

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/netipx"
)

// LinkLocal is the link-local address a pod interface with MAC mac gets (the modified
// EUI-64 form, as the kernel's default would make it): the plugin assigns it itself, without
// duplicate address detection, so anti-spoofing knows it and it is usable at once.
func LinkLocal(mac net.HardwareAddr) netip.Prefix {
	var b [16]byte
	b[0], b[1] = 0xfe, 0x80
	if len(mac) == 6 {
		b[8], b[9], b[10] = mac[0]^0x02, mac[1], mac[2]
		b[11], b[12] = 0xff, 0xfe
		b[13], b[14], b[15] = mac[3], mac[4], mac[5]
	}
	return netip.PrefixFrom(netip.AddrFrom16(b), 64)
}

// bridgeLinkLocal is the link-local address the bridge l carrying IPv6 address gw needs:
// the one the kernel would give it (LinkLocal of its MAC), but without duplicate address
// detection. The node solicits a pod's neighbour entry for packets it forwards from that
// address; the kernel sends no solicitation while the bridge's link-local is tentative,
// and it is, for one to two seconds, from when the bridge first has a carrier (its first
// pod's veth): a pod's first IPv6 packets from another node waited that long.
func bridgeLinkLocal(l netlink.Link, gw netip.Prefix) (netip.Prefix, bool) {
	mac := l.Attrs().HardwareAddr
	if !gw.Addr().Is6() || len(mac) != 6 {
		return netip.Prefix{}, false
	}
	return LinkLocal(mac), true
}

// addrFlags are the flags of an address this package adds: IPv6 ones skip duplicate
// address detection (see the package comment).
func addrFlags(a netip.Addr) int {
	if a.Is6() {
		return unix.IFA_F_NODAD
	}
	return 0
}

func (p Pod) hasV6() bool { return p.Addr.Addr().Is6() || p.Addr6.IsValid() }

// addrs are the pod's addresses, the primary one first.
func (p Pod) addrs() []netip.Prefix {
	if p.Addr6.IsValid() {
		return []netip.Prefix{p.Addr, p.Addr6}
	}
	return []netip.Prefix{p.Addr}
}

// ifAddrs are the addresses the pod interface carries: addrs, as host prefixes for a
// routed pod.
func (p Pod) ifAddrs() []netip.Prefix {
	out := p.addrs()
	if p.Routed {
		for i, a := range out {
			out[i] = hostLen(a)
		}
	}
	return out
}

// gateways are the pod's default routes' gateways.
func (p Pod) gateways() []netip.Addr {
	var out []netip.Addr
	for _, g := range []netip.Addr{p.Gateway, p.Gateway6} {
		if g.IsValid() {
			out = append(out, g)
		}
	}
	return out
}

// addrGenModeNone is IN6_ADDR_GEN_MODE_NONE (linux/if_link.h): no automatic link-local.
const addrGenModeNone = 1

// setupV6 prepares both ends of a pod with IPv6, before either is up: neither generates a
// link-local address of its own (the host end needs none; the pod end gets LinkLocal of its
// MAC, added here without DAD, so the address anti-spoofing lets through is the one it
// has). IPv6 turned off in the pod namespace (disable_ipv6, as some runtimes leave it) is
// turned on for the pod interface.
func setupV6(h, ph *netlink.Handle, host *netlink.Veth, pod netlink.Link, p Pod) error {
	if err := h.LinkSetIP6AddrGenMode(host, addrGenModeNone); err != nil {
		return fmt.Errorf("turn off IPv6 address generation on %s: %w", p.HostVeth, err)
	}
	if err := ph.LinkSetIP6AddrGenMode(pod, addrGenModeNone); err != nil {
		return fmt.Errorf("turn off IPv6 address generation on %s in pod: %w", p.IfName, err)
	}
	ll := &netlink.Addr{IPNet: netipx.IPNet(LinkLocal(PodMAC(p.Addr.Addr()))), Flags: unix.IFA_F_NODAD}
	err := ph.AddrAdd(pod, ll)
	if errors.Is(err, syscall.EACCES) {
		// The kernel refuses IPv6 addresses while IPv6 is disabled on the device.
		if eerr := enableIPv6(p.NetnsFd, p.IfName); eerr != nil {
			return fmt.Errorf("add %s to %s: %w (enabling IPv6 there: %v)", ll.IPNet, p.IfName, err, eerr)
		}
		err = ph.AddrAdd(pod, ll)
	}
	if err != nil && !errors.Is(err, syscall.EEXIST) {
		return fmt.Errorf("add %s to %s: %w", ll.IPNet, p.IfName, err)
	}
	return nil
}

// enableIPv6 clears disable_ipv6 of ifName in the namespace netnsFd. The sysctl is only
// reachable from inside the namespace.
func enableIPv6(netnsFd int, ifName string) error {
	return inNS(netns.NsHandle(netnsFd), func() error {
		return writeSysctl("/proc/sys/net/ipv6/conf/"+ifName+"/disable_ipv6", "0")
	})
}

// ensureSysctl writes v to the sysctl file p unless it holds v already (the common case is
// one small read).
func ensureSysctl(p, v string) error {
	b, err := os.ReadFile(p)
	if err == nil && strings.TrimSpace(string(b)) == v {
		return nil
	}
	return writeSysctl(p, v)
}

func writeSysctl(p, v string) error {
	if err := os.WriteFile(p, []byte(v), 0o644); err != nil {
		return fmt.Errorf("set %s: %w", strings.TrimPrefix(p, "/proc/sys/"), err)
	}
	return nil
}

// usableWait bounds Usable: the kernel's work item runs in milliseconds even on a busy node.
const usableWait = 10 * time.Second

// Usable waits until the pod's kernel takes each of w's IPv6 addresses as its own. It
// installs an IPv6 address's local route from a work item, after the address is added or
// its link gets a carrier (also without duplicate address detection, also on a busy node
// later than ADD would return), and drops packets for the address until then: a routed
// pod, which the node reaches through a permanent neighbour entry, lost the first packet
// from another node (a bridged pod's neighbour solicitation is retried, and hid it).
func Usable(pn *PodNS, w Wired) error {
	if len(w.V6) == 0 {
		return nil
	}
	return waitLocal(pn.H, w.V6, usableWait)
}

// waitLocal waits up to limit until the kernel behind h routes each of addrs locally.
func waitLocal(h *netlink.Handle, addrs []netip.Addr, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	pause := 50 * time.Microsecond
	for _, a := range addrs {
		for {
			rs, err := h.RouteGet(a.AsSlice())
			if err != nil && !errors.Is(err, syscall.ENETUNREACH) {
				return fmt.Errorf("look up the route to %s: %w", a, err)
			}
			if len(rs) > 0 && rs[0].Type == unix.RTN_LOCAL {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("the kernel did not take %s as a local address within %s", a, limit)
			}
			time.Sleep(pause)
			pause = min(2*pause, 5*time.Millisecond)
		}
	}
	return nil
}

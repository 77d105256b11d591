package docker

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/nldump"
)

// SkipDAD makes the IPv6 addresses of Docker's bridge dev usable at once: it turns off
// duplicate address detection on dev (accept_dad, for the addresses to come: the kernel's
// own link-local appears with the bridge's first carrier), and adds again without DAD each
// address still tentative; the re-added ones are returned. It must run in dev's network
// namespace (the sysctl is the caller's). Docker adds the bridge's gateway and link-local addresses with DAD, and DAD
// waits for the bridge's first carrier, its first container. For one to two seconds from
// then the containers could not resolve their IPv6 gateway, and the node sent no neighbour
// solicitation for a container it forwards to (the kernel sends none while the bridge's
// link-local is tentative). The bridge's subnet is leased to this node, so nobody else can
// hold its gateway; a tentative address is unusable anyway, so removing it for the moment
// of the re-add breaks nothing that worked. An address that failed DAD is left alone.
func SkipDAD(h *netlink.Handle, dev string) ([]netip.Prefix, error) {
	l, err := h.LinkByName(dev)
	if err != nil {
		return nil, fmt.Errorf("docker bridge %s: %w", dev, err)
	}
	if dev == "." || dev == ".." || strings.Contains(dev, "/") {
		return nil, fmt.Errorf("docker bridge %q: not a device name", dev)
	}
	if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+dev+"/accept_dad", []byte("0"), 0); err != nil {
		return nil, fmt.Errorf("turn off duplicate address detection on %s: %w", dev, err)
	}
	addrs, err := nldump.Retry(func() ([]netlink.Addr, error) { return h.AddrList(l, netlink.FAMILY_V6) })
	if err != nil {
		return nil, fmt.Errorf("addresses of %s: %w", dev, err)
	}
	var done []netip.Prefix
	for _, a := range addrs {
		if a.Flags&unix.IFA_F_TENTATIVE == 0 || a.Flags&(unix.IFA_F_NODAD|unix.IFA_F_DADFAILED) != 0 {
			continue
		}
		ip, _ := netip.AddrFromSlice(a.IP)
		ones, _ := a.Mask.Size()
		p := netip.PrefixFrom(ip, ones)
		if err := h.AddrDel(l, &a); err != nil && !errors.Is(err, syscall.EADDRNOTAVAIL) {
			return done, fmt.Errorf("remove tentative %s from %s: %w", p, dev, err)
		}
		// Flags the kernel sets itself (tentative, permanent) are not ours to pass back.
		keep := a.Flags & (unix.IFA_F_NOPREFIXROUTE | unix.IFA_F_HOMEADDRESS | unix.IFA_F_MANAGETEMPADDR)
		re := &netlink.Addr{IPNet: a.IPNet, Flags: keep | unix.IFA_F_NODAD, Scope: a.Scope}
		if err := h.AddrAdd(l, re); err != nil && !errors.Is(err, syscall.EEXIST) {
			return done, fmt.Errorf("add %s to %s without DAD: %w", p, dev, err)
		}
		done = append(done, p)
	}
	return done, nil
}

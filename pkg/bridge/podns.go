package bridge

import (
	"fmt"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// PodNS is one ADD's way into a pod's network namespace: a netlink handle and a socket
// there, both made in a single visit. Entering a namespace and leaving it again costs a
// plugin process more than the netlink requests a pod needs (BENCHMARKS.md), and ADD
// needs the namespace three times (configure the pod end, Up, Usable).
type PodNS struct {
	H    *netlink.Handle // netlink in the pod's namespace
	sock int             // a datagram socket there, for the link-state ioctl (Up)
}

// OpenPodNS opens handle and socket in the network namespace podNS.
func OpenPodNS(podNS netns.NsHandle) (*PodNS, error) {
	var p *PodNS
	err := inNS(podNS, func() error {
		h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return fmt.Errorf("netlink in pod namespace: %w", err)
		}
		s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			h.Close()
			return fmt.Errorf("socket in pod namespace: %w", err)
		}
		p = &PodNS{H: h, sock: s}
		return nil
	})
	return p, err
}

// Close closes handle and socket.
func (p *PodNS) Close() {
	p.H.Close()
	unix.Close(p.sock)
}

// inNS runs fn inside the network namespace podNS, on a locked OS thread of its own that
// is discarded if it cannot get back (containernetworking's ns.Do), so no other goroutine
// ever runs in the pod's namespace.
func inNS(podNS netns.NsHandle, fn func() error) error {
	n, err := ns.GetNS(fmt.Sprintf("/proc/self/fd/%d", int(podNS)))
	if err != nil {
		return fmt.Errorf("pod namespace: %w", err)
	}
	defer n.Close()
	return n.Do(func(ns.NetNS) error { return fn() })
}

package bridge

import (
	"fmt"
	"runtime"

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

// OpenPodNS opens handle and socket in the network namespace ns. The visit runs on a
// locked OS thread of its own, which is discarded (never unlocked) if it cannot get back
// to the namespace it came from, so no other goroutine ever runs in the pod's namespace.
func OpenPodNS(ns netns.NsHandle) (*PodNS, error) {
	type result struct {
		p   *PodNS
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("this thread's network namespace: %w", err)}
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("enter pod namespace: %w", err)}
			return
		}
		p, err := openHere()
		if serr := netns.Set(orig); serr != nil {
			if p != nil {
				p.Close()
			}
			done <- result{err: fmt.Errorf("leave pod namespace: %w", serr)} // the thread stays locked: it ends with this goroutine
			return
		}
		runtime.UnlockOSThread()
		done <- result{p, err}
	}()
	r := <-done
	return r.p, r.err
}

// openHere makes the handle and socket in the calling thread's namespace.
func openHere() (*PodNS, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink in pod namespace: %w", err)
	}
	s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("socket in pod namespace: %w", err)
	}
	return &PodNS{H: h, sock: s}, nil
}

// Close closes handle and socket.
func (p *PodNS) Close() {
	p.H.Close()
	unix.Close(p.sock)
}

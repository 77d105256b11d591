// Package nlbatch writes routes and neighbour entries to the kernel many requests to a
// system call, with each request's own outcome.
//
// Why: a full pass at thousands of peers is tens of thousands of writes, and a request and
// its acknowledgement cost two system calls, plus a getsockname per request in
// github.com/vishvananda/netlink (it checks the reply's port): on the virtual machines
// netagent runs on, the system calls cost more than the kernel's work (BENCHMARKS.md). The
// kernel takes any number of requests in one datagram, runs them in order, and acknowledges
// each; no netlink library here sends a batch and reports per request (mdlayher/netlink
// reports a failed acknowledgement without its sequence number).
//
// The messages are the ones vishvananda/netlink builds for the same values, for the fields
// the reconcilers use (the test compares what each writes); framing is pkg/nlattr's.
package nlbatch

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/nlattr"
)

// perSend is how many requests go in one datagram: their acknowledgements (a few hundred
// bytes of socket buffer each) must fit the receive buffer.
const perSend = 128

// Conn is a netlink route socket in the namespace it was opened in.
type Conn struct {
	mu  sync.Mutex
	fd  int
	seq uint32
	buf []byte // acknowledgements
	out []byte // a datagram of requests, reused
}

// Open opens a socket in the calling thread's network namespace.
func Open() (*Conn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	c := &Conn{fd: fd, seq: uint32(time.Now().UnixNano()), buf: make([]byte, 1<<16)}
	if err := c.setup(); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return c, nil
}

func (c *Conn) setup() error {
	if err := unix.Bind(c.fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("netlink bind: %w", err)
	}
	// An error's acknowledgement without a copy of the request; and no wait forever for an
	// acknowledgement the kernel never sends.
	if err := unix.SetsockoptInt(c.fd, unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1); err != nil {
		return fmt.Errorf("netlink NETLINK_CAP_ACK: %w", err)
	}
	if err := unix.SetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 1<<20); err != nil {
		return fmt.Errorf("netlink SO_RCVBUF: %w", err)
	}
	tv := unix.NsecToTimeval(int64(10 * time.Second))
	if err := unix.SetsockoptTimeval(c.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return fmt.Errorf("netlink SO_RCVTIMEO: %w", err)
	}
	return nil
}

// Close closes the socket.
func (c *Conn) Close() error { return unix.Close(c.fd) }

// ReplaceRoutes sets n routes (create or replace), as netlink.RouteReplace; route(i) is
// called as request i is encoded (a caller with thousands need not build them all first),
// and errs[i] is its outcome.
func (c *Conn) ReplaceRoutes(n int, route func(i int) *netlink.Route) []error {
	return c.each(n, func(i int, b []byte) ([]byte, uint16, uint16, error) {
		b, err := routeMsg(b, route(i), false)
		return b, unix.RTM_NEWROUTE, unix.NLM_F_CREATE | unix.NLM_F_REPLACE, err
	})
}

// DeleteRoutes deletes n routes, as netlink.RouteDel.
func (c *Conn) DeleteRoutes(n int, route func(i int) *netlink.Route) []error {
	return c.each(n, func(i int, b []byte) ([]byte, uint16, uint16, error) {
		b, err := routeMsg(b, route(i), true)
		return b, unix.RTM_DELROUTE, 0, err
	})
}

// SetNeighs sets n neighbour or FDB entries (create or replace), as netlink.NeighSet.
func (c *Conn) SetNeighs(n int, neigh func(i int) *netlink.Neigh) []error {
	return c.each(n, func(i int, b []byte) ([]byte, uint16, uint16, error) {
		b, err := neighMsg(b, neigh(i))
		return b, unix.RTM_NEWNEIGH, unix.NLM_F_CREATE | unix.NLM_F_REPLACE, err
	})
}

// each sends n requests, perSend to a datagram, and returns each one's outcome; msg
// appends request i's body to b.
func (c *Conn) each(n int, msg func(i int, b []byte) ([]byte, uint16, uint16, error)) []error {
	c.mu.Lock()
	defer c.mu.Unlock()
	errs := make([]error, n)
	pending := map[uint32]int{} // sequence number -> request
	for from := 0; from < n; from += perSend {
		out := c.out[:0]
		clear(pending)
		for i := from; i < min(from+perSend, n); i++ {
			start := len(out)
			out = append(out, make([]byte, unix.SizeofNlMsghdr)...)
			var typ, flags uint16
			var err error
			if out, typ, flags, err = msg(i, out); err != nil {
				out, errs[i] = out[:start], err
				continue
			}
			c.seq++
			h := unix.NlMsghdr{
				Len:   uint32(len(out) - start),
				Type:  typ,
				Flags: unix.NLM_F_REQUEST | unix.NLM_F_ACK | flags,
				Seq:   c.seq,
			}
			copy(out[start:], unsafe.Slice((*byte)(unsafe.Pointer(&h)), unix.SizeofNlMsghdr))
			pending[c.seq] = i
		}
		c.out = out
		if len(pending) == 0 {
			continue
		}
		if err := unix.Sendto(c.fd, out, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
			for _, i := range pending {
				errs[i] = fmt.Errorf("netlink send: %w", err)
			}
			continue
		}
		if err := c.acks(pending, errs); err != nil {
			for _, i := range pending {
				errs[i] = err
			}
		}
	}
	return errs
}

// acks reads acknowledgements until every pending request has one.
func (c *Conn) acks(pending map[uint32]int, errs []error) error {
	for len(pending) > 0 {
		k, from, err := unix.Recvfrom(c.fd, c.buf, 0)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			// ENOBUFS (acknowledgements lost) or the timeout: the outcome is unknown.
			return fmt.Errorf("netlink receive: %w", err)
		}
		if sa, ok := from.(*unix.SockaddrNetlink); !ok || sa.Pid != 0 {
			continue // not the kernel's
		}
		msgs, err := syscall.ParseNetlinkMessage(c.buf[:k])
		if err != nil {
			return fmt.Errorf("netlink receive: %w", err)
		}
		for _, m := range msgs {
			i, ok := pending[m.Header.Seq]
			if !ok || m.Header.Type != unix.NLMSG_ERROR || len(m.Data) < 4 {
				continue
			}
			delete(pending, m.Header.Seq)
			if code := int32(nl.NativeEndian().Uint32(m.Data[:4])); code != 0 {
				errs[i] = unix.Errno(-code)
			}
		}
	}
	return nil
}

// routeMsg appends the rtmsg and attributes vishvananda/netlink sends for r (RouteReplace,
// or RouteDel when del) to b. It writes the fields the route reconciler sets: destination,
// gateway or cross-family next hop, device, MTU, flags, table, protocol and scope; a route
// with a field that changes which route it is (source, type, priority, TOS, encapsulation,
// multipath, MPLS, a table above 255) is refused rather than written as another route.
// Other metrics than the MTU are not written.
func routeMsg(b []byte, r *netlink.Route, del bool) ([]byte, error) {
	if r.Dst == nil || r.Src != nil || r.MPLSDst != nil || r.NewDst != nil || r.Encap != nil || r.MultiPath != nil ||
		r.Priority != 0 || r.Type != 0 || r.Tos != 0 || r.Table < 0 || r.Table > 255 || r.MTULock || r.AdvMSS != 0 || r.Hoplimit != 0 {
		return b, fmt.Errorf("nlbatch: route %v uses a field this encoder does not write", r)
	}
	ones, _ := r.Dst.Mask.Size()
	family, dst := unix.AF_INET, r.Dst.IP.To4()
	if dst == nil {
		family, dst = unix.AF_INET6, r.Dst.IP.To16()
	}
	if dst == nil {
		return b, fmt.Errorf("nlbatch: route destination %v", r.Dst)
	}
	attrs := []nlattr.Attr{nlattr.Bytes(unix.RTA_DST, dst)}
	if r.Gw != nil {
		gw := r.Gw.To4()
		if (gw == nil) != (family == unix.AF_INET6) {
			return b, fmt.Errorf("nlbatch: route %v: gateway of the other family (use Via)", r.Dst)
		}
		if gw == nil {
			gw = r.Gw.To16()
		}
		attrs = append(attrs, nlattr.Bytes(unix.RTA_GATEWAY, gw))
	}
	if r.Via != nil {
		v, err := r.Via.Encode()
		if err != nil {
			return b, fmt.Errorf("nlbatch: route %v: %w", r.Dst, err)
		}
		attrs = append(attrs, nlattr.Bytes(unix.RTA_VIA, v))
	}
	if r.MTU > 0 {
		attrs = append(attrs, nlattr.Nest(unix.RTA_METRICS, nlattr.Bytes(unix.RTAX_MTU, nl.Uint32Attr(uint32(r.MTU)))))
	}
	attrs = append(attrs, nlattr.Bytes(unix.RTA_OIF, nl.Uint32Attr(uint32(r.LinkIndex))))
	table := unix.RT_TABLE_MAIN
	if r.Table > 0 {
		table = r.Table
	}
	m := unix.RtMsg{
		Family:   uint8(family),
		Dst_len:  uint8(ones),
		Table:    uint8(table),
		Protocol: uint8(r.Protocol),
		Scope:    uint8(r.Scope),
		Type:     unix.RTN_UNICAST,
		Flags:    uint32(r.Flags),
	}
	if del {
		m.Type = unix.RTN_UNSPEC // any type, as netlink.RouteDel: the kernel matches a given one
	}
	return nlattr.Append(append(b, unsafe.Slice((*byte)(unsafe.Pointer(&m)), unix.SizeofRtMsg)...), attrs), nil
}

// neighMsg appends the ndmsg and attributes vishvananda/netlink sends for n (NeighSet) to
// b, for the fields the VXLAN reconciler sets (a family must be given).
func neighMsg(b []byte, n *netlink.Neigh) ([]byte, error) {
	if n.Family == 0 || n.Vlan != 0 || n.VNI != 0 || n.MasterIndex != 0 || n.LLIPAddr != nil || n.Type != 0 || n.FlagsExt != 0 {
		return b, fmt.Errorf("nlbatch: neighbour %v uses a field this encoder does not write", n)
	}
	ip := n.IP.To4()
	if ip == nil {
		ip = n.IP.To16()
	}
	if ip == nil {
		return b, fmt.Errorf("nlbatch: neighbour address %v", n.IP)
	}
	attrs := []nlattr.Attr{nlattr.Bytes(unix.NDA_DST, ip)}
	if n.HardwareAddr != nil {
		attrs = append(attrs, nlattr.Bytes(unix.NDA_LLADDR, []byte(net.HardwareAddr(n.HardwareAddr))))
	}
	m := unix.NdMsg{
		Family:  uint8(n.Family),
		Ifindex: int32(n.LinkIndex),
		State:   uint16(n.State),
		Flags:   uint8(n.Flags),
	}
	return nlattr.Append(append(b, unsafe.Slice((*byte)(unsafe.Pointer(&m)), unix.SizeofNdMsg)...), attrs), nil
}

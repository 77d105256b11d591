package bridge

import (
	"encoding/binary"
	"fmt"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/nlattr"
)

// linux/netconf.h, which golang.org/x/sys does not carry.
const (
	netconfaIfindex    = 1
	netconfaForwarding = 2
	netconfaIfindexAll = ^uint32(0) // -1: the "all" settings
)

// forwardingSysctl is the file that turns forwarding on for a family.
var forwardingSysctl = map[int]string{
	unix.AF_INET:  "/proc/sys/net/ipv4/ip_forward",
	unix.AF_INET6: "/proc/sys/net/ipv6/conf/all/forwarding",
}

// EnsureForwarding turns on forwarding in the current network namespace for IPv4 and, with
// ipv6, for IPv6, which a node routing its pods needs. It asks the kernel over netlink
// (RTM_GETNETCONF, both families in one datagram) and writes the sysctl only where
// forwarding is off: a plugin process's first look-up of a /proc/sys file costs it more
// than the netlink round trip (BENCHMARKS.md), and this runs on every ADD. Hand-written:
// vishvananda/netlink has no netconf call, and its NetlinkRequest.Execute (a socket with
// its options per request) made the check three times as long. Note that with
// IPv6 forwarding on, the kernel ignores router advertisements on interfaces whose
// accept_ra is 1 (not 2): a node that learns its own IPv6 default route from RAs needs
// accept_ra=2.
func EnsureForwarding(ipv6 bool) error {
	fams := []int{unix.AF_INET}
	if ipv6 {
		fams = append(fams, unix.AF_INET6)
	}
	on, err := forwardingOn(fams)
	for _, f := range fams {
		if err != nil {
			// A kernel that does not answer: read the file, as before netlink could tell.
			if serr := ensureSysctl(forwardingSysctl[f], "1"); serr != nil {
				return fmt.Errorf("%w (netlink: %v)", serr, err)
			}
			continue
		}
		if !on[f] {
			if err := writeSysctl(forwardingSysctl[f], "1"); err != nil {
				return err
			}
		}
	}
	return nil
}

// forwardingOn reports, per family of fams, whether the current network namespace
// forwards it (the "all" setting, as the sysctl files show it).
func forwardingOn(fams []int) (map[int]bool, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	defer unix.Close(fd)
	tv := unix.NsecToTimeval(int64(10 * time.Second))
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return nil, fmt.Errorf("netlink SO_RCVTIMEO: %w", err)
	}
	var req []byte
	for i, f := range fams {
		// struct netconfmsg (the family, padded to 4) and NETCONFA_IFINDEX "all".
		body := nlattr.Append([]byte{byte(f), 0, 0, 0}, []nlattr.Attr{
			nlattr.Bytes(netconfaIfindex, binary.NativeEndian.AppendUint32(nil, netconfaIfindexAll)),
		})
		h := make([]byte, unix.SizeofNlMsghdr)
		binary.NativeEndian.PutUint32(h[0:], uint32(len(h)+len(body)))
		binary.NativeEndian.PutUint16(h[4:], unix.RTM_GETNETCONF)
		binary.NativeEndian.PutUint16(h[6:], unix.NLM_F_REQUEST)
		binary.NativeEndian.PutUint32(h[8:], uint32(i+1))
		req = append(append(req, h...), body...)
	}
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("netlink send: %w", err)
	}
	out := map[int]bool{}
	buf := make([]byte, 4096)
	for answered := 0; answered < len(fams); {
		n, from, err := unix.Recvfrom(fd, buf, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("netlink receive: %w", err)
		}
		if sa, ok := from.(*unix.SockaddrNetlink); !ok || sa.Pid != 0 {
			continue // not the kernel's
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return nil, fmt.Errorf("netlink receive: %w", err)
		}
		for _, m := range msgs {
			seq := int(m.Header.Seq)
			if seq < 1 || seq > len(fams) {
				continue
			}
			switch m.Header.Type {
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if code := int32(binary.NativeEndian.Uint32(m.Data)); code != 0 {
						return nil, fmt.Errorf("netconf of family %d: %w", fams[seq-1], unix.Errno(-code))
					}
				}
			case unix.RTM_NEWNETCONF:
				if len(m.Data) < 4 {
					return nil, fmt.Errorf("netconf of family %d: short answer", fams[seq-1])
				}
				v, ok := nlattr.Get(nlattr.Parse(m.Data[4:]), netconfaForwarding)
				if !ok || len(v) != 4 {
					return nil, fmt.Errorf("netconf of family %d: no forwarding attribute", fams[seq-1])
				}
				out[fams[seq-1]] = binary.NativeEndian.Uint32(v) != 0
				answered++
			}
		}
	}
	return out, nil
}

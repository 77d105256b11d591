package antispoof

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/nlattr"
)

// The kernel boundary: nftables messages over one plain, blocking netlink socket.
//
// Why not github.com/google/nftables, which the agent's VXLAN allow-list uses: this package
// runs inside the CNI plugin, a process started for every ADD and DEL, where the library's
// package initialisation at every start, its socket set-up and its receive path through the
// Go poller cost several times this one-element transaction (BENCHMARKS.md, CNI plugin,
// after pod anti-spoofing). The library stays the reference: a test compares
// the messages built here with the ones it builds, and another compares `nft list` of what
// this package installs with the expected rule set.

// attr is one netlink attribute (pkg/nlattr is the codec).
type attr = nlattr.Attr

func str(typ uint16, s string) attr { return nlattr.String(typ, s) }
func u32(typ uint16, v uint32) attr {
	return nlattr.Bytes(typ, binary.BigEndian.AppendUint32(nil, v))
}
func raw(typ uint16, b []byte) attr      { return nlattr.Bytes(typ, b) }
func nest(typ uint16, kids ...attr) attr { return nlattr.Nest(typ, kids...) }

// msg is one nftables message: type (unix.NFT_MSG_*), flags beyond NLM_F_REQUEST, and the
// attributes after the nfgenmsg header (family bridge).
type msg struct {
	typ   uint16
	flags uint16
	attrs []attr
	fam   uint8 // the nftables family; 0 is bridge (the pods' bridge table)
}

func (m msg) body() []byte {
	fam := m.fam
	if fam == 0 {
		fam = unix.NFPROTO_BRIDGE
	}
	return nlattr.Append([]byte{fam, unix.NFNETLINK_V0, 0, 0}, m.attrs)
}

func appendNlmsg(b []byte, typ, flags uint16, seq uint32, body []byte) []byte {
	b = binary.NativeEndian.AppendUint32(b, uint32(unix.SizeofNlMsghdr+len(body)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = binary.NativeEndian.AppendUint16(b, flags)
	b = binary.NativeEndian.AppendUint32(b, seq)
	b = binary.NativeEndian.AppendUint32(b, 0) // port: the kernel's
	return append(b, body...)
}

// batchHeader is the body of the batch begin and end messages: the nftables subsystem.
var batchHeader = []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, unix.NFNL_SUBSYS_NFTABLES}

// conn is a netfilter netlink socket in the network namespace of the calling thread.
type conn struct {
	fd  int
	seq uint32
	buf []byte
}

func dial(ctx context.Context) (*conn, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, fmt.Errorf("nftables socket: %w", err)
	}
	// The kernel answers within sendto; the timeout only guards against the unexpected.
	tv := unix.NsecToTimeval((10 * time.Second).Nanoseconds())
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	return &conn{fd: fd, seq: uint32(time.Now().UnixNano()), buf: make([]byte, 64<<10)}, nil
}

func (c *conn) close() { unix.Close(c.fd) }

// transact sends msgs as one transaction (a batch: all or nothing) and returns nil when
// the kernel committed it, else the first error it reports (a syscall.Errno:
// syscall.ENOENT for a missing table, set or element).
func (c *conn) transact(msgs []msg) error {
	if len(msgs) == 0 {
		return nil
	}
	c.seq++
	b := appendNlmsg(nil, unix.NFNL_MSG_BATCH_BEGIN, unix.NLM_F_REQUEST, c.seq, batchHeader)
	first := c.seq + 1
	for i, m := range msgs {
		c.seq++
		// Only the last message asks for an acknowledgement: the kernel reports a failed
		// message anyway, queues every answer until the batch is committed or aborted, and
		// sends them in order, so the last one's says the rest went through. One receive
		// instead of one per message (a chain of rules is a message per rule).
		flags := unix.NLM_F_REQUEST | m.flags
		if i == len(msgs)-1 {
			flags |= unix.NLM_F_ACK
		}
		b = appendNlmsg(b, unix.NFNL_SUBSYS_NFTABLES<<8|m.typ, uint16(flags), c.seq, m.body())
	}
	last := c.seq
	c.seq++
	b = appendNlmsg(b, unix.NFNL_MSG_BATCH_END, unix.NLM_F_REQUEST, c.seq, batchHeader)
	if err := unix.Sendto(c.fd, b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("nftables send: %w", err)
	}
	for {
		ms, err := c.receive()
		if err != nil {
			return err
		}
		for _, m := range ms {
			if m.Header.Type != unix.NLMSG_ERROR || m.Header.Seq < first-1 || m.Header.Seq > c.seq {
				continue
			}
			if err := ackError(m); err != nil {
				return err
			}
			if m.Header.Seq == last {
				return nil // acknowledgements come in order: this is the last one
			}
		}
	}
}

// dump sends a get request (with NLM_F_DUMP when all) and returns the bodies of the
// answers (after their nfgenmsg header).
func (c *conn) dump(typ uint16, all bool, attrs []attr) ([][]byte, error) {
	return c.dumpFam(0, typ, all, attrs)
}

// dumpFam is dump in nftables family fam (0: bridge).
func (c *conn) dumpFam(fam uint8, typ uint16, all bool, attrs []attr) ([][]byte, error) {
	c.seq++
	flags := uint16(unix.NLM_F_REQUEST | unix.NLM_F_ACK)
	if all {
		flags |= unix.NLM_F_DUMP
	}
	b := appendNlmsg(nil, unix.NFNL_SUBSYS_NFTABLES<<8|typ, flags, c.seq, msg{attrs: attrs, fam: fam}.body())
	if err := unix.Sendto(c.fd, b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("nftables send: %w", err)
	}
	var out [][]byte
	for {
		ms, err := c.receive()
		if err != nil {
			return nil, err
		}
		for _, m := range ms {
			if m.Header.Seq != c.seq {
				continue
			}
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return out, nil
			case unix.NLMSG_ERROR:
				if err := ackError(m); err != nil || !all {
					return out, err // a non-dump request ends with its acknowledgement
				}
			default:
				if len(m.Data) >= 4 {
					out = append(out, bytes.Clone(m.Data[4:])) // the next receive reuses the buffer
				}
			}
		}
	}
}

func (c *conn) receive() ([]syscall.NetlinkMessage, error) {
	for {
		n, _, err := unix.Recvfrom(c.fd, c.buf, unix.MSG_TRUNC)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("nftables receive: %w", err)
		}
		if n > len(c.buf) {
			return nil, fmt.Errorf("nftables receive: message of %d bytes truncated", n)
		}
		ms, err := syscall.ParseNetlinkMessage(c.buf[:n])
		if err != nil {
			return nil, fmt.Errorf("nftables receive: %w", err)
		}
		return ms, nil
	}
}

func ackError(m syscall.NetlinkMessage) error {
	if len(m.Data) < 4 {
		return fmt.Errorf("nftables: short error message")
	}
	if errno := -int32(binary.NativeEndian.Uint32(m.Data[:4])); errno != 0 {
		return syscall.Errno(errno)
	}
	return nil
}

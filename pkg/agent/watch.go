package agent

import (
	"bytes"
	"context"
	"encoding/binary"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/nlattr"
)

// nfnlgrpNftables is the netfilter netlink multicast group for nftables ruleset changes
// (NFNLGRP_NFTABLES). iptables-nft changes arrive there too, so the agent hears of a
// deleted chain or a reordered jump at once, without polling iptables.
const nfnlgrpNftables = 7

// watchFirewall signals on every ruleset change until ctx ends: nftDirty for netagent's
// ip-family table (the VXLAN allow-list), podDirty for its bridge-family one (pod
// anti-spoofing, which the CNI plugin changes with every pod), fwDirty for any other
// (iptables' tables, checked by running iptables-save).
// Without the subscription (legacy iptables, or an old kernel) the resync ticker is the
// fallback.
func watchFirewall(ctx context.Context, log *slog.Logger, fwDirty, nftDirty, podDirty chan struct{}) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
	if err != nil {
		log.Warn("no firewall change notifications; relying on the resync ticker", "err", err)
		return
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: 1 << (nfnlgrpNftables - 1)}); err != nil {
		unix.Close(fd)
		log.Warn("no firewall change notifications; relying on the resync ticker", "err", err)
		return
	}
	defer unix.Close(fd)
	// A receive buffer for a cold start's own allow-list (forced past rmem_max, we have
	// CAP_NET_ADMIN): thousands of peers' set elements echo as tens of thousands of
	// notifications at once, and an overflow counts as "anything may have changed", a
	// second full pass (as the route and neighbour subscriptions, dataplane.Watch).
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20); err != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 8<<20)
	}
	// A blocked recv is not woken by close(2), so wake up twice a second to check ctx.
	tv := unix.NsecToTimeval((500 * time.Millisecond).Nanoseconds())
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	buf := make([]byte, 1<<16)
	var ev nftEvents
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			if err == unix.EINTR || err == unix.EAGAIN {
				continue
			}
			if err == unix.ENOBUFS {
				ev = nftEvents{}
				signal(fwDirty)
				signal(nftDirty)
				signal(podDirty)
				continue
			}
			log.Warn("firewall notifications stopped; relying on the resync ticker", "err", err)
			return
		}
		ip, bridge, others := ev.feed(buf[:n])
		if ip {
			signal(nftDirty)
		}
		if bridge {
			signal(podDirty)
		}
		if others {
			signal(fwDirty)
		}
	}
}

// nftEvents sorts nftables notifications by transaction. The kernel sends one message
// per changed object and then a generation message naming the thread that committed the
// transaction; transactions of this process (the VXLAN allow-list writing its set) are
// dropped, the others report whether they touched a table named "netagent" (ours) or any
// other table. Anything unparsable counts as "others": one extra check, never a missed one.
type nftEvents struct {
	pendIP, pendBridge, pendOthers bool
}

// ownTransaction reports whether a generation message names a thread of this process as
// the committer. The kernel gives the thread's id as seen from the host and its command
// name: the id is found under /proc/self/task when we share the host's PID namespace (the
// lab, a plain process); in a pod with its own PID namespace (the DaemonSet) only the name
// tells, so another `netagent` command's change is taken as ours too (the resync covers it).
func ownTransaction(msg []byte) bool {
	const genProcPID, genProcName = 2, 3 // NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME
	if pid := attr(msg, genProcPID); len(pid) == 4 {
		if _, err := os.Stat("/proc/self/task/" + strconv.FormatUint(uint64(binary.BigEndian.Uint32(pid)), 10)); err == nil {
			return true
		}
	}
	name := attr(msg, genProcName)
	return len(name) > 0 && selfComm != "" && string(bytes.TrimRight(name, "\x00")) == selfComm
}

// selfComm is this process's command name as the kernel reports it (at most 15 bytes).
var selfComm = func() string {
	b, _ := os.ReadFile("/proc/self/comm")
	return strings.TrimSpace(string(b))
}()

// feed returns whether the completed transactions touched netagent's ip table (the VXLAN
// allow-list), its bridge or netdev table (pod anti-spoofing) and anything else.
//
// It allocates nothing: a cold start's own allow-list echoes as tens of thousands of
// messages, and parsing them into slices left megabytes of garbage.
func (e *nftEvents) feed(b []byte) (ip, bridge, others bool) {
	const newGen = 15 // NFT_MSG_NEWGEN
	if !eachMessage(b, nil) {
		return true, true, true
	}
	eachMessage(b, func(typ uint16, body []byte) {
		if typ&0xff != newGen {
			switch name := attr(body, 1); {
			case name == nil || string(bytes.TrimRight(name, "\x00")) != "netagent":
				e.pendOthers = true
			case len(body) > 0 && (body[0] == unix.NFPROTO_BRIDGE || body[0] == unix.NFPROTO_NETDEV): // nfgenmsg.nfgen_family
				e.pendBridge = true // pod anti-spoofing: the bridge set, or the routed pods' chains
			default:
				e.pendIP = true
			}
			return
		}
		if !ownTransaction(body) {
			ip, bridge, others = ip || e.pendIP, bridge || e.pendBridge, others || e.pendOthers
		}
		e.pendIP, e.pendBridge, e.pendOthers = false, false, false
	})
	return ip, bridge, others
}

// eachMessage calls f (if not nil) with the type and body of each netlink message in b, as
// syscall.ParseNetlinkMessage splits them; it reports whether b is well-formed (checked
// before f sees anything only when the caller asks with f nil first).
func eachMessage(b []byte, f func(typ uint16, body []byte)) bool {
	for len(b) >= unix.SizeofNlMsghdr {
		n := int(binary.NativeEndian.Uint32(b))
		aligned := (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1)
		if n < unix.SizeofNlMsghdr || aligned > len(b) {
			return false
		}
		if f != nil {
			f(binary.NativeEndian.Uint16(b[4:]), b[unix.SizeofNlMsghdr:n])
		}
		b = b[aligned:]
	}
	return true
}

// attr is attribute typ of an nftables message body (after its 4-byte nfgenmsg), or nil.
// Every table, chain, rule, set and element message carries its table's name as
// attribute 1.
func attr(msg []byte, typ uint16) []byte {
	if len(msg) < 4 {
		return nil
	}
	a, _ := nlattr.Find(msg[4:], typ)
	return a
}

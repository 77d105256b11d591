package wireguard_test

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net/netip"
	"regexp"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/netagent/netagent/test/netns"
	"golang.org/x/sys/unix"
)

// pinger is a 10 ms ping running in a namespace, to measure what a transition loses.
type pinger struct {
	t    testing.TB
	stop func() error
	done chan struct{}
	mu   sync.Mutex
	rx   []float64 // reply times (unix seconds, from ping -D)
	seqs map[int]bool
}

func startPing(t testing.TB, from *netns.NS, dst netip.Addr) *pinger {
	t.Helper()
	return startPingEvery(t, from, dst, 10*time.Millisecond)
}

// startPingEvery is startPing with another interval.
func startPingEvery(t testing.TB, from *netns.NS, dst netip.Addr, every time.Duration) *pinger {
	t.Helper()
	cmd := from.Command(context.Background(), "ping", "-D", "-n", "-i", strconv.FormatFloat(every.Seconds(), 'f', -1, 64), "-W", "1", dst.String())
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := from.Start(cmd); err != nil {
		t.Fatal(err)
	}
	p := &pinger{t: t, done: make(chan struct{}), seqs: map[int]bool{}}
	line := regexp.MustCompile(`^\[(\d+\.\d+)\] \d+ bytes from .* icmp_seq=(\d+) `) // replies only, not "From ... Unreachable"
	go func() {
		defer close(p.done)
		s := bufio.NewScanner(out)
		for s.Scan() {
			m := line.FindStringSubmatch(s.Text())
			if m == nil {
				continue
			}
			ts, _ := strconv.ParseFloat(m[1], 64)
			seq, _ := strconv.Atoi(m[2])
			p.mu.Lock()
			p.rx = append(p.rx, ts)
			p.seqs[seq] = true
			p.mu.Unlock()
		}
		_, _ = io.Copy(io.Discard, out)
	}()
	p.stop = func() error {
		_ = cmd.Process.Signal(syscall.SIGINT)
		<-p.done
		return cmd.Wait()
	}
	return p
}

// replies is how many replies have come so far.
func (p *pinger) replies() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.rx)
}

// waitReplies waits until n more replies than now have come, or fails.
func (p *pinger) waitReplies(n int, within time.Duration) {
	p.t.Helper()
	want := p.replies() + n
	for deadline := time.Now().Add(within); p.replies() < want; {
		if time.Now().After(deadline) {
			p.t.Fatalf("ping: %d replies within %s, want %d", p.replies()-want+n, within, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// finish stops the ping and returns the longest time without a reply and the sequence
// numbers lost between the first and the last reply.
func (p *pinger) finish() (gap time.Duration, lost int) {
	p.t.Helper()
	_ = p.stop()
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := 1; i < len(p.rx); i++ {
		if d := time.Duration((p.rx[i] - p.rx[i-1]) * float64(time.Second)); d > gap {
			gap = d
		}
	}
	lo, hi := -1, -1
	for s := range p.seqs {
		if lo < 0 || s < lo {
			lo = s
		}
		if s > hi {
			hi = s
		}
	}
	for s := lo; s <= hi && lo >= 0; s++ {
		if !p.seqs[s] {
			lost++
		}
	}
	return gap, lost
}

// capture records every frame on one link of a namespace (an AF_PACKET socket: no tcpdump
// on this machine, and none needed).
type capture struct {
	fd        int
	mu        sync.Mutex
	frames    [][]byte
	truncated int
	done      chan struct{}
	quit      chan struct{}
}

func startCapture(t testing.TB, n *netns.NS, link string) *capture {
	t.Helper()
	h, err := n.Handle()
	if err != nil {
		t.Fatal(err)
	}
	l, err := h.LinkByName(link)
	h.Close()
	if err != nil {
		t.Fatal(err)
	}
	proto := int(htons(unix.ETH_P_ALL))
	c := &capture{done: make(chan struct{}), quit: make(chan struct{})}
	if err := n.Do(func() error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
		if err != nil {
			return err
		}
		c.fd = fd
		// A large buffer so that a burst is not dropped; drops are checked in stop.
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 64<<20); err != nil {
			return err
		}
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 50000}); err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: l.Attrs().Index})
	}); err != nil {
		t.Fatalf("capture on %s/%s: %v", n.Name, link, err)
	}
	// Statistics count from the last read of them: reset now.
	_, _ = unix.GetsockoptTpacketStats(c.fd, unix.SOL_PACKET, unix.PACKET_STATISTICS)
	go func() {
		defer close(c.done)
		buf := make([]byte, 1<<17) // a GSO frame can exceed 64 KiB with its headers
		for {
			k, _, err := unix.Recvfrom(c.fd, buf, unix.MSG_TRUNC)
			if err != nil {
				// The timeout: the queue is empty. Only now may a stop end the capture,
				// so frames still queued when it was asked for are not lost.
				select {
				case <-c.quit:
					return
				default:
					continue
				}
			}
			if k > len(buf) {
				c.mu.Lock()
				c.truncated++
				c.mu.Unlock()
				k = len(buf)
			}
			c.mu.Lock()
			c.frames = append(c.frames, append([]byte(nil), buf[:k]...))
			c.mu.Unlock()
		}
	}()
	return c
}

// stop ends the capture and returns the frames; it fails the test if the kernel dropped
// any (a frame not seen could be the one that leaks).
func (c *capture) stop(t testing.TB) [][]byte {
	t.Helper()
	close(c.quit)
	<-c.done
	st, err := unix.GetsockoptTpacketStats(c.fd, unix.SOL_PACKET, unix.PACKET_STATISTICS)
	unix.Close(c.fd)
	if err != nil {
		t.Fatal(err)
	}
	if c.truncated != 0 {
		t.Fatalf("capture truncated %d frames", c.truncated)
	}
	if st.Drops != 0 {
		t.Fatalf("capture dropped %d of %d frames", st.Drops, st.Packets)
	}
	return c.frames
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// frameKind classifies an Ethernet frame: "arp", "igmp", "udp A:p > B:q" (IPv4 or IPv6), a
// fragment, IPv6 neighbour discovery or MLD, or what else it is.
func frameKind(f []byte) string {
	if len(f) < 14 {
		return "runt"
	}
	switch et := binary.BigEndian.Uint16(f[12:14]); et {
	case unix.ETH_P_ARP:
		return "arp"
	case unix.ETH_P_IP:
		ip := f[14:]
		if len(ip) < 20 {
			return "short ipv4"
		}
		ihl := int(ip[0]&0x0f) * 4
		src, dst := netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
		// A fragment means the encapsulated packet did not fit the underlay's MTU.
		if frag := binary.BigEndian.Uint16(ip[6:8]); frag&0x3fff != 0 {
			return fmt.Sprintf("ipv4 fragment %s > %s", src, dst)
		}
		if ip[9] == unix.IPPROTO_IGMP && dst.IsMulticast() {
			// A host's own multicast membership report (IGMP, link-local, never
			// forwarded), IPv4's counterpart of MLD: carries no pod data.
			return "igmp"
		}
		if ip[9] != unix.IPPROTO_UDP || len(ip) < ihl+8 {
			return fmt.Sprintf("ipv4 proto %d %s > %s", ip[9], src, dst)
		}
		sp, dp := binary.BigEndian.Uint16(ip[ihl:]), binary.BigEndian.Uint16(ip[ihl+2:])
		return fmt.Sprintf("udp %s > %s", netip.AddrPortFrom(src, sp), netip.AddrPortFrom(dst, dp))
	case unix.ETH_P_IPV6:
		ip := f[14:]
		if len(ip) < 40 {
			return "short ipv6"
		}
		src, dst := netip.AddrFrom16([16]byte(ip[8:24])), netip.AddrFrom16([16]byte(ip[24:40]))
		next, l4 := ip[6], ip[40:]
		if next == 0 && len(l4) >= 8 { // hop-by-hop options (MLD's router alert)
			next, l4 = l4[0], l4[8*(int(l4[1])+1):]
		}
		switch {
		case next == unix.IPPROTO_FRAGMENT:
			return fmt.Sprintf("ipv6 fragment %s > %s", src, dst)
		case next == unix.IPPROTO_ICMPV6 && len(l4) > 0 && (l4[0] >= 130 && l4[0] <= 137 || l4[0] == 143):
			return fmt.Sprintf("icmpv6 nd/mld %s > %s", src, dst) // the nodes' own neighbour discovery
		case next != unix.IPPROTO_UDP || len(l4) < 8:
			return fmt.Sprintf("ipv6 next header %d %s > %s", next, src, dst)
		}
		sp, dp := binary.BigEndian.Uint16(l4), binary.BigEndian.Uint16(l4[2:])
		return fmt.Sprintf("udp %s > %s", netip.AddrPortFrom(src, sp), netip.AddrPortFrom(dst, dp))
	default:
		return fmt.Sprintf("ethertype %#04x", et)
	}
}

// leaks reports whether any frame holds a 32-byte run of payload: every such run contains
// one of the payload's aligned 16-byte chunks, so looking those up at every offset finds it.
func leaks(payload []byte, frames [][]byte) (frame, offset int, found bool) {
	const chunk = 16
	chunks := make(map[[chunk]byte]bool, len(payload)/chunk)
	for i := 0; i+chunk <= len(payload); i += chunk {
		chunks[[chunk]byte(payload[i:i+chunk])] = true
	}
	for fi, f := range frames {
		for o := 0; o+chunk <= len(f); o++ {
			if chunks[[chunk]byte(f[o:o+chunk])] {
				return fi, o, true
			}
		}
	}
	return 0, 0, false
}

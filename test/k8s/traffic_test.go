package k8s_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/lab/k8s"
	"github.com/netagent/netagent/test/netns"
)

// pingFlow is busybox ping run by kubectl exec in one pod against another: -c (not -w), so
// ping waits for the last replies instead of counting a reply in flight at a deadline as
// lost, and without -q, so every reply's sequence number says which ones were lost.
type pingFlow struct {
	a, b  podInfo
	count int
	out   string
	err   error
	done  chan struct{}
}

func (l *lab) startPing(ctx context.Context, a, b podInfo, count int) *pingFlow {
	f := &pingFlow{a: a, b: b, count: count, done: make(chan struct{})}
	go func() {
		defer close(f.done)
		f.out, f.err = l.c.Kubectl(ctx, "exec", a.Name, "--", "ping", "-i", "0.01", "-c", strconv.Itoa(count), "-W", "3", b.IP)
	}()
	return f
}

// pingResult is what a busybox ping printed.
type pingResult struct {
	sent, received int
	lost           []int // sequence numbers without a reply
}

// parsePing reads busybox ping's replies ("64 bytes from IP: seq=N ttl=T time=X ms") and
// its summary.
func parsePing(out string) (pingResult, bool) {
	var r pingResult
	got := map[int]bool{}
	summary := false
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		if _, rest, ok := strings.Cut(line, " seq="); ok && strings.Contains(line, "bytes from") {
			seq, _, _ := strings.Cut(rest, " ")
			if n, err := strconv.Atoi(seq); err == nil {
				got[n] = true
			}
		}
		if n, _ := fmt.Sscanf(line, "%d packets transmitted, %d packets received", &r.sent, &r.received); n == 2 {
			summary = true
		}
	}
	for seq := range r.sent {
		if !got[seq] {
			r.lost = append(r.lost, seq)
		}
	}
	return r, summary
}

// ranges prints sorted integers as runs: "12-14 90".
func ranges(xs []int) string {
	var b strings.Builder
	for i := 0; i < len(xs); {
		j := i
		for j+1 < len(xs) && xs[j+1] == xs[j]+1 {
			j++
		}
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		if i == j {
			fmt.Fprint(&b, xs[i])
		} else {
			fmt.Fprintf(&b, "%d-%d", xs[i], xs[j])
		}
		i = j + 1
	}
	return b.String()
}

// podNetns is the network namespace of a pod's first container (its task's
// /proc/PID/ns/net), found through the pod's node's containerd.
func (l *lab) podNetns(ctx context.Context, p podInfo) (*netns.NS, error) {
	id, err := l.c.Kubectl(ctx, "get", "pod", p.Name, "-o", "jsonpath={.status.containerStatuses[0].containerID}")
	if err != nil {
		return nil, err
	}
	id = strings.TrimPrefix(strings.TrimSpace(id), "containerd://")
	var node *k8s.Node
	for _, n := range l.nodes {
		if n.Name == p.Node {
			node = n
		}
	}
	if node == nil || id == "" {
		return nil, fmt.Errorf("pod %s: no container id (%q) or unknown node %q", p.Name, id, p.Node)
	}
	out, err := l.c.Ctr(ctx, node, "tasks", "ls")
	if err != nil {
		return nil, err
	}
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == id {
			return &netns.NS{Name: p.Name, Path: filepath.Join("/proc", f[1], "ns/net")}, nil
		}
	}
	return nil, fmt.Errorf("pod %s: container %s has no task on %s", p.Name, id, p.Node)
}

// tcpFlow is one long-lived TCP connection from pod a to an echo server (busybox nc -e
// cat) in pod b. The client's socket is made in pod a's network namespace, so its packets
// take the pods' path (veth, bridge, the node's routes or VXLAN); it sends an 8-byte
// counter every 10 ms and reads each one back, so a reset, a gap or a stall shows as an
// error, a wrong counter or a long round trip, and the socket's TCP_INFO counts the
// client's retransmissions (a lost segment costs at least one).
type tcpFlow struct {
	a, b     podInfo
	conn     *net.TCPConn
	server   *exec.Cmd
	serverMu sync.Mutex
	stop     chan struct{}
	done     chan struct{}

	sent, echoed int
	maxRTT       time.Duration
	worst        int      // the counter with the longest round trip
	retrans      uint32   // segments the client sent again
	dsacks       uint32   // duplicates the server reported: retransmissions of segments that had arrived
	events       []string // when a retransmission was not (yet) reported as a duplicate
	err          error
}

const tcpFlowPort = 9000

func (l *lab) startTCPFlow(ctx context.Context, a, b podInfo) (*tcpFlow, error) {
	f := &tcpFlow{a: a, b: b, stop: make(chan struct{}), done: make(chan struct{})}
	f.server = l.c.KubectlCmd(ctx, "exec", b.Name, "--", "nc", "-l", "-p", strconv.Itoa(tcpFlowPort), "-e", "cat")
	if err := f.server.Start(); err != nil {
		return nil, err
	}
	ns, err := l.podNetns(ctx, a)
	if err != nil {
		f.kill()
		return nil, err
	}
	addr := net.JoinHostPort(b.IP, strconv.Itoa(tcpFlowPort))
	deadline := time.Now().Add(20 * time.Second)
	for {
		err = ns.Do(func() error {
			c, err := net.DialTimeout("tcp4", addr, 2*time.Second)
			if err == nil {
				f.conn = c.(*net.TCPConn)
			}
			return err
		})
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond) // the server is still starting
	}
	if err != nil {
		f.kill()
		return nil, fmt.Errorf("connect from %s to %s: %w", a.Name, addr, err)
	}
	go f.run()
	return f, nil
}

func (f *tcpFlow) kill() {
	if f.server.Process != nil {
		_ = f.server.Process.Kill()
		_ = f.server.Wait()
	}
}

func (f *tcpFlow) run() {
	defer close(f.done)
	var mu sync.Mutex
	sentAt := map[uint64]time.Time{}
	readErr := make(chan error, 1)
	go func() {
		buf := make([]byte, 8)
		for next := uint64(0); ; next++ {
			if _, err := io.ReadFull(f.conn, buf); err != nil {
				readErr <- err
				return
			}
			now := time.Now()
			got := binary.BigEndian.Uint64(buf)
			mu.Lock()
			t0, ok := sentAt[got]
			delete(sentAt, got)
			f.echoed++
			if rtt := now.Sub(t0); ok && rtt > f.maxRTT {
				f.maxRTT, f.worst = rtt, int(got)
			}
			mu.Unlock()
			if got != next || !ok {
				readErr <- fmt.Errorf("echo %d where %d was due", got, next)
				return
			}
		}
	}()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	buf := make([]byte, 8)
	start := time.Now()
	for n := uint64(0); ; n++ {
		if info := f.info(); info != nil && (info.Total_retrans != f.retrans || info.Dsack_dups != f.dsacks) {
			if info.Total_retrans-info.Dsack_dups != f.retrans-f.dsacks {
				f.events = append(f.events, fmt.Sprintf("%s (counter %d): %d retransmitted, %d duplicates",
					time.Since(start).Round(time.Millisecond), n, info.Total_retrans, info.Dsack_dups))
			}
			f.retrans, f.dsacks = info.Total_retrans, info.Dsack_dups
		}
		select {
		case <-f.stop:
			f.finish(readErr, &mu)
			return
		case err := <-readErr:
			f.err = err
			f.conn.Close()
			return
		case <-tick.C:
		}
		binary.BigEndian.PutUint64(buf, n)
		mu.Lock()
		sentAt[n] = time.Now()
		f.sent++
		mu.Unlock()
		_ = f.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
		if _, err := f.conn.Write(buf); err != nil {
			f.err = fmt.Errorf("write counter %d: %w", n, err)
			f.conn.Close()
			return
		}
	}
}

// finish waits for the last echoes, reads the retransmission count and closes.
func (f *tcpFlow) finish(readErr chan error, mu *sync.Mutex) {
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		mu.Lock()
		all := f.echoed == f.sent
		mu.Unlock()
		if all {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if info := f.info(); info != nil {
		f.retrans, f.dsacks = info.Total_retrans, info.Dsack_dups
	}
	_ = f.conn.CloseWrite()
	f.conn.Close()
	select {
	case err := <-readErr:
		if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !errors.Is(err, syscall.ECONNRESET) {
			f.err = err
		}
	case <-time.After(time.Second):
	}
	mu.Lock()
	if f.echoed != f.sent && f.err == nil {
		f.err = fmt.Errorf("%d of %d counters never came back", f.sent-f.echoed, f.sent)
	}
	mu.Unlock()
}

// info reads the client socket's TCP_INFO (nil when it cannot).
func (f *tcpFlow) info() *unix.TCPInfo {
	raw, err := f.conn.SyscallConn()
	if err != nil {
		return nil
	}
	var info *unix.TCPInfo
	_ = raw.Control(func(fd uintptr) { info, _ = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) })
	return info
}

// Stop ends the flow and returns its error (a reset, a wrong or missing echo).
func (f *tcpFlow) Stop() error {
	close(f.stop)
	<-f.done
	f.kill()
	return f.err
}

// monitor records kernel changes on every node while it runs (links, routes, FDB, every
// nftables change, iptables-nft included), for a failure's log.
type monitor struct {
	cmds  []*exec.Cmd
	files []string
}

func (l *lab) startMonitor(ctx context.Context, dir string) *monitor {
	m := &monitor{}
	for _, n := range l.nodes {
		for _, c := range []struct {
			name string
			args []string
		}{
			{"ip", []string{"-ts", "monitor", "link", "route"}},
			{"bridge", []string{"monitor", "fdb"}},
			{"stdbuf", []string{"-oL", "nft", "monitor"}},
		} {
			path := filepath.Join(dir, fmt.Sprintf("%s-%s.monitor", n.Name, c.name))
			// Every line stamped with the time, as ip -ts does (nft monitor cannot).
			script := fmt.Sprintf("nsenter --net=/run/netns/%s %s %s 2>&1 | while IFS= read -r l; do echo \"$(date +%%T.%%N) $l\"; done > %s", n.NS, c.name, strings.Join(c.args, " "), path)
			cmd := exec.CommandContext(ctx, "bash", "-c", script)
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			if cmd.Start() == nil {
				m.cmds = append(m.cmds, cmd)
				m.files = append(m.files, path)
			}
		}
	}
	return m
}

func (m *monitor) stop() {
	for _, c := range m.cmds {
		_ = syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
		_ = c.Wait()
	}
}

package k8s_test

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
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

// pingFlow is busybox ping every 10 ms, run by kubectl exec in one pod against another,
// until Stop interrupts it (SIGINT: ping prints its summary). Without -q, every reply's
// sequence number says which requests were lost. A request still in flight when ping is
// stopped is no loss: only sequence numbers below the highest one answered count, and the
// unanswered tail after it is reported separately (it must stay short: a dataplane broken
// at the end shows there, and in the connectivity checks that follow).
type pingFlow struct {
	l    *lab
	a, b podInfo
	out  string
	err  error
	done chan struct{}
}

func (l *lab) startPing(ctx context.Context, a, b podInfo) *pingFlow {
	f := &pingFlow{l: l, a: a, b: b, done: make(chan struct{})}
	cmd := l.c.KubectlCmd(ctx, "exec", a.Name, "--", "ping", "-i", "0.01", b.IP)
	stdout, err := cmd.StdoutPipe()
	if err == nil {
		err = cmd.Start()
	}
	if err != nil {
		f.err = err
		close(f.done)
		return f
	}
	go func() {
		defer close(f.done)
		// Every line stamped as it arrives: a lost request's neighbours say when it was lost.
		var b strings.Builder
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			fmt.Fprintf(&b, "%s %s\n", time.Now().UTC().Format("15:04:05.000"), sc.Text())
		}
		f.err = cmd.Wait()
		f.out = b.String()
	}()
	return f
}

// Stop interrupts ping and returns what it saw.
func (f *pingFlow) Stop(ctx context.Context) (pingResult, error) {
	if _, err := f.l.c.Kubectl(ctx, "exec", f.a.Name, "--", "killall", "-INT", "ping"); err != nil {
		return pingResult{}, err
	}
	select {
	case <-f.done:
	case <-time.After(30 * time.Second):
		return pingResult{}, fmt.Errorf("ping %s -> %s did not end after SIGINT", f.a.Name, f.b.IP)
	}
	r, ok := parsePing(f.out)
	if !ok {
		return r, fmt.Errorf("no ping summary (%v): %s", f.err, f.out)
	}
	return r, nil
}

// pingResult is what a busybox ping printed.
type pingResult struct {
	sent, received int
	last           int            // the highest sequence number answered (-1: none)
	lost           []int          // sequence numbers below last without a reply
	at             map[int]string // when each reply arrived
}

// lostAt says when lost requests went: between the replies around them.
func (r pingResult) lostAt() string {
	var at []string
	for _, s := range r.lost {
		before, after := "?", "?"
		for p := s - 1; p >= 0; p-- {
			if t, ok := r.at[p]; ok {
				before = t
				break
			}
		}
		for n := s + 1; n <= r.last; n++ {
			if t, ok := r.at[n]; ok {
				after = t
				break
			}
		}
		at = append(at, fmt.Sprintf("seq %d between %s and %s", s, before, after))
	}
	return strings.Join(at, ", ")
}

// tail is how many requests were sent after the last one answered.
func (r pingResult) tail() int { return r.sent - 1 - r.last }

func (r pingResult) String() string {
	return fmt.Sprintf("%d sent, %d received, %d lost (seq %s), %d unanswered after the last reply", r.sent, r.received, len(r.lost), ranges(r.lost), r.tail())
}

// parsePing reads busybox ping's replies ("64 bytes from IP: seq=N ttl=T time=X ms") and
// its summary.
func parsePing(out string) (pingResult, bool) {
	r := pingResult{last: -1, at: map[int]string{}}
	got := map[int]bool{}
	summary := false
	for _, line := range strings.Split(out, "\n") {
		stamp, line, _ := strings.Cut(strings.TrimSpace(line), " ")
		if _, rest, ok := strings.Cut(line, " seq="); ok && strings.Contains(line, "bytes from") {
			seq, _, _ := strings.Cut(rest, " ")
			if n, err := strconv.Atoi(seq); err == nil {
				got[n] = true
				r.at[n] = stamp
				r.last = max(r.last, n)
			}
		}
		if n, _ := fmt.Sscanf(line, "%d packets transmitted, %d packets received", &r.sent, &r.received); n == 2 {
			summary = true
		}
	}
	for seq := range r.last {
		if !got[seq] {
			r.lost = append(r.lost, seq)
		}
	}
	return r, summary
}

// icmpCounters reads the Icmp line of /proc/net/snmp in a network namespace: what its
// kernel sent and received, whatever a program made of it.
func icmpCounters(ctx context.Context, nsPath string) (map[string]int64, error) {
	out, err := exec.CommandContext(ctx, "nsenter", "--net="+nsPath, "cat", "/proc/net/snmp").Output()
	if err != nil {
		return nil, fmt.Errorf("/proc/net/snmp in %s: %w", nsPath, err)
	}
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "Icmp:" {
			continue
		}
		if names == nil {
			names = f[1:]
			continue
		}
		c := map[string]int64{}
		for i, v := range f[1:] {
			if i < len(names) {
				c[names[i]], _ = strconv.ParseInt(v, 10, 64)
			}
		}
		return c, nil
	}
	return nil, fmt.Errorf("/proc/net/snmp in %s: no Icmp counters", nsPath)
}

// rawDrops sums the drops column of /proc/net/raw in a namespace: ICMP a raw socket
// (busybox ping's) could not take because its receive buffer was full.
func rawDrops(ctx context.Context, nsPath string) string {
	out, err := exec.CommandContext(ctx, "nsenter", "--net="+nsPath, "cat", "/proc/net/raw").Output()
	if err != nil {
		return "?"
	}
	var drops int64
	for _, line := range strings.Split(string(out), "\n")[1:] {
		if f := strings.Fields(line); len(f) > 0 {
			n, _ := strconv.ParseInt(f[len(f)-1], 10, 64)
			drops += n
		}
	}
	return strconv.FormatInt(drops, 10)
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
// client's retransmissions. Loss is judged by conservation, as for ping: every segment
// one socket sent (retransmissions and pure ACKs included) must have reached the other,
// per the two sockets' own counters (TCP_INFO's segs_out and segs_in, the server's read
// with ss in its pod).
type tcpFlow struct {
	a, b     podInfo
	conn     *net.TCPConn
	serverNS string // the server pod's network namespace, for ss
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
	// Segment counters of both sockets once the connection was up and quiet (base) and
	// once every echo was back and quiet again (end).
	clientBase, serverBase, clientEnd, serverEnd segCount
	err                                          error
}

// segCount is one socket's segments sent and received, all kinds.
type segCount struct{ out, in int64 }

// lost is what left one side and never reached the other, per direction.
func (f *tcpFlow) lost() (toServer, toClient int64) {
	return (f.clientEnd.out - f.clientBase.out) - (f.serverEnd.in - f.serverBase.in),
		(f.serverEnd.out - f.serverBase.out) - (f.clientEnd.in - f.clientBase.in)
}

// serverSegs reads the server's established socket on tcpFlowPort with ss in its pod
// (ss leaves a zero counter out).
func (f *tcpFlow) serverSegs() (segCount, error) {
	out, err := exec.Command("nsenter", "--net="+f.serverNS, "ss", "-tinH", "state", "established", "sport", "=", ":"+strconv.Itoa(tcpFlowPort)).Output()
	if err != nil {
		return segCount{}, fmt.Errorf("ss in %s: %w", f.serverNS, err)
	}
	var c segCount
	found := false
	for _, field := range strings.Fields(string(out)) {
		k, v, ok := strings.Cut(field, ":")
		if !ok {
			continue
		}
		switch k {
		case "segs_out":
			c.out, err = strconv.ParseInt(v, 10, 64)
		case "segs_in":
			c.in, err = strconv.ParseInt(v, 10, 64)
		case "rto": // every TCP socket's -i line has one
			found = true
		}
		if err != nil {
			return segCount{}, fmt.Errorf("ss in %s: %q: %w", f.serverNS, field, err)
		}
	}
	if !found || strings.Count(string(out), "rto:") != 1 {
		return segCount{}, fmt.Errorf("ss in %s: want one established socket on port %d, got %q", f.serverNS, tcpFlowPort, out)
	}
	return c, nil
}

// clientSegs reads the client socket's counters.
func (f *tcpFlow) clientSegs() (segCount, error) {
	info := f.info()
	if info == nil {
		return segCount{}, errors.New("no TCP_INFO from the client socket")
	}
	return segCount{out: int64(info.Segs_out), in: int64(info.Segs_in)}, nil
}

// snapshot reads both sockets' counters once nothing is in flight: the connection idle
// for longer than a delayed ACK waits.
func (f *tcpFlow) snapshot() (client, server segCount, err error) {
	time.Sleep(500 * time.Millisecond)
	if client, err = f.clientSegs(); err == nil {
		server, err = f.serverSegs()
	}
	return client, server, err
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
	bns, err := l.podNetns(ctx, b)
	if err == nil {
		f.serverNS = bns.Path
		f.clientBase, f.serverBase, err = f.snapshot()
	}
	if err != nil {
		f.conn.Close()
		f.kill()
		return nil, err
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
	for n := uint64(0); ; n++ {
		if info := f.info(); info != nil && (info.Total_retrans != f.retrans || info.Dsack_dups != f.dsacks) {
			if info.Total_retrans-info.Dsack_dups != f.retrans-f.dsacks {
				f.events = append(f.events, fmt.Sprintf("%s (counter %d): %d retransmitted, %d duplicates",
					time.Now().UTC().Format("15:04:05.000"), n, info.Total_retrans, info.Dsack_dups))
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
	var err error
	if f.clientEnd, f.serverEnd, err = f.snapshot(); err != nil {
		f.err = err
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
	stats map[string]string // namespace path -> nstat history file
}

func (l *lab) startMonitor(ctx context.Context, dir string, pods []podInfo) *monitor {
	m := &monitor{stats: map[string]string{}}
	// Kernel counters (drops, errors) of every node and pod namespace, as deltas at stop.
	paths := map[string]string{}
	for _, n := range l.nodes {
		paths[n.Name] = "/run/netns/" + n.NS
	}
	for _, p := range pods {
		if ns, err := l.podNetns(ctx, p); err == nil {
			paths[p.Name] = ns.Path
		}
	}
	for name, path := range paths {
		hist := filepath.Join(dir, name+".nstat")
		if exec.CommandContext(ctx, "nsenter", "--net="+path, "env", "NSTAT_HISTORY="+hist, "nstat", "-n").Run() == nil {
			m.stats[path] = hist
			m.files = append(m.files, hist+".delta")
		}
	}
	for _, n := range l.nodes {
		for _, c := range []struct {
			name string
			args []string
		}{
			{"ip", []string{"-ts", "monitor", "link", "route", "neigh"}},
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
	for path, hist := range m.stats {
		out, _ := exec.Command("nsenter", "--net="+path, "env", "NSTAT_HISTORY="+hist, "nstat").CombinedOutput()
		_ = os.WriteFile(hist+".delta", out, 0o644)
	}
	for _, c := range m.cmds {
		_ = syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
		_ = c.Wait()
	}
}

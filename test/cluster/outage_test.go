package cluster_test

import (
	"bufio"
	"context"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/lab"
	"github.com/netagent/netagent/test/netns"
)

// pinger is a 10 ms ping from one pod to another that counts replies per sequence number,
// so a packet still in flight when it is stopped is not taken for a lost one.
type pinger struct {
	name string
	cmd  interface{ Wait() error }
	stop func()
	done chan struct{}

	mu      sync.Mutex
	replied map[int]bool
	sent    int
}

var pingSeqRe = regexp.MustCompile(`icmp_seq=(\d+) `)
var pingSentRe = regexp.MustCompile(`(\d+) packets transmitted`)

func startPinger(t *testing.T, name string, from *netns.NS, to string) *pinger {
	t.Helper()
	cmd := from.Command(context.Background(), "ping", "-n", "-i", "0.01", "-W", "1", to)
	r, w := io.Pipe()
	cmd.Stdout = w
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &pinger{name: name, cmd: cmd, done: make(chan struct{}), replied: map[int]bool{}}
	p.stop = func() { _ = cmd.Process.Signal(syscall.SIGINT) }
	go func() {
		defer close(p.done)
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			line := sc.Text()
			p.mu.Lock()
			if m := pingSeqRe.FindStringSubmatch(line); m != nil && strings.Contains(line, "bytes from") {
				n, _ := strconv.Atoi(m[1])
				p.replied[n] = true
			}
			if m := pingSentRe.FindStringSubmatch(line); m != nil {
				p.sent, _ = strconv.Atoi(m[1])
			}
			p.mu.Unlock()
		}
	}()
	go func() { _ = cmd.Wait(); w.Close() }()
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	return p
}

// lost returns the sequence numbers without a reply, leaving out the last one sent (it
// may have been in flight at the stop), and how many were sent.
func (p *pinger) finish() (lost []int, sent int) {
	p.stop()
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	for seq := 1; seq < p.sent; seq++ {
		if !p.replied[seq%65536] {
			lost = append(lost, seq)
		}
	}
	return lost, p.sent
}

func metric(t *testing.T, l *lab.Lab, n *lab.Node, name string) float64 {
	t.Helper()
	_, b, err := l.Get(n, "/metrics")
	if err != nil {
		t.Fatalf("%s metrics: %v", n.Name, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, name+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			if err == nil {
				return v
			}
		}
	}
	t.Fatalf("%s: no metric %s", n.Name, name)
	return 0
}

// TestEtcdOutageRecovery: with the default 30 s lease TTL, etcd is down for 45 s and then
// for 120 s (longer than the TTL, so every agent's keepalive is lost). While it is away,
// each agent says so (status, /readyz, metrics, log); once it is back, each re-claims its
// lease within seconds, before etcd's restored copies run out, so no peer is ever torn
// out of the dataplane. A 10 ms ping between every pair of pods on different nodes runs
// through both outages and the TTL after each, and loses nothing. (About 4.5 minutes.)
func TestEtcdOutageRecovery(t *testing.T) {
	if testing.Short() {
		t.Skip("4.5 minutes of etcd outages")
	}
	l := newLabWith(t, lab.Options{Nodes: 3, Backend: "vxlan", PodsPerNode: 1, LeaseTTL: 30 * time.Second})
	if err := l.WaitConverged(context.Background(), 30*time.Second); err != nil {
		t.Fatal(err)
	}
	var pings []*pinger
	for i, a := range l.Nodes {
		for _, b := range l.Nodes[i+1:] {
			pa, pb := a.Pods[0], b.Pods[0]
			pings = append(pings, startPinger(t, pa.Name+"->"+pb.Name, l.PodNS(pa), pb.IP.String()))
		}
	}
	routesBefore := l.NodeNS(l.Nodes[0]).MustRun(t, "ip", "route", "show", "proto", "180")
	t0 := time.Now()
	at := func() string { return time.Since(t0).Round(time.Second).String() }
	for _, outage := range []time.Duration{45 * time.Second, 120 * time.Second} {
		t.Logf("%s: etcd down for %s", at(), outage)
		if err := l.StopEtcd(); err != nil {
			t.Fatal(err)
		}
		down := time.Now()
		for _, n := range l.Nodes {
			waitUntil(t, 10*time.Second, n.Name+" reports the store unreachable", func() bool {
				code, _, err := l.Get(n, "/readyz")
				return err == nil && code == 503 && status(t, l, n).Store != nil && status(t, l, n).Store.State == "unreachable"
			})
			if v := metric(t, l, n, "netagent_store_connected"); v != 0 {
				t.Errorf("%s: netagent_store_connected %v while etcd is down", n.Name, v)
			}
		}
		time.Sleep(time.Until(down.Add(outage)))
		for _, n := range l.Nodes {
			// Past the TTL, the keepalive is lost and the re-claim keeps failing, visibly.
			if v := metric(t, l, n, `netagent_errors_total{kind="lease"}`); v == 0 {
				t.Errorf("%s: no lease errors counted after %s without etcd", n.Name, outage)
			}
			if st := status(t, l, n); st.Errors["lease"] == "" {
				t.Errorf("%s: status shows no lease error after %s without etcd: %+v", n.Name, outage, st.Errors)
			}
		}
		t.Logf("%s: starting etcd", at())
		if err := l.StartEtcd(); err != nil {
			t.Fatal(err)
		}
		back := time.Now()
		t.Logf("%s: etcd answers", at())
		for _, n := range l.Nodes {
			waitUntil(t, 10*time.Second, n.Name+" re-claims its lease", func() bool {
				return metric(t, l, n, "netagent_lease_held") == 1 && metric(t, l, n, "netagent_store_connected") == 1
			})
			t.Logf("%s: lease re-claimed %s after etcd answered again", n.Name, time.Since(back).Round(time.Millisecond))
			if code, _, _ := l.Get(n, "/readyz"); code != 200 {
				t.Errorf("%s: /readyz %d with etcd back", n.Name, code)
			}
			if st := status(t, l, n); st.Errors["lease"] != "" || st.Store == nil || st.Store.State != "connected" {
				t.Errorf("%s: status after etcd came back: store %+v, errors %v", n.Name, st.Store, st.Errors)
			}
		}
		// Past the restored leases' TTL: a lease not re-claimed would have expired by now and
		// its routes would be gone from every peer.
		time.Sleep(l.Opt.LeaseTTL + 5*time.Second)
	}
	t.Logf("%s: stopping the pings", at())
	for _, p := range pings {
		lost, sent := p.finish()
		t.Logf("%s: %d sent, %d lost", p.name, sent, len(lost))
		if sent < 10000 {
			t.Errorf("%s: only %d pings sent", p.name, sent)
		}
		if len(lost) > 0 {
			t.Errorf("%s lost %d of %d packets through the outages (seq %v...)", p.name, len(lost), sent, lost[:min(len(lost), 5)])
		}
	}
	if after := l.NodeNS(l.Nodes[0]).MustRun(t, "ip", "route", "show", "proto", "180"); after != routesBefore {
		t.Errorf("routes changed:\nbefore %s\nafter %s", routesBefore, after)
	}
	for _, n := range l.Nodes {
		b, _ := os.ReadFile(filepath.Join(n.Dir, "agent.log"))
		for _, want := range []string{"store unreachable", "lease keepalive lost", "store reachable again", "lease re-claimed"} {
			if !strings.Contains(string(b), want) {
				t.Errorf("%s: the log does not say %q", n.Name, want)
			}
		}
		// Told, not flooded: per node, 2 outages of 45 s and 120 s.
		if c := strings.Count(string(b), "level=WARN"); c > 40 {
			t.Errorf("%s: %d warnings through the outages: log spam", n.Name, c)
		}
		if n == l.Nodes[0] {
			t.Logf("agent log of %s:\n%s", n.Name, b)
		}
	}
}

// TestPeerGraceAfterOutage: a node whose agent stops during an etcd outage cannot
// re-claim its lease when etcd is back; etcd's restored copy runs out one TTL later.
// Its peers keep its routes through the grace window (two TTLs after the store's return),
// so a late re-claim would cost nothing, and remove them when the window ends: a node that
// is really gone still goes.
func TestPeerGraceAfterOutage(t *testing.T) {
	l := newLab(t, "vxlan", 3, 0, 1) // 3 s TTL
	n1, n3 := l.Nodes[0], l.Nodes[2]
	sub3 := status(t, l, n3).Subnet
	if err := l.StopEtcd(); err != nil {
		t.Fatal(err)
	}
	if err := l.StopAgent(n3, false); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "node1 sees the store unreachable", func() bool {
		st := status(t, l, n1)
		return st.Store != nil && st.Store.State == "unreachable"
	})
	time.Sleep(2 * time.Second)
	if err := l.StartEtcd(); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	// node3's restored lease runs out about one TTL after etcd's return.
	time.Sleep(l.Opt.LeaseTTL + time.Second)
	if !hasRoute(t, l, n1, sub3) {
		t.Errorf("node1 dropped node3's route %s after etcd's return, within the grace window", time.Since(back).Round(time.Millisecond))
	}
	waitUntil(t, 4*l.Opt.LeaseTTL, "node1 drops node3 after the grace window", func() bool { return !hasRoute(t, l, n1, sub3) })
	t.Logf("node1 dropped node3's route %s after etcd's return (TTL %s)", time.Since(back).Round(time.Millisecond), l.Opt.LeaseTTL)
	if d := time.Since(back); d < 2*l.Opt.LeaseTTL-time.Second {
		t.Errorf("node3 removed %s after etcd's return, before the window's end", d)
	}
	b, _ := os.ReadFile(filepath.Join(n1.Dir, "agent.log"))
	if !strings.Contains(string(b), "peer's lease vanished after a store outage") {
		t.Errorf("node1's log does not say it held node3")
	}
}

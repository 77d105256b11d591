package cluster_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/netagent/netagent/pkg/lab"
	"github.com/netagent/netagent/test/netns"
)

func waitUntil(t *testing.T, d time.Duration, what string, f func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for time.Since(start) < d {
		if f() {
			return time.Since(start)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if f() {
		return time.Since(start)
	}
	t.Fatalf("%s: not within %s", what, d)
	return 0
}

func hasRoute(t *testing.T, l *lab.Lab, n *lab.Node, subnet string) bool {
	out, err := l.NodeNS(n).Run("ip", "route", "show", subnet, "proto", "180")
	return err == nil && strings.TrimSpace(out) != ""
}

func TestJoinAndLeave(t *testing.T) {
	l := newLab(t, "vxlan", 3, 0, 1)
	n3 := l.Nodes[2]
	sub3 := status(t, l, n3).Subnet
	// node3 leaves for good: agent stopped, lease released. Every peer drops its routes.
	if err := l.StopAgent(n3, false); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(l.Opt.Netagent, "leave", "--node-name", n3.Name, "--etcd-endpoints", l.EtcdEndpoint()).CombinedOutput(); err != nil {
		t.Fatalf("leave: %v: %s", err, out)
	}
	for _, n := range l.Nodes[:2] {
		d := waitUntil(t, 5*time.Second, "route to the leaving node removed on "+n.Name, func() bool { return !hasRoute(t, l, n, sub3) })
		t.Logf("%s dropped node3's route after %s", n.Name, d)
		if fdb := l.NodeNS(n).MustRun(t, "bridge", "fdb", "show", "dev", "netagent.1"); strings.Contains(fdb, n3.IP.String()) {
			t.Errorf("%s still has an FDB entry for node3:\n%s", n.Name, fdb)
		}
	}
	// node3 joins again: every peer programs it, pods reach each other again.
	if err := l.StartAgent(n3); err != nil {
		t.Fatal(err)
	}
	if err := l.WaitReady(context.Background(), n3, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	sub3 = status(t, l, n3).Subnet
	for _, n := range l.Nodes[:2] {
		waitUntil(t, 5*time.Second, "route to the joining node on "+n.Name, func() bool { return hasRoute(t, l, n, sub3) })
	}
	// The old pod of node3 was on the released subnet; a new one is wired on the new lease.
	p, err := l.AddPod(context.Background(), n3, "node3-late")
	if err != nil {
		t.Fatal(err)
	}
	if err := lab.Ping(l.PodNS(l.Nodes[0].Pods[0]), p.IP.String()); err != nil {
		t.Errorf("pod on node1 -> new pod on node3: %v", err)
	}
}

// monitor records netlink changes in a node namespace until stop is called.
func monitor(t *testing.T, ns *netns.NS) (stop func() string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := ns.Command(ctx, "ip", "monitor", "route", "neigh", "link")
	var out strings.Builder
	var mu sync.Mutex
	r, w := io.Pipe()
	cmd.Stdout = w
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		b := make([]byte, 4096)
		for {
			n, err := r.Read(b)
			mu.Lock()
			out.Write(b[:n])
			mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	time.Sleep(100 * time.Millisecond)
	return func() string {
		cancel()
		_ = cmd.Wait()
		w.Close()
		<-done
		mu.Lock()
		defer mu.Unlock()
		return out.String()
	}
}

// flow keeps a TCP connection from a to b busy and counts bytes; it reports the first error.
type flow struct {
	bytes atomic.Int64
	err   atomic.Value
	stop  chan struct{}
	done  chan struct{}
}

func startFlow(t *testing.T, from *netns.NS, to *netns.NS, toIP string) *flow {
	t.Helper()
	var ln net.Listener
	if err := to.Do(func() error {
		var err error
		ln, err = net.Listen("tcp4", ":7100")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, c)
		c.Close()
	}()
	var conn net.Conn
	if err := from.Do(func() error {
		var err error
		conn, err = net.DialTimeout("tcp4", toIP+":7100", 3*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	f := &flow{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(f.done)
		defer conn.Close()
		buf := make([]byte, 16<<10)
		for {
			select {
			case <-f.stop:
				return
			default:
			}
			_ = conn.SetWriteDeadline(time.Now().Add(time.Second))
			n, err := conn.Write(buf)
			f.bytes.Add(int64(n))
			if err != nil {
				f.err.Store(err)
				return
			}
			time.Sleep(time.Millisecond)
		}
	}()
	return f
}

func (f *flow) finish() error {
	close(f.stop)
	<-f.done
	if e, ok := f.err.Load().(error); ok {
		return e
	}
	return nil
}

// ourChanges filters monitor output for objects netagent owns.
func ourChanges(mon string) []string {
	var out []string
	for _, line := range strings.Split(mon, "\n") {
		// "proto kernel" lines are the kernel's own (e.g. the IPv6 link-local route that
		// appears a moment after a new device comes up), not netagent's doing.
		if strings.TrimSpace(line) != "" && !strings.Contains(line, "proto kernel") &&
			(strings.Contains(line, "proto 180") || strings.Contains(line, "netagent.1")) {
			out = append(out, line)
		}
	}
	return out
}

var lossRe = regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`)

func TestRestartAndKillLoseNothing(t *testing.T) {
	l := newLab(t, "vxlan", 2, 0, 1)
	a, b := l.Nodes[0].Pods[0], l.Nodes[1].Pods[0]
	for _, kill := range []bool{false, true} {
		name := map[bool]string{false: "restart", true: "kill -9"}[kill]
		t.Run(name, func(t *testing.T) {
			stopMon := monitor(t, l.NodeNS(l.Nodes[0]))
			f := startFlow(t, l.PodNS(a), l.PodNS(b), b.IP.String())
			ping := l.PodNS(a).Command(context.Background(), "ping", "-i", "0.01", "-w", "3", "-q", b.IP.String())
			var pingOut strings.Builder
			ping.Stdout = &pingOut
			if err := ping.Start(); err != nil {
				t.Fatal(err)
			}
			time.Sleep(500 * time.Millisecond)
			if err := l.StopAgent(l.Nodes[0], kill); err != nil {
				t.Fatal(err)
			}
			if err := l.StartAgent(l.Nodes[0]); err != nil {
				t.Fatal(err)
			}
			if err := l.WaitReady(context.Background(), l.Nodes[0], 10*time.Second); err != nil {
				t.Fatal(err)
			}
			_ = ping.Wait()
			if err := f.finish(); err != nil {
				t.Errorf("TCP flow broke: %v", err)
			}
			if f.bytes.Load() == 0 {
				t.Error("TCP flow sent nothing")
			}
			m := lossRe.FindStringSubmatch(pingOut.String())
			if m == nil || m[1] != m[2] || m[1] == "0" {
				t.Errorf("10 ms ping lost packets across the %s: %s", name, pingOut.String())
			}
			if ch := ourChanges(stopMon()); len(ch) > 0 {
				t.Errorf("the %s changed netagent's kernel objects:\n%q", name, ch)
			}
		})
	}
}

func TestEtcdOutageLongerThanTTL(t *testing.T) {
	l := newLab(t, "vxlan", 3, 0, 1)
	before := map[string]string{}
	for _, n := range l.Nodes {
		before[n.Name] = status(t, l, n).Subnet
	}
	routesBefore := l.NodeNS(l.Nodes[0]).MustRun(t, "ip", "route", "show", "proto", "180")
	stopMon := monitor(t, l.NodeNS(l.Nodes[0]))
	if err := l.StopEtcd(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2*l.Opt.LeaseTTL + time.Second) // well past the lease TTL
	if f := lab.Failures(l.Matrix(context.Background())); len(f) > 0 {
		t.Errorf("connectivity lost while etcd was down: %v", f)
	}
	if err := l.StartEtcd(); err != nil {
		t.Fatal(err)
	}
	for _, n := range l.Nodes {
		waitUntil(t, 20*time.Second, n.Name+" holds its lease again", func() bool {
			_, b, err := l.Get(n, "/metrics")
			return err == nil && strings.Contains(string(b), "netagent_lease_held 1")
		})
		if got := status(t, l, n).Subnet; got != before[n.Name] {
			t.Errorf("%s: subnet %s after the outage, %s before", n.Name, got, before[n.Name])
		}
	}
	time.Sleep(500 * time.Millisecond) // let peers see the re-claimed leases
	if f := lab.Failures(l.Matrix(context.Background())); len(f) > 0 {
		t.Errorf("connectivity after etcd came back: %v", f)
	}
	if after := l.NodeNS(l.Nodes[0]).MustRun(t, "ip", "route", "show", "proto", "180"); after != routesBefore {
		t.Errorf("routes changed:\nbefore\n%s\nafter\n%s", routesBefore, after)
	}
	if ch := ourChanges(stopMon()); len(ch) > 0 {
		t.Logf("netlink changes during the outage (peers' leases expired and came back):\n%s", strings.Join(ch, "\n"))
	}
}

func TestDriftIsRepaired(t *testing.T) {
	l := newLab(t, "vxlan", 2, 0, 0)
	n := l.Nodes[0]
	ns := l.NodeNS(n)
	peerSub := status(t, l, l.Nodes[1]).Subnet
	peerVTEP := strings.Split(peerSub, "/")[0]
	conflist, subnetFile := filepath.Join(n.Dir, "net.d", "10-netagent.conflist"), filepath.Join(n.Dir, "subnet.env")
	run := func(args ...string) string { // absent while the test breaks it: not fatal
		out, err := ns.Run(args[0], args[1:]...)
		if err != nil {
			return "missing: " + strings.Join(args, " ") + "\n"
		}
		return out
	}
	snapshot := func() string {
		files := ""
		for _, p := range []string{conflist, subnetFile} {
			b, _ := os.ReadFile(p)
			files += string(b)
		}
		return files + ns.MustRun(t, "ip", "route", "show", "proto", "180") + ns.MustRun(t, "ip", "neigh", "show", "dev", "netagent.1") +
			ns.MustRun(t, "bridge", "fdb", "show", "dev", "netagent.1") + ns.MustRun(t, "iptables-save", "-t", "nat") +
			ns.MustRun(t, "iptables", "-S", "FORWARD") + ns.MustRun(t, "ip", "-br", "link", "show", "netagent.1") +
			run("nft", "list", "table", "ip", "netagent") + run("nft", "list", "table", "bridge", "netagent")
	}
	normalize := func(s string) string {
		s = regexp.MustCompile(`(?m)^#.*\n`).ReplaceAllString(s, "")            // iptables-save timestamps
		s = regexp.MustCompile(`packets \d+ bytes \d+`).ReplaceAllString(s, "") // nft counters
		return regexp.MustCompile(`\[\d+:\d+\]|\d+: `).ReplaceAllString(s, "")
	}
	want := normalize(snapshot())
	cases := []struct {
		name   string
		break_ []string
	}{
		{"route deleted", []string{"ip route del " + peerSub}},
		{"neighbour deleted", []string{"ip neigh del " + peerVTEP + " dev netagent.1"}},
		{"fdb entry deleted", []string{"bridge fdb del " + strings.TrimSpace(firstField(ns.MustRun(t, "bridge", "fdb", "show", "dev", "netagent.1"))) + " dev netagent.1 dst " + l.Nodes[1].IP.String() + " self"}},
		{"vxlan device deleted", []string{"ip link del netagent.1"}},
		{"masquerade chain flushed", []string{"iptables -t nat -F NETAGENT-POSTRTG"}},
		{"forward jump deleted", []string{"iptables -D FORWARD -j NETAGENT-FWD"}},
		{"conflist deleted", []string{"rm " + conflist}},
		{"conflist overwritten", []string{"cp /etc/hostname " + conflist}},
		{"subnet file deleted", []string{"rm " + subnetFile}},
		// Every nftables table at once: iptables-nft's, the VXLAN allow-list, anti-spoofing.
		{"nftables ruleset flushed", []string{"nft flush ruleset"}},
		// Last: the inserted rule stays (the snapshot ignores it only in this case).
		{"rule inserted above the jump", []string{"iptables -I FORWARD 1 -s 203.0.113.9 -j ACCEPT"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for _, cmd := range c.break_ {
				f := strings.Fields(cmd)
				ns.MustRun(t, f[0], f[1:]...)
			}
			// A snapshot execs nine tools and, on a loaded machine, may itself take over a
			// second: the verdict is that of a snapshot begun after the second, not of the
			// last one begun before it (which may have read the files before the repair).
			var got string
			start := time.Now()
			for {
				begun := time.Since(start)
				got = normalize(snapshot())
				if c.name == "rule inserted above the jump" {
					got = strings.Replace(got, "-A FORWARD -s 203.0.113.9/32 -j ACCEPT\n", "", 1)
				}
				if got == want || begun >= time.Second {
					break
				}
				time.Sleep(5 * time.Millisecond)
			}
			if got != want {
				t.Fatalf("%s not repaired within 1s:\n%s", c.name, cmp.Diff(want, got))
			}
			d := time.Since(start)
			t.Logf("%s repaired in %s", c.name, d.Round(time.Millisecond))
		})
	}
	if err := lab.Ping(ns, peerVTEP); err != nil {
		t.Errorf("node1 -> node2's VTEP after all repairs: %v", err)
	}
}

func firstField(s string) string {
	f := strings.Fields(s)
	if len(f) == 0 {
		return ""
	}
	return f[0]
}

func TestRacingAgentsGetDistinctSubnets(t *testing.T) {
	l := newLab(t, "host-gw", 8, 0, 0)
	seen := map[string]string{}
	for _, n := range l.Nodes {
		s := status(t, l, n).Subnet
		if prev, dup := seen[s]; dup {
			t.Errorf("%s and %s both hold %s", prev, n.Name, s)
		}
		seen[s] = n.Name
		waitUntil(t, 5*time.Second, n.Name+" sees all 7 peers", func() bool { return len(status(t, l, n).Peers) == 7 })
	}
}

func TestInvalidConfig(t *testing.T) {
	l := newLab(t, "vxlan", 2, 0, 1)
	for _, c := range []struct {
		args  []string
		field string
	}{
		{[]string{"--network", "10.244.0.0/16", "--subnet-len", "12"}, "subnetLen"},
		{[]string{"--network", "10.244.0.0/16", "--backend", "udp"}, "backend.type"},
		{[]string{"--network", "10.244.1.0/16"}, "network"},
		{[]string{"--network", "10.244.0.0/16", "--vni", "99999999"}, "backend.vni"},
		{[]string{"--network", "10.244.0.0/16", "--mtu", "100"}, "mtu"},
	} {
		args := append([]string{"config", "set", "--etcd-endpoints", l.EtcdEndpoint()}, c.args...)
		out, err := exec.Command(l.Opt.Netagent, args...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), c.field+":") {
			t.Errorf("config set %v = %v, %s; want an error naming %s", c.args, err, out, c.field)
		}
	}
	// An invalid config written behind netagent's back: agents report it and keep the
	// dataplane.
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{l.EtcdEndpoint()}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	routes := l.NodeNS(l.Nodes[0]).MustRun(t, "ip", "route", "show", "proto", "180")
	if _, err := cli.Put(context.Background(), "/netagent/config", `{"network":"10.244.0.0/16","backend":{"type":"carrier-pigeon"}}`); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, "agent reports the invalid config", func() bool {
		return strings.Contains(fmt.Sprint(status(t, l, l.Nodes[0]).Errors), "backend.type")
	})
	if got := l.NodeNS(l.Nodes[0]).MustRun(t, "ip", "route", "show", "proto", "180"); got != routes {
		t.Errorf("routes changed after an invalid config:\n%s\nwas\n%s", got, routes)
	}
	if f := lab.Failures(l.Matrix(context.Background())); len(f) > 0 {
		t.Errorf("connectivity lost after an invalid config: %v", f)
	}
}

package cluster_test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/netagent/netagent/pkg/lab"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/plan"
)

func etcdClient(t *testing.T, l *lab.Lab) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{l.EtcdEndpoint()}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// pingFor starts a 10 ms ping from a pod to ip for d; the function it returns waits for
// it and says how many were sent and answered.
func pingFor(t *testing.T, l *lab.Lab, from *lab.Pod, ip string, d time.Duration) func() (sent, got string) {
	t.Helper()
	cmd := l.PodNS(from).Command(context.Background(), "ping", "-i", "0.01", "-w", fmt.Sprint(int(d.Seconds())), "-q", ip)
	var out strings.Builder
	cmd.Stdout = &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return func() (string, string) {
		_ = cmd.Wait()
		m := lossRe.FindStringSubmatch(out.String())
		if m == nil {
			t.Fatalf("ping said: %s", out.String())
		}
		return m[1], m[2]
	}
}

// Forged leases (a key naming one subnet whose value holds another node's live subnet, a
// broadcast, loopback or this node's own public IP, a longer prefix cutting into a live
// subnet, a subnet outside the network) are ignored, reported once in the log, in status
// and in a metric, at start-up too, and traffic to the node whose subnet they claim keeps
// flowing.
func TestForgedLeasesAreIgnored(t *testing.T) {
	l := newLab(t, "vxlan", 3, 0, 1)
	n1, n2, n3 := l.Nodes[0], l.Nodes[1], l.Nodes[2]
	sub2 := netip.MustParsePrefix(status(t, l, n2).Subnet)
	cli := etcdClient(t, l)
	forged := func(node, subnet, ip string) lease.Lease {
		return lease.Lease{Node: node, Subnet: netip.MustParsePrefix(subnet), PublicIP: netip.MustParseAddr(ip),
			Backend: "vxlan", VTEPMAC: plan.VTEPMAC(node).String()}
	}
	half := netip.PrefixFrom(sub2.Addr(), 25)
	used := map[string]bool{}
	for _, n := range l.Nodes {
		used[status(t, l, n).Subnet] = true
	}
	var free []string // subnets no node holds
	for i := 240; len(free) < 4; i++ {
		if s := fmt.Sprintf("10.244.%d.0/24", i); !used[s] {
			free = append(free, s)
		}
	}
	key := func(s string) string { return lease.SubnetKey(netip.MustParsePrefix(s)) }
	mirrorKey := key(free[3])
	writes := map[string]lease.Lease{
		// The hijack: a free key whose value names node2's live subnet, from a node name
		// sorting before node2's.
		key(free[0]):          forged("aaa-hijack", sub2.String(), "192.0.2.99"),
		key(free[1]):          forged("bcast", free[1], "255.255.255.255"),
		key(free[2]):          forged("loop", free[2], "127.0.0.1"),
		mirrorKey:             forged("mirror", free[3], n1.IP.String()), // node1's own address
		lease.SubnetKey(half): forged("aaa-half", half.String(), "192.0.2.98"),
		"10.99.0.0-24":        forged("outside", "10.99.0.0/24", "192.0.2.97"),
	}
	done := pingFor(t, l, n1.Pods[0], n2.Pods[0].IP.String(), 3*time.Second)
	time.Sleep(300 * time.Millisecond)
	for k, v := range writes {
		if _, err := cli.Put(context.Background(), "/netagent/subnets/"+k, string(v.Encode())); err != nil {
			t.Fatal(err)
		}
	}
	sent, got := done()
	if sent != got {
		t.Errorf("pod on node1 -> pod on node2: %s of %s pings answered while the forged leases were written", got, sent)
	}
	for _, n := range []*lab.Node{n1, n3} {
		if out := l.NodeNS(n).MustRun(t, "ip", "route", "show", sub2.String(), "proto", "180"); !strings.Contains(out, "via "+sub2.Addr().String()) {
			t.Errorf("%s: route to node2's subnet is %q, want via node2's VTEP %s", n.Name, out, sub2.Addr())
		}
		if out := l.NodeNS(n).MustRun(t, "ip", "route", "show", "proto", "180"); strings.Contains(out, half.String()) || strings.Contains(out, free[1]) || strings.Contains(out, free[2]) {
			t.Errorf("%s routes a forged lease:\n%s", n.Name, out)
		}
		set := l.NodeNS(n).MustRun(t, "nft", "list", "table", "ip", "netagent")
		for _, bad := range []string{"127.0.0.1", "255.255.255.255", "192.0.2.99", "192.0.2.98"} {
			if strings.Contains(set, bad) {
				t.Errorf("%s: VXLAN allow-list holds %s:\n%s", n.Name, bad, set)
			}
		}
	}
	if fdb := l.NodeNS(n1).MustRun(t, "bridge", "fdb", "show", "dev", "netagent.1"); strings.Contains(fdb, n1.IP.String()) {
		t.Errorf("node1 tunnels to itself:\n%s", fdb)
	}
	if err := lab.Ping(l.PodNS(n3.Pods[0]), n2.Pods[0].IP.String()); err != nil {
		t.Errorf("pod on node3 -> pod on node2: %v", err)
	}

	// Reported on node1 (all of them: the mirror claims its address), and on node3 after a
	// restart, with the garbage already in the store (its log is read from the restart on).
	logFrom := map[*lab.Node]int{}
	if b, err := os.ReadFile(filepath.Join(n3.Dir, "agent.log")); err == nil {
		logFrom[n3] = len(b)
	}
	if err := l.StopAgent(n3, false); err != nil {
		t.Fatal(err)
	}
	if err := l.StartAgent(n3); err != nil {
		t.Fatal(err)
	}
	if err := l.WaitReady(context.Background(), n3, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	for _, n := range []*lab.Node{n1, n3} {
		want := len(writes)
		if n == n3 {
			want-- // node1's address is not node3's
		}
		var st map[string]string
		waitUntil(t, 5*time.Second, n.Name+" reports the forged leases", func() bool {
			st = status(t, l, n).IgnoredLeases
			return len(st) == want
		})
		for k := range writes {
			if why, ok := st["/netagent/subnets/"+k]; !ok && !(n == n3 && k == mirrorKey) {
				t.Errorf("%s: status does not report %s (has %v)", n.Name, k, st)
			} else if ok {
				t.Logf("%s ignores %s: %s", n.Name, k, why)
			}
		}
		if out := l.NodeNS(n).MustRun(t, l.Opt.Netagent, "status"); !strings.Contains(out, "IGNORED LEASES") || !strings.Contains(out, "/netagent/subnets/10.99.0.0-24: ") {
			t.Errorf("%s: `netagent status` does not list the ignored leases:\n%s", n.Name, out)
		}
		if v := metricValue(t, l, n, "netagent_ignored_leases"); int(v) != want {
			t.Errorf("%s: netagent_ignored_leases = %v, want %d", n.Name, v, want)
		}
		logb, _ := os.ReadFile(filepath.Join(n.Dir, "agent.log"))
		logb = logb[logFrom[n]:]
		for k := range writes {
			if n == n3 && k == mirrorKey {
				continue
			}
			if c := strings.Count(string(logb), "key=/netagent/subnets/"+k+" "); c != 1 {
				t.Errorf("%s: %s logged %d times, want once", n.Name, k, c)
			}
		}
	}
	if f := lab.Failures(l.Matrix(context.Background())); len(f) > 0 {
		t.Errorf("connectivity with forged leases present: %v", f)
	}
}

// Two hosts started with the same node name: the second is refused with an error naming
// the first, while the first keeps its lease (its public IP never flips) and its traffic;
// when the lease is rewritten by another agent behind the first's back, the first stops
// loudly instead of fighting over it.
func TestDuplicateNodeNameIsRefused(t *testing.T) {
	l := newLab(t, "vxlan", 3, 0, 1)
	n1, n2, n3 := l.Nodes[0], l.Nodes[1], l.Nodes[2]
	key := "/netagent/subnets/" + lease.SubnetKey(netip.MustParsePrefix(status(t, l, n1).Subnet))
	cli := etcdClient(t, l)
	if err := l.StopAgent(n3, false); err != nil {
		t.Fatal(err)
	}
	// node3's host starts an agent calling itself node1.
	args := l.AgentArgs(n3)
	for i := range args {
		if args[i] == "--node-name" {
			args[i+1] = n1.Name
		}
	}
	impostorLog := filepath.Join(n3.Dir, "impostor.log")
	logf, err := os.Create(impostorLog)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	done := pingFor(t, l, n2.Pods[0], n1.Pods[0].IP.String(), 4*time.Second)
	impostor := l.NodeNS(n3).Command(context.Background(), l.Opt.Netagent, args...)
	impostor.Stdout, impostor.Stderr = logf, logf
	if err := impostor.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = impostor.Process.Kill(); _ = impostor.Wait() }()
	// For 3 s: node1's lease keeps node1's address, the impostor says why it is refused
	// and is never ready.
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		resp, err := cli.Get(context.Background(), key)
		if err != nil || len(resp.Kvs) == 0 {
			t.Fatalf("node1's lease: %v %v", resp, err)
		}
		if cur, err := lease.Decode(resp.Kvs[0].Value); err != nil || cur.PublicIP != n1.IP {
			t.Fatalf("node1's lease now says %+v (%v), want public IP %s", cur, err, n1.IP)
		}
		if code, _, err := l.Get(n3, "/readyz"); err == nil && code == 200 {
			t.Fatal("the impostor became ready")
		}
	}
	b, _ := os.ReadFile(impostorLog)
	if !strings.Contains(string(b), "node name in use by another agent") || !strings.Contains(string(b), n1.IP.String()) {
		t.Errorf("the impostor's log does not say why it is refused:\n%s", lastLines(string(b), 5))
	}
	if sent, got := done(); sent != got {
		t.Errorf("pod on node2 -> pod on node1: %s of %s answered while the impostor ran", got, sent)
	}
	if st := status(t, l, n1); !st.Ready || len(st.Errors) != 0 {
		t.Errorf("node1: ready %v, errors %v", st.Ready, st.Errors)
	}

	// Another agent (one without this check) rewrites node1's lease: node1 stops, saying why.
	resp, err := cli.Get(context.Background(), key)
	if err != nil || len(resp.Kvs) == 0 {
		t.Fatal(err)
	}
	cur, err := lease.Decode(resp.Kvs[0].Value)
	if err != nil {
		t.Fatal(err)
	}
	cur.PublicIP, cur.Instance = n3.IP, "intruder"
	if _, err := cli.Put(context.Background(), key, string(cur.Encode())); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, "node1's agent stops", func() bool {
		_, _, err := l.Get(n1, "/healthz")
		return err != nil
	})
	n1.Agent = 0 // exited by itself
	b, _ = os.ReadFile(filepath.Join(n1.Dir, "agent.log"))
	if !strings.Contains(string(b), "node identity conflict") || !strings.Contains(string(b), n3.IP.String()) {
		t.Errorf("node1's log does not say why it stopped:\n%s", lastLines(string(b), 5))
	}
}

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

package cluster_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/lab"
)

// TestDebianEtcd34: the agents work against Debian's etcd-server 3.4, a separate binary.
func TestDebianEtcd34(t *testing.T) {
	bin := "/usr/bin/etcd"
	out, err := exec.Command(bin, "--version").CombinedOutput()
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("Debian's etcd-server is missing (scripts/deps.sh installs it): %v", err)
		}
		t.Skip("no /usr/bin/etcd")
	}
	if !strings.Contains(string(out), "3.4.") {
		t.Logf("etcd is not 3.4: %s", out)
	}
	l := newLabWith(t, lab.Options{Nodes: 3, Remote: 1, Backend: "hybrid", PodsPerNode: 1, EtcdBinary: bin, EtcdMembers: 3})
	if f := lab.Failures(l.Matrix(context.Background())); len(f) > 0 {
		t.Errorf("connectivity with etcd 3.4: %v", f)
	}
}

// TestEtcdClusterLosesOneMember: with a 3-member etcd (v3.6, embedded in netagent etcd),
// one member dying costs nothing: leases stay held past their TTL and a node joining
// afterwards reaches every peer.
func TestEtcdClusterLosesOneMember(t *testing.T) {
	l := newLabWith(t, lab.Options{Nodes: 3, Backend: "vxlan", PodsPerNode: 1, EtcdMembers: 3})
	for i := range 3 {
		t.Run(fmt.Sprintf("member m%d down", i+1), func(t *testing.T) {
			if err := l.StopEtcdMember(i); err != nil {
				t.Fatal(err)
			}
			time.Sleep(2*l.Opt.LeaseTTL + time.Second)
			for _, n := range l.Nodes {
				if _, b, err := l.Get(n, "/metrics"); err != nil || !strings.Contains(string(b), "netagent_lease_held 1") {
					t.Errorf("%s lost its lease with one etcd member down (%v)", n.Name, err)
				}
			}
			// node3 leaves and joins again while the member is down.
			n3 := l.Nodes[2]
			if err := l.StopAgent(n3, false); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command(l.Opt.Netagent, "leave", "--node-name", n3.Name, "--etcd-endpoints", l.EtcdEndpoint()).CombinedOutput(); err != nil {
				t.Fatalf("leave: %v: %s", err, out)
			}
			if err := l.StartAgent(n3); err != nil {
				t.Fatal(err)
			}
			if err := l.WaitReady(context.Background(), n3, 30*time.Second); err != nil {
				t.Fatal(err)
			}
			sub := status(t, l, n3).Subnet
			for _, n := range l.Nodes[:2] {
				waitUntil(t, 10*time.Second, n.Name+" programs the rejoined node3", func() bool { return hasRoute(t, l, n, sub) })
			}
			// (node3's old pod sat on its released subnet; node1 and node2 pods must still talk.)
			if err := lab.Ping(l.PodNS(l.Nodes[0].Pods[0]), l.Nodes[1].Pods[0].IP.String()); err != nil {
				t.Errorf("pod on node1 -> pod on node2 with an etcd member down: %v", err)
			}
			if err := l.StartEtcdMember(i); err != nil {
				t.Fatal(err)
			}
			time.Sleep(time.Second) // let it rejoin before the next member goes
		})
	}
}

package cluster_test

import (
	"context"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/lab"
)

// TestMoveToHostGW: the backend moves from vxlan to host-gw and the agents are restarted
// one by one, as a DaemonSet rollout does, with a 10 ms ping each way between pods on the
// two nodes. node2's agent is frozen while node1 restarts, so node2's kernel keeps sending
// VXLAN to node1 for as long as the test likes (in a real rollout, until node2 sees
// node1's new lease): node1 keeps its VXLAN device and the allow-list on its port while
// node2 publishes a VTEP, and lets both go once node2 runs host-gw too. Nothing is lost.
func TestMoveToHostGW(t *testing.T) {
	// A TTL well above the freeze: node2's lease must not run out while it is stopped.
	l := newLabWith(t, lab.Options{Nodes: 2, Backend: "vxlan", PodsPerNode: 1, LeaseTTL: 30 * time.Second})
	n1, n2 := l.Nodes[0], l.Nodes[1]
	a, b := n1.Pods[0], n2.Pods[0]
	ab := startPinger(t, a.Name+"->"+b.Name, l.PodNS(a), b.IP.String())
	ba := startPinger(t, b.Name+"->"+a.Name, l.PodNS(b), a.IP.String())
	time.Sleep(300 * time.Millisecond)
	if out, err := l.Netagent(context.Background(), "config", "set", "--backend", "host-gw", "--network", l.Opt.Network); err != nil {
		t.Fatalf("config set: %v: %s", err, out)
	}
	restart := func(n *lab.Node) {
		t.Helper()
		if err := l.StopAgent(n, false); err != nil {
			t.Fatal(err)
		}
		if err := l.StartAgent(n); err != nil {
			t.Fatal(err)
		}
		if err := l.WaitReady(context.Background(), n, 10*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	if err := syscall.Kill(n2.Agent, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	cont := func() { _ = syscall.Kill(n2.Agent, syscall.SIGCONT) }
	defer cont()
	restart(n1)
	time.Sleep(time.Second) // node2 still sends VXLAN to node1
	ns1 := l.NodeNS(n1)
	if _, err := ns1.Run("ip", "link", "show", "netagent.1"); err != nil {
		t.Errorf("node1 (host-gw) removed its VXLAN device while node2 still sends through it")
	}
	if out, _ := ns1.Run("nft", "list", "table", "ip", "netagent"); !strings.Contains(out, "8472") {
		t.Errorf("node1's allow-list does not guard the kept device's port:\n%s", out)
	}
	cont()
	sub1 := status(t, l, n1).Subnet
	waitUntil(t, 5*time.Second, "node2 routes directly to node1", func() bool {
		out, _ := l.NodeNS(n2).Run("ip", "route", "show", sub1)
		return strings.Contains(out, "dev eth0")
	})
	restart(n2)
	for _, n := range l.Nodes {
		waitUntil(t, 5*time.Second, n.Name+"'s VXLAN device gone", func() bool {
			_, err := l.NodeNS(n).Run("ip", "link", "show", "netagent.1")
			return err != nil
		})
	}
	time.Sleep(300 * time.Millisecond)
	for _, p := range []*pinger{ab, ba} {
		lost, sent := p.finish()
		t.Logf("%s: %d sent, %d lost %v", p.name, sent, len(lost), lost)
		if len(lost) > 0 {
			t.Errorf("%s lost %d pings during the move", p.name, len(lost))
		}
	}
}

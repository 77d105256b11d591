package cluster_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/bridge"
	"github.com/netagent/netagent/pkg/lab"
)

// The agent's default, --pod-interface auto, on an upgraded node: while the node has a
// bridged pod it keeps bridging (new pods there could not reach the old ones otherwise);
// once the node is drained and its agent restarted, it wires pods routed, and they reach
// the bridged pods of the other node.
func TestPodInterfaceAuto(t *testing.T) {
	l := newLabWith(t, lab.Options{Backend: "host-gw", Nodes: 2, PodsPerNode: 1, PodInterface: "bridge"})
	n1, n2 := l.Nodes[0], l.Nodes[1]
	ctx := context.Background()
	conflist := func() string {
		b, err := os.ReadFile(filepath.Join(n1.Dir, "net.d", "10-netagent.conflist"))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	restartAuto := func() {
		t.Helper()
		if err := l.StopAgent(n1, false); err != nil {
			t.Fatal(err)
		}
		if err := l.StartAgentArgs(n1, "--pod-interface", "auto"); err != nil {
			t.Fatal(err)
		}
		if err := l.WaitReady(ctx, n1, 10*time.Second); err != nil {
			t.Fatal(err)
		}
	}

	restartAuto()
	if st := status(t, l, n1); st.PodInterface != "bridge" || strings.Contains(conflist(), "routed") {
		t.Fatalf("auto with a bridged pod on the node: status says %q, conflist:\n%s", st.PodInterface, conflist())
	}
	old := n1.Pods[0]
	p, err := l.AddPod(ctx, n1, "node1-pod2")
	if err != nil {
		t.Fatal(err)
	}
	if err := lab.Ping(l.PodNS(p), old.IP.String()); err != nil {
		t.Errorf("a new pod beside a bridged one -> it: %v", err)
	}

	// Drained: no pods left; the restarted agent wires routed pods.
	for _, q := range append(n1.Pods[:0:0], n1.Pods...) {
		if err := l.DelPod(ctx, n1, q); err != nil {
			t.Fatal(err)
		}
	}
	restartAuto()
	if st := status(t, l, n1); st.PodInterface != "routed" || !strings.Contains(conflist(), `"podInterface": "routed"`) {
		t.Fatalf("auto on a drained node: status says %q, conflist:\n%s", st.PodInterface, conflist())
	}
	p, err = l.AddPod(ctx, n1, "node1-pod3")
	if err != nil {
		t.Fatal(err)
	}
	if out := l.NodeNS(n1).MustRun(t, "ip", "-o", "link", "show", bridge.HostVethName(p.Name, "eth0")); strings.Contains(out, "master") {
		t.Errorf("a pod wired after the switch is on a bridge: %s", out)
	}
	for _, q := range n2.Pods {
		if err := lab.Ping(l.PodNS(p), q.IP.String()); err != nil {
			t.Errorf("routed pod on node1 -> bridged pod on node2: %v", err)
		}
		if err := lab.Ping(l.PodNS(q), p.IP.String()); err != nil {
			t.Errorf("bridged pod on node2 -> routed pod on node1: %v", err)
		}
	}
}

// Package cluster_test runs multi-node netagent clusters in network namespaces (pkg/lab):
// real agents, a real etcd, pods wired by the real CNI plugin, real traffic.
package cluster_test

import (
	"context"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/agent"
	"github.com/netagent/netagent/pkg/antispoof"
	"github.com/netagent/netagent/pkg/bridge"
	"github.com/netagent/netagent/pkg/lab"
	"github.com/netagent/netagent/test/labtest"
	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

func TestMain(m *testing.M) {
	netns.Sweep()
	code := m.Run()
	testbin.Cleanup()
	os.Exit(code)
}

func newLab(t *testing.T, backend string, nodes, remote, pods int) *lab.Lab {
	t.Helper()
	return newLabWith(t, lab.Options{Backend: backend, Nodes: nodes, Remote: remote, PodsPerNode: pods})
}

// newLabWith brings up a lab for a test and removes it (printing the agents' logs if the
// test failed) when the test ends.
func newLabWith(t *testing.T, opt lab.Options) *lab.Lab {
	t.Helper()
	return labtest.Up(t, opt, nil)
}

func lastLines(s string, n int) string { return labtest.LastLines(s, n) }

func status(t *testing.T, l *lab.Lab, n *lab.Node) agent.Status {
	t.Helper()
	code, b, err := l.Get(n, "/status")
	if err != nil || code != 200 {
		t.Fatalf("status of %s: %d %v %s", n.Name, code, err, b)
	}
	var st agent.Status
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

func TestBackends(t *testing.T) {
	for _, tc := range []struct {
		backend       string
		nodes, remote int
	}{
		{"host-gw", 3, 0},
		{"vxlan", 3, 1},
		{"hybrid", 4, 1},
	} {
		t.Run(tc.backend, func(t *testing.T) {
			l := newLab(t, tc.backend, tc.nodes, tc.remote, 2)
			m := l.Matrix(context.Background())
			if f := lab.Failures(m); len(f) > 0 {
				t.Errorf("connectivity failures:\n%s", lab.FormatMatrix(m))
			}
			pods := l.Pods()
			a, b := pods[0], pods[len(pods)-1]
			// Pod to pod across nodes keeps its source address.
			l.PodNS(b).Serve(t, 7000, func(client string) string { return client })
			if got, err := l.PodNS(a).Fetch(b.IP.String() + ":7000"); err != nil || got != a.IP.String() {
				t.Errorf("pod %s -> pod %s: server saw %q (%v), want the pod's own %s", a.Name, b.Name, got, err, a.IP)
			}
			// Pod to an underlay host outside the cluster is masqueraded to its node's IP.
			l.ExtNS().Serve(t, 7001, func(client string) string { return client })
			node := l.Nodes[0]
			if got, err := l.PodNS(node.Pods[0]).Fetch(l.Ext.String() + ":7001"); err != nil || got != node.IP.String() {
				t.Errorf("pod -> outside: server saw %q (%v), want node IP %s", got, err, node.IP)
			}
			// Modes per peer as the plan says, and what the kernel has.
			st := status(t, l, l.Nodes[0])
			for _, p := range st.Peers {
				wantMode := map[string]string{"host-gw": "direct", "vxlan": "vxlan"}[tc.backend]
				if tc.backend == "hybrid" {
					wantMode = "direct"
					if strings.HasPrefix(p.PublicIP, "198.51.100.") {
						wantMode = "vxlan"
					}
				}
				if p.Mode != wantMode || !p.Route {
					t.Errorf("node1 peer %s: mode %s route %v, want %s with route", p.Node, p.Mode, p.Route, wantMode)
				}
			}
			wantMTU := map[string]int{"host-gw": 1500, "vxlan": 1450, "hybrid": 1500}[tc.backend]
			if st.PodMTU != wantMTU {
				t.Errorf("pod MTU %d, want %d", st.PodMTU, wantMTU)
			}
			if tc.backend == "hybrid" {
				routes := l.NodeNS(l.Nodes[0]).MustRun(t, "ip", "route", "show", "proto", "180")
				if !strings.Contains(routes, "dev netagent.1 onlink mtu 1450") || !strings.Contains(routes, "via 192.0.2.12 dev eth0") {
					t.Errorf("hybrid routes on node1:\n%s", routes)
				}
			}
		})
	}
}

func TestHostGWWarnsAboutOffLinkPeer(t *testing.T) {
	l := newLab(t, "host-gw", 3, 1, 0)
	st := status(t, l, l.Nodes[0])
	found := false
	for _, p := range st.Peers {
		if p.Node == "node3" {
			found = true
			if p.Mode != "unreachable" || !strings.Contains(p.Reason, "not on-link") {
				t.Errorf("off-link peer under host-gw: mode %s reason %q", p.Mode, p.Reason)
			}
		}
	}
	if !found {
		t.Error("node3 missing from node1's peers")
	}
	if out, _ := l.Status(l.Nodes[0]); !strings.Contains(out, "not on-link") {
		t.Errorf("netagent status does not show the warning:\n%s", out)
	}
}

func TestHealthReadyAndMetrics(t *testing.T) {
	l := newLab(t, "vxlan", 2, 0, 0)
	n := l.Nodes[0]
	for _, path := range []string{"/healthz", "/readyz"} {
		if code, b, err := l.Get(n, path); err != nil || code != 200 {
			t.Errorf("GET %s = %d %v %s", path, code, err, b)
		}
	}
	// The lab sees the peer's route in the kernel a moment before the pass that wrote it
	// updates the peer gauges: wait for them, then check everything in one scrape.
	var b []byte
	waitUntil(t, 5*time.Second, "the peer counted in /metrics", func() bool {
		_, b, _ = l.Get(n, "/metrics")
		return strings.Contains(string(b), `netagent_peers{mode="vxlan"} 1`)
	})
	for _, m := range []string{
		"netagent_lease_held 1", "netagent_lease_ttl_seconds 3", `netagent_peers{mode="vxlan"} 1`,
		"netagent_reconcile_duration_seconds_bucket", "netagent_errors_total", "process_resident_memory_bytes",
	} {
		if !strings.Contains(string(b), m) {
			t.Errorf("/metrics lacks %q", m)
		}
	}
	// A repair shows up as drift, by kind. (Start-up passes caused by the agent's own
	// device creation may have counted some already: compare with the count before.)
	const routeRepairs = `netagent_drift_repairs_total{kind="route"}`
	before := metricValue(t, l, n, routeRepairs)
	l.NodeNS(n).MustRun(t, "ip", "route", "del", status(t, l, l.Nodes[1]).Subnet)
	waitUntil(t, 2*time.Second, "drift counted", func() bool {
		return metricValue(t, l, n, routeRepairs) >= before+1
	})
	// Not ready before the lease and first reconcile: an agent without etcd.
	if err := l.StopAgent(n, false); err != nil {
		t.Fatal(err)
	}
	if err := l.StopEtcd(); err != nil {
		t.Fatal(err)
	}
	if err := l.StartAgent(n); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, "healthz answers while etcd is down", func() bool {
		code, _, err := l.Get(n, "/healthz")
		return err == nil && code == 200
	})
	if code, _, _ := l.Get(n, "/readyz"); code != 503 {
		t.Errorf("/readyz with no lease = %d, want 503", code)
	}
}

// podGuarded reports whether pod p on node n has its anti-spoofing in place: its address in
// the bridge set (a bridged pod) or its own chain on its host veth (a routed pod).
func podGuarded(l *lab.Lab, n *lab.Node, p *lab.Pod) bool {
	ns := l.NodeNS(n)
	if out, err := ns.Run("nft", "list", "set", "bridge", "netagent", "pods"); err == nil && strings.Contains(out, p.IP.String()) {
		return true
	}
	out, err := ns.Run("nft", "list", "chain", "netdev", antispoof.RoutedTable, bridge.HostVethName(p.Name, "eth0"))
	return err == nil && strings.Contains(out, p.IP.String())
}

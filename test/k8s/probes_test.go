package k8s_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"
)

// metricsScraped is issue 13's item 6, /metrics as a scraper off the node sees it: the
// DaemonSet's --metrics-listen serves it on the node's address (host network, port 9477),
// from a pod on another node as an in-cluster Prometheus would; /status and the probes are
// not there (they stay on loopback).
func (l *lab) metricsScraped(t *testing.T, pods []podInfo) {
	ctx := context.Background()
	for _, n := range l.nodes {
		var from podInfo
		for _, p := range pods {
			if p.Node != n.Name {
				from = p
				break
			}
		}
		get := func(path string) (string, error) {
			return l.c.Kubectl(ctx, "exec", from.Name, "--", "sh", "-c",
				fmt.Sprintf("printf 'GET %s HTTP/1.0\\r\\n\\r\\n' | nc -w 3 %s 9477", path, n.IP))
		}
		out, err := get("/metrics")
		if err != nil || !strings.Contains(out, "200 OK") {
			t.Errorf("%s (%s) -> %s:9477/metrics = %v: %.300s", from.Name, from.Node, n.IP, err, out)
			continue
		}
		for _, want := range []string{"netagent_lease_held 1", "netagent_ip_forward 1", `netagent_peers{mode="vxlan"} ` + fmt.Sprint(len(l.nodes)-1)} {
			if !strings.Contains(out, want) {
				t.Errorf("%s's /metrics lacks %q", n.Name, want)
			}
		}
		for _, path := range []string{"/status", "/readyz"} {
			if out, err := get(path); err != nil || !strings.Contains(out, "404") {
				t.Errorf("%s:9477%s = %v: %.200s; want 404 (only /metrics off loopback)", n.IP, path, err, out)
			}
		}
	}
}

// readinessGates is issue 13's item 6, the readiness probe holding a rollout: the
// ConfigMap gets a config the agent refuses, and a rolling restart starts; the first
// restarted agent cannot get a config, so it stays unready and the rollout does not go
// on to the other nodes, whose agents keep running (ready: a running agent keeps its
// dataplane and reports the bad config). With the config put back and the stuck pod
// recreated, the rollout completes.
func (l *lab) readinessGates(t *testing.T) {
	good := l.kubectl("-n", "netagent", "get", "configmap", "netagent-config", "-o", "jsonpath={.data.net-conf\\.json}")
	setConf := func(conf string) {
		patch, _ := json.Marshal(map[string]any{"data": map[string]string{"net-conf.json": conf}})
		l.kubectl("-n", "netagent", "patch", "configmap", "netagent-config", "--type=merge", "-p", string(patch))
	}
	setConf(`{"network": "10.244.0.0/16", "backend": {"type": "ipip"}}`)
	l.kubectl("-n", "netagent", "rollout", "restart", "daemonset/netagent")
	t0 := time.Now()
	// The probe runs every 5 s: 30 s is six chances to become ready.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if out, err := l.c.Kubectl(ctx, "-n", "netagent", "rollout", "status", "daemonset/netagent", "--timeout=30s"); err == nil {
		t.Fatalf("the rollout completed with a config every agent refuses: %s", out)
	}
	var list struct {
		Items []struct {
			Metadata struct {
				Name   string
				Labels map[string]string
			}
			Spec   struct{ NodeName string }
			Status struct {
				Conditions []struct{ Type, Status string }
			}
		}
	}
	if err := json.Unmarshal([]byte(l.kubectl("-n", "netagent", "get", "pods", "-l", "app.kubernetes.io/name=netagent", "-o", "json")), &list); err != nil {
		t.Fatal(err)
	}
	var unready []string
	hashes := map[string]bool{} // the ready pods' revisions
	stuckHash, summary := "", []string{}
	for _, it := range list.Items {
		ready := false
		for _, c := range it.Status.Conditions {
			ready = ready || c.Type == "Ready" && c.Status == "True"
		}
		hash := it.Metadata.Labels["controller-revision-hash"]
		summary = append(summary, fmt.Sprintf("%s on %s revision %s ready=%v", it.Metadata.Name, it.Spec.NodeName, hash, ready))
		if ready {
			hashes[hash] = true
		} else {
			unready, stuckHash = append(unready, it.Metadata.Name), hash
		}
	}
	updated := l.kubectl("-n", "netagent", "get", "ds", "netagent", "-o", "jsonpath={.status.updatedNumberScheduled}")
	t.Logf("%s after the restart with a refused config: %s updated; %s", time.Since(t0).Round(time.Second), updated, strings.Join(summary, "; "))
	if len(unready) != 1 || len(hashes) != 1 || hashes[stuckHash] || len(list.Items) != len(l.nodes) || updated != "1" {
		t.Fatalf("want one updated agent, unready, and the %d others on the old revision and ready (the rollout held)", len(l.nodes)-1)
	}
	stuck := unready
	logs, _ := l.c.Kubectl(context.Background(), "-n", "netagent", "logs", stuck[0])
	if !strings.Contains(logs, "no usable network config yet") || !strings.Contains(logs, "backend.type") {
		t.Errorf("the unready agent's log does not say why:\n%s", logs)
	}
	setConf(good)
	l.kubectl("-n", "netagent", "delete", "pod", stuck[0], "--wait=false")
	l.kubectl("-n", "netagent", "rollout", "status", "daemonset/netagent", "--timeout=180s")
	t.Logf("config put back: rollout complete %s after the restart", time.Since(t0).Round(time.Second))
}

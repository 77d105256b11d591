package containerd

import (
	"cmp"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/netagent/netagent/test/bench/barework"
	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

// TestCRINetworkShare is a benchmark, not a check (CI shares the machine, so it is skipped
// unless NETAGENT_CRI_BENCH=1): it times netagent-cni and the reference chain (bridge with
// isGateway and ipMasq + host-local + portmap, plus loopback, at the plugins version go.mod
// selects) inside containerd's CRI, each under its own containerd, in the same run. The
// network's share of RunPodSandbox (and of StopPodSandbox) is a pod-network sandbox's time
// minus a host-network sandbox's (no netns, no CNI) on the same node; the calls alternate
// between the nodes and between both kinds, and the medians are logged with the ratio.
// A third node runs the CNI benchmark's floor plugin (test/bench/floorcni: only the bare
// kernel work of an attachment, in a Go program exec'd per pod, plus loopback): its ratio is
// the best any plugin of that kind reaches in the runtime's path.
// NETAGENT_CRI_BENCH_N sets the pods per kind and node (default 20).
func TestCRINetworkShare(t *testing.T) {
	count := criBench(t)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Minute)
	defer cancel()
	build := func(p string) string {
		return testbin.Build(t, "github.com/containernetworking/plugins/plugins/"+p, filepath.Base(p))
	}
	loopback := build("main/loopback")
	dataDir := t.TempDir()
	ours := mustJSON(t, map[string]any{"cniVersion": "1.0.0", "name": networkName, "plugins": []any{map[string]any{
		"type": "netagent-cni", "bridge": bridgeName, "subnet": podSubnet.String(),
		"dataDir": filepath.Join(dataDir, "ours"), "capabilities": map[string]bool{"portMappings": true},
	}}})
	ref := mustJSON(t, map[string]any{"cniVersion": "1.0.0", "name": networkName, "plugins": []any{
		map[string]any{"type": "bridge", "bridge": bridgeName, "isGateway": true, "ipMasq": true,
			"ipam": map[string]any{"type": "host-local", "subnet": podSubnet.String(), "dataDir": filepath.Join(dataDir, "ref")}},
		map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}},
	}})
	floorConf := mustJSON(t, map[string]any{"cniVersion": "1.0.0", "name": networkName, "plugins": []any{map[string]any{
		"type": "netagent-bench-floor", "bridge": bridgeName, "subnet": podSubnet.String(), "capabilities": map[string]bool{"portMappings": true},
	}}})
	nodes := map[string]*node{
		"floor": startNode(ctx, t, nodeOptions{
			plugins:  map[string]string{"netagent-bench-floor": testbin.Build(t, "./test/bench/floorcni", "netagent-bench-floor"), "loopback": loopback},
			confName: "10-floor.conflist", conflist: floorConf,
			setup: func(ns *netns.NS) error {
				if err := addNodeAddr(ns); err != nil {
					return err
				}
				h, err := ns.Handle()
				if err != nil {
					return err
				}
				defer h.Close()
				return barework.Setup(h, bridgeName, podSubnet)
			},
		}),
		"ours": startNode(ctx, t, nodeOptions{
			plugins:  map[string]string{"netagent-cni": testbin.Build(t, "./cmd/cni-plugin", "netagent-cni"), "loopback": loopback},
			confName: "10-netagent.conflist", conflist: ours, setup: addNodeAddr,
		}),
		"ref": startNode(ctx, t, nodeOptions{
			plugins:  map[string]string{"bridge": build("main/bridge"), "host-local": build("ipam/host-local"), "portmap": build("meta/portmap"), "loopback": loopback},
			confName: "10-reference.conflist", conflist: ref, setup: addNodeAddr,
		}),
	}
	share := criShares(ctx, t, nodes, []string{"ours", "ref", "floor"}, count)
	for _, call := range []string{"run", "stop"} {
		t.Logf("%s: network share ours/ref = %.3f, floor/ref = %.3f", call, share[call]["ours"].Seconds()/share[call]["ref"].Seconds(), share[call]["floor"].Seconds()/share[call]["ref"].Seconds())
	}
}

// criShares runs count pod-network and count host-network sandboxes on each node, in
// alternating order (ABBA over the nodes and the two kinds), and returns each node's
// network share of RunPodSandbox ("run") and StopPodSandbox ("stop"): the median with a pod
// network minus the median without one, each logged.
func criShares(ctx context.Context, t *testing.T, nodes map[string]*node, names []string, count int) map[string]map[string]time.Duration {
	t.Helper()
	type key struct{ node, kind, call string }
	took := map[key][]time.Duration{}
	modes := map[string]runtimeapi.NamespaceMode{"pod": runtimeapi.NamespaceMode_POD, "host": runtimeapi.NamespaceMode_NODE}
	for i := range count {
		order := slices.Clone(names)
		kinds := []string{"pod", "host"}
		if i%2 == 1 {
			slices.Reverse(order)
			slices.Reverse(kinds)
		}
		for _, name := range order {
			n := nodes[name]
			for _, kind := range kinds {
				cfg := n.sandboxConfig(fmt.Sprintf("b%s%d", kind, i), nil, modes[kind])
				if kind == "host" {
					cfg.Hostname = "" // the node's UTS namespace: a kubelet sets none either
				}
				callCtx, cancel := context.WithTimeout(ctx, criTimeout)
				start := time.Now()
				resp, err := n.rt.RunPodSandbox(callCtx, &runtimeapi.RunPodSandboxRequest{Config: cfg})
				took[key{name, kind, "run"}] = append(took[key{name, kind, "run"}], time.Since(start))
				if err != nil {
					cancel()
					t.Fatalf("%s: RunPodSandbox: %v", name, err)
				}
				id := resp.GetPodSandboxId()
				n.mu.Lock()
				n.sandboxes = append(n.sandboxes, id)
				n.mu.Unlock()
				n.recordShims()
				start = time.Now()
				_, err = n.rt.StopPodSandbox(callCtx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: id})
				took[key{name, kind, "stop"}] = append(took[key{name, kind, "stop"}], time.Since(start))
				if err == nil {
					_, err = n.rt.RemovePodSandbox(callCtx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: id})
				}
				cancel()
				if err != nil {
					t.Fatalf("%s: stop or remove: %v", name, err)
				}
			}
		}
	}
	med := func(k key) time.Duration {
		ds := slices.Clone(took[k])
		slices.Sort(ds)
		return ds[len(ds)/2]
	}
	// The median of the differences of each round's pair (a pod-network and a host-network
	// sandbox back to back on one node): steadier than the difference of the medians when
	// the network's share is a small part of the call, as it is for our plugin.
	paired := func(name, call string) time.Duration {
		pods, hosts := took[key{name, "pod", call}], took[key{name, "host", call}]
		ds := make([]time.Duration, len(pods))
		for i := range pods {
			ds[i] = pods[i] - hosts[i]
		}
		slices.Sort(ds)
		return ds[len(ds)/2]
	}
	out := map[string]map[string]time.Duration{}
	for _, call := range []string{"run", "stop"} {
		out[call] = map[string]time.Duration{}
		for _, name := range names {
			pod, host := med(key{name, "pod", call}), med(key{name, "host", call})
			out[call][name] = pod - host
			t.Logf("%s %s: pod network %v, host network %v, network share %v (medians of %d); median of the %d pairs' differences %v", call, name,
				pod.Round(100*time.Microsecond), host.Round(100*time.Microsecond), out[call][name].Round(100*time.Microsecond), count,
				count, paired(name, call).Round(100*time.Microsecond))
			out[call+" paired"] = map[string]time.Duration{}
		}
		for _, name := range names {
			out[call+" paired"][name] = paired(name, call)
		}
	}
	return out
}

// TestCRIFamilies is a benchmark like TestCRINetworkShare (NETAGENT_CRI_BENCH=1): our plugin
// on an IPv4-only network and on a dual-stack one, each under its own containerd in the
// same run, pods wired as NETAGENT_CRI_BENCH_POD_INTERFACE says (default routed, the
// agent's default; or bridge). It logs the dual-stack / IPv4-only ratio of the network's
// share of RunPodSandbox (issue 15: at most 1.15) and of StopPodSandbox.
func TestCRIFamilies(t *testing.T) {
	count := criBench(t)
	podIface := cmp.Or(os.Getenv("NETAGENT_CRI_BENCH_POD_INTERFACE"), "routed")
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Minute)
	defer cancel()
	loopback := testbin.Build(t, "github.com/containernetworking/plugins/plugins/main/loopback", "loopback")
	plugin := testbin.Build(t, "./cmd/cni-plugin", "netagent-cni")
	dataDir := t.TempDir()
	conf := func(name string, v6 bool) []byte {
		pc := map[string]any{"type": "netagent-cni", "bridge": bridgeName, "subnet": podSubnet.String(), "podInterface": podIface,
			"dataDir": filepath.Join(dataDir, name), "capabilities": map[string]bool{"portMappings": true}}
		if v6 {
			pc["ipv6Subnet"] = podSubnet6.String()
		}
		return mustJSON(t, map[string]any{"cniVersion": "1.0.0", "name": networkName, "plugins": []any{pc}})
	}
	nodes := map[string]*node{}
	for _, name := range []string{"ipv4", "dual"} {
		nodes[name] = startNode(ctx, t, nodeOptions{
			plugins:  map[string]string{"netagent-cni": plugin, "loopback": loopback},
			confName: "10-netagent.conflist", conflist: conf(name, name == "dual"), setup: addNodeAddr,
		})
	}
	share := criShares(ctx, t, nodes, []string{"ipv4", "dual"}, count)
	for _, call := range []string{"run", "stop"} {
		t.Logf("%s (%s pods): network share dual / IPv4-only = %.3f; by the pairs' differences %.3f", call, podIface,
			share[call]["dual"].Seconds()/share[call]["ipv4"].Seconds(), share[call+" paired"]["dual"].Seconds()/share[call+" paired"]["ipv4"].Seconds())
	}
}

// criBench skips a CRI benchmark unless NETAGENT_CRI_BENCH is set, and returns the pods per
// kind and node, NETAGENT_CRI_BENCH_N (default 20).
func criBench(t *testing.T) int {
	t.Helper()
	if os.Getenv("NETAGENT_CRI_BENCH") == "" {
		t.Skip("set NETAGENT_CRI_BENCH=1 to run the CRI benchmark")
	}
	netns.RequireRoot(t)
	count := 20
	if s := os.Getenv("NETAGENT_CRI_BENCH_N"); s != "" {
		var err error
		if count, err = strconv.Atoi(s); err != nil || count < 1 {
			t.Fatalf("NETAGENT_CRI_BENCH_N=%q is not a positive number", s)
		}
	}
	return count
}

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

	"github.com/netagent/netagent/pkg/atomicfile"
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
	return criSummary(t, criSamples(ctx, t, nodes, names, count), names)
}

// criKey names one series of criSamples: the node's name, "pod" or "host", "run" or "stop".
type criKey struct{ node, kind, call string }

// criSamples times count pod-network and count host-network sandboxes on each node, in
// alternating order (ABBA over the nodes and the two kinds): RunPodSandbox and
// StopPodSandbox, in the order run.
func criSamples(ctx context.Context, t *testing.T, nodes map[string]*node, names []string, count int) map[criKey][]time.Duration {
	t.Helper()
	took := map[criKey][]time.Duration{}
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
				took[criKey{name, kind, "run"}] = append(took[criKey{name, kind, "run"}], time.Since(start))
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
				took[criKey{name, kind, "stop"}] = append(took[criKey{name, kind, "stop"}], time.Since(start))
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
	return took
}

// criSummary logs and returns each name's network share of RunPodSandbox ("run") and
// StopPodSandbox ("stop") from took: the median with a pod network minus the median
// without one; and under "run paired" and "stop paired", the median of the differences of
// each round's pair (a pod-network and a host-network sandbox back to back on one node),
// steadier than the difference of the medians when the network's share is a small part of
// the call, as it is for our plugin.
func criSummary(t *testing.T, took map[criKey][]time.Duration, names []string) map[string]map[string]time.Duration {
	t.Helper()
	paired := func(name, call string) time.Duration {
		pods, hosts := took[criKey{name, "pod", call}], took[criKey{name, "host", call}]
		ds := make([]time.Duration, len(pods))
		for i := range pods {
			ds[i] = pods[i] - hosts[i]
		}
		return median(ds)
	}
	out := map[string]map[string]time.Duration{}
	for _, call := range []string{"run", "stop"} {
		out[call] = map[string]time.Duration{}
		out[call+" paired"] = map[string]time.Duration{}
		for _, name := range names {
			pod, host := median(took[criKey{name, "pod", call}]), median(took[criKey{name, "host", call}])
			out[call][name] = pod - host
			out[call+" paired"][name] = paired(name, call)
			n := len(took[criKey{name, "pod", call}])
			t.Logf("%s %s: pod network %v, host network %v, network share %v (medians of %d); median of the %d pairs' differences %v", call, name,
				pod.Round(100*time.Microsecond), host.Round(100*time.Microsecond), out[call][name].Round(100*time.Microsecond), n,
				n, out[call+" paired"][name].Round(100*time.Microsecond))
		}
	}
	return out
}

// median is the median of ds (the upper one of an even count).
func median(ds []time.Duration) time.Duration {
	ds = slices.Sorted(slices.Values(ds))
	return ds[len(ds)/2]
}

// TestCRIFamilies is a benchmark like TestCRINetworkShare (NETAGENT_CRI_BENCH=1): our plugin
// on an IPv4-only network and on a dual-stack one, pods wired as
// NETAGENT_CRI_BENCH_POD_INTERFACE says (default routed, the agent's default; or bridge).
// It logs the dual-stack / IPv4-only ratio of the network's share of RunPodSandbox (issue
// 15: at most 1.15) and of StopPodSandbox. Two containerds serve the two networks, and half
// way through they swap them: one containerd's host-network sandboxes were 2 ms faster than
// the other's in every run, which alone moved the ratio of two ~7 ms shares by 0.2-0.4, so
// each family is measured on both, against one baseline of all host-network sandboxes.
func TestCRIFamilies(t *testing.T) {
	count := criBench(t)
	podIface := cmp.Or(os.Getenv("NETAGENT_CRI_BENCH_POD_INTERFACE"), "routed")
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Minute)
	defer cancel()
	loopback := testbin.Build(t, "github.com/containernetworking/plugins/plugins/main/loopback", "loopback")
	plugin := testbin.Build(t, "./cmd/cni-plugin", "netagent-cni")
	dataDir := t.TempDir()
	const confName = "10-netagent.conflist"
	conf := func(node, family string) []byte {
		pc := map[string]any{"type": "netagent-cni", "bridge": bridgeName, "subnet": podSubnet.String(), "podInterface": podIface,
			"dataDir": filepath.Join(dataDir, node+"-"+family), "capabilities": map[string]bool{"portMappings": true}}
		if family == "dual" {
			pc["ipv6Subnet"] = podSubnet6.String()
		}
		return mustJSON(t, map[string]any{"cniVersion": "1.0.0", "name": networkName, "plugins": []any{pc}})
	}
	a := startNode(ctx, t, nodeOptions{
		plugins:  map[string]string{"netagent-cni": plugin, "loopback": loopback},
		confName: confName, conflist: conf("a", "ipv4"), setup: addNodeAddr,
	})
	b := startNode(ctx, t, nodeOptions{
		plugins:  map[string]string{"netagent-cni": plugin, "loopback": loopback},
		confName: confName, conflist: conf("b", "dual"), setup: addNodeAddr,
	})
	names := []string{"ipv4", "dual"}
	t.Log("containerd a: IPv4 only, b: dual stack")
	first := criSamples(ctx, t, map[string]*node{"ipv4": a, "dual": b}, names, count/2)
	criSummary(t, first, names)
	for _, sw := range []struct {
		n      *node
		name   string
		family string
		ips    int
	}{{a, "a", "dual", 2}, {b, "b", "ipv4", 1}} {
		if err := atomicfile.Write(filepath.Join(sw.n.dir, "cni/conf", confName), conf(sw.name, sw.family), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := waitFamilies(ctx, sw.n, sw.ips); err != nil {
			t.Fatalf("containerd %s after its network changed to %s: %v", sw.name, sw.family, err)
		}
	}
	t.Log("containerd a: dual stack, b: IPv4 only")
	second := criSamples(ctx, t, map[string]*node{"ipv4": b, "dual": a}, names, count-count/2)
	criSummary(t, second, names)
	for k, ds := range second {
		first[k] = append(first[k], ds...)
	}
	t.Log("both halves:")
	share := criSummary(t, first, names)
	for _, call := range []string{"run", "stop"} {
		// A host-network sandbox involves no CNI network, so with both containerds serving
		// both families, all of them are one baseline: half the noise of a baseline per
		// family, which is most of the noise of a share.
		host := median(append(slices.Clone(first[criKey{"ipv4", "host", call}]), first[criKey{"dual", "host", call}]...))
		pod4, pod6 := median(first[criKey{"ipv4", "pod", call}]), median(first[criKey{"dual", "pod", call}])
		t.Logf("%s (%s pods): network share dual / IPv4-only = %.3f; by the pairs' differences %.3f; against all %d host-network sandboxes (%v) %.3f",
			call, podIface, share[call]["dual"].Seconds()/share[call]["ipv4"].Seconds(),
			share[call+" paired"]["dual"].Seconds()/share[call+" paired"]["ipv4"].Seconds(),
			2*count, host.Round(100*time.Microsecond), (pod6-host).Seconds()/(pod4-host).Seconds())
	}
}

// waitFamilies waits until containerd n wires pods with ips addresses (1: IPv4 only, 2:
// dual stack): it reloads its CNI configuration when the file changes, a moment later.
// Each try is a pod sandbox, removed again.
func waitFamilies(ctx context.Context, n *node, ips int) error {
	deadline := time.Now().Add(time.Minute)
	for try := 0; ; try++ {
		p, err := n.runPod(ctx, fmt.Sprintf("probe%d", try), nil)
		if p != nil {
			if rerr := n.removePod(ctx, p.id); err == nil {
				err = rerr
			}
		}
		if err != nil {
			return err
		}
		if got := 1 + len(p.additional); got == ips {
			return nil
		} else if time.Now().After(deadline) {
			return fmt.Errorf("pods still get %d addresses, want %d", got, ips)
		}
		time.Sleep(200 * time.Millisecond)
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

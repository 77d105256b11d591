package cluster_test

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/netagent/netagent/pkg/kube"
	"github.com/netagent/netagent/pkg/lab"
	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/test/kubeapi"
)

// Agents with --subnet-manager=kube against a stand-in API server (TLS, client
// certificates) on the underlay: subnets are the Nodes' podCIDRs, peers come from the
// Node informer, a deleted Node's routes disappear everywhere, and a re-registered Node
// comes back.
func TestKubeSubnetManager(t *testing.T) {
	api := kubeapi.New()
	l := newLabWith(t, lab.Options{Backend: "hybrid", Nodes: 3, Remote: 1, PodsPerNode: 1, Kube: api})

	for i, n := range l.Nodes {
		st := status(t, l, n)
		if st.Subnet != l.PodCIDR(i) {
			t.Errorf("%s leased %s, want its podCIDR %s", n.Name, st.Subnet, l.PodCIDR(i))
		}
		checkAnnotations(t, api, n.Name, map[string]string{kube.AnnPublicIP: n.IP.String(), kube.AnnBackend: "hybrid", kube.AnnVTEPMAC: plan.VTEPMAC(n.Name).String()})
	}
	checkMatrix(t, l)
	n3 := l.Nodes[2]
	sub3 := l.PodCIDR(2)

	// A broken watch keeps every peer, and later changes still arrive.
	api.BreakWatches()
	time.Sleep(1500 * time.Millisecond) // client-go's reflector waits ~0.8 s before it watches again
	for _, n := range l.Nodes[:2] {
		if !hasRoute(t, l, n, sub3) {
			t.Fatalf("%s lost node3's route when the watch broke", n.Name)
		}
	}

	// The Node is deleted (kubectl delete node): its routes and FDB entries go away on
	// every other node.
	if err := api.Delete(n3.Name); err != nil {
		t.Fatal(err)
	}
	for _, n := range l.Nodes[:2] {
		d := waitUntil(t, 5*time.Second, "node3's route removed on "+n.Name, func() bool { return !hasRoute(t, l, n, sub3) })
		t.Logf("%s dropped the deleted node's route after %s", n.Name, d)
		if fdb := l.NodeNS(n).MustRun(t, "bridge", "fdb", "show", "dev", "netagent.1"); strings.Contains(fdb, n3.IP.String()) {
			t.Errorf("%s still has an FDB entry for node3:\n%s", n.Name, fdb)
		}
	}

	// The kubelet registers it again with the same podCIDR: node3's agent notices its Node
	// is back, publishes its annotations again, and every peer routes to it.
	cidr := sub3
	if err := api.Create(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n3.Name}, Spec: corev1.NodeSpec{PodCIDR: cidr, PodCIDRs: []string{cidr}}}); err != nil {
		t.Fatal(err)
	}
	for _, n := range l.Nodes[:2] {
		d := waitUntil(t, 10*time.Second, "node3's route back on "+n.Name, func() bool { return hasRoute(t, l, n, sub3) })
		t.Logf("%s routes to the re-registered node after %s", n.Name, d)
	}
	if m := l.Matrix(context.Background()); len(lab.Failures(m)) > 0 {
		t.Fatalf("connectivity failures after re-registration:\n%s", lab.FormatMatrix(m))
	}

	// A restart adopts the dataplane without a single netlink change and without writing
	// to the API (the annotations are already right).
	patches := api.PatchCount(l.Nodes[0].Name)
	stopMon := monitor(t, l.NodeNS(l.Nodes[0]))
	if err := l.StopAgent(l.Nodes[0], true); err != nil {
		t.Fatal(err)
	}
	if err := l.StartAgent(l.Nodes[0]); err != nil {
		t.Fatal(err)
	}
	if err := l.WaitReady(context.Background(), l.Nodes[0], 10*time.Second); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if ch := ourChanges(stopMon()); len(ch) > 0 {
		t.Errorf("the restart changed netagent's kernel objects:\n%q", ch)
	}
	if got := api.PatchCount(l.Nodes[0].Name) - patches; got != 0 {
		t.Errorf("restart: %d annotation patches, want none (they were right)", got)
	}
}

// The kube subnet manager in a dual-stack cluster: each node leases both podCIDRs of its
// Node, publishes both underlay addresses, and every pod reaches every pod over each
// family (hybrid: a directly routed peer and one behind a router, over VXLAN); a deleted
// Node's routes of both families go from every other node.
func TestKubeSubnetManagerDualStack(t *testing.T) {
	api := kubeapi.New()
	l := newLabWith(t, lab.Options{Backend: "hybrid", Nodes: 3, Remote: 1, PodsPerNode: 1, Kube: api, IPFamily: "dual"})
	for i, n := range l.Nodes {
		st := status(t, l, n)
		if st.Subnet != l.PodCIDR(i) || st.Subnet6 != l.PodCIDR6(i) {
			t.Errorf("%s leased %s and %s, want its podCIDRs %s and %s", n.Name, st.Subnet, st.Subnet6, l.PodCIDR(i), l.PodCIDR6(i))
		}
		checkAnnotations(t, api, n.Name, map[string]string{kube.AnnPublicIP: n.IP.String(), kube.AnnPublicIP6: n.IP6.String()})
	}
	checkMatrix(t, l)
	n3 := l.Nodes[2]
	if err := api.Delete(n3.Name); err != nil {
		t.Fatal(err)
	}
	for _, n := range l.Nodes[:2] {
		for _, sub := range []string{l.PodCIDR(2), l.PodCIDR6(2)} {
			waitUntil(t, 5*time.Second, "node3's route to "+sub+" removed on "+n.Name, func() bool { return !hasRoute(t, l, n, sub) })
		}
	}
}

func checkAnnotations(t *testing.T, api *kubeapi.Server, node string, want map[string]string) {
	t.Helper()
	n, _ := api.Get(node)
	for k, v := range want {
		if n.Annotations[k] != v {
			t.Errorf("%s: annotation %s=%q, want %q", node, k, n.Annotations[k], v)
		}
	}
}

func checkMatrix(t *testing.T, l *lab.Lab) {
	t.Helper()
	if m := l.Matrix(context.Background()); len(lab.Failures(m)) > 0 {
		t.Fatalf("connectivity failures:\n%s", lab.FormatMatrix(m))
	}
}

package kubeapi

import (
	"context"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"

	"github.com/netagent/netagent/pkg/kube"
	"github.com/netagent/netagent/pkg/lease"
)

// The stand-in serves what the agent's real client (kube.NewNodes over HTTP) and its
// informer need, including a watch that resumes after a break without losing events.
func TestStandInWithTheAgentsClient(t *testing.T) {
	api := New()
	srv := httptest.NewServer(api)
	defer srv.Close()
	nodes, err := kube.NewNodes(&rest.Config{Host: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	add := func(name, cidr, ip string) {
		t.Helper()
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: map[string]string{kube.AnnPublicIP: ip, kube.AnnBackend: "host-gw"}},
			Spec: corev1.NodeSpec{PodCIDR: cidr}}
		if err := api.Create(n); err != nil {
			t.Fatal(err)
		}
	}
	add("a", "10.244.1.0/24", "192.0.2.11")
	if _, err := nodes.Get(ctx, "missing"); !apierrors.IsNotFound(err) {
		t.Fatalf("get missing node: %v, want NotFound", err)
	}
	patch := fmt.Appendf(nil, `{"metadata":{"annotations":{%q:"192.0.2.21"}}}`, kube.AnnPublicIP)
	n, err := nodes.Patch(ctx, "a", types.MergePatchType, patch)
	if err != nil || n.Annotations[kube.AnnPublicIP] != "192.0.2.21" || n.Spec.PodCIDR != "10.244.1.0/24" {
		t.Fatalf("patch: %v %+v", err, n)
	}
	if _, err := nodes.Patch(ctx, "a", types.JSONPatchType, []byte(`[]`)); err == nil {
		t.Fatal("a JSON patch was accepted; the stand-in only does merge patches")
	}

	peers := lease.NewPeers()
	changed := make(chan struct{}, 1)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go kube.New(nodes, "a", "", slog.New(slog.DiscardHandler)).Watch(wctx, peers, changed, nil)
	want := func(what string, n int) {
		t.Helper()
		deadline := time.After(10 * time.Second)
		for peers.Len() != n {
			select {
			case <-changed:
			case <-time.After(10 * time.Millisecond):
			case <-deadline:
				t.Fatalf("%s: %d peers, want %d", what, peers.Len(), n)
			}
		}
	}
	want("first list", 1)
	add("b", "10.244.2.0/24", "192.0.2.12")
	want("watched add", 2)
	api.BreakWatches()
	add("c", "10.244.3.0/24", "192.0.2.13") // while no watch is open: resumed from its revision
	want("add during a broken watch", 3)
	if err := api.Delete("b"); err != nil {
		t.Fatal(err)
	}
	want("delete", 2)
}

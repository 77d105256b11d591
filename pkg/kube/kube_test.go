package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/plan"
)

// fakeNodes adapts the fake clientset's Nodes client to Nodes, converting its core/v1
// Nodes to ours through JSON as the API server's response would be decoded, and telling
// the informer (as the clientset does) that the fake cannot stream lists.
type fakeNodes struct {
	c  corev1client.NodeInterface
	cs *fake.Clientset
}

func (f fakeNodes) IsWatchListSemanticsUnSupported() bool {
	return f.cs.IsWatchListSemanticsUnSupported()
}

func convert[T any](in any) T {
	var out T
	b, err := json.Marshal(in)
	if err == nil {
		err = json.Unmarshal(b, &out)
	}
	if err != nil {
		panic(err)
	}
	return out
}

func (f fakeNodes) Get(ctx context.Context, name string) (*Node, error) {
	n, err := f.c.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	return convert[*Node](n), nil
}

func (f fakeNodes) List(ctx context.Context, opts metav1.ListOptions) (*NodeList, error) {
	l, err := f.c.List(ctx, opts)
	if err != nil {
		return nil, err
	}
	return convert[*NodeList](l), nil
}

func (f fakeNodes) Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	w, err := f.c.Watch(ctx, opts)
	if err != nil {
		return nil, err
	}
	return watch.Filter(w, func(e watch.Event) (watch.Event, bool) {
		if n, ok := e.Object.(*corev1.Node); ok {
			e.Object = convert[*Node](n)
		}
		return e, true
	}), nil
}

func (f fakeNodes) Patch(ctx context.Context, name string, pt types.PatchType, data []byte) (*Node, error) {
	n, err := f.c.Patch(ctx, name, pt, data, metav1.PatchOptions{})
	if err != nil {
		return nil, err
	}
	return convert[*Node](n), nil
}

func nodesOf(cs *fake.Clientset) Nodes { return fakeNodes{cs.CoreV1().Nodes(), cs} }

// ours is a core/v1 Node as netagent decodes it.
func ours(n *corev1.Node) *Node { return convert[*Node](n) }

func node(name string, podCIDRs []string, ann map[string]string) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: ann}}
	if len(podCIDRs) > 0 {
		n.Spec.PodCIDR = podCIDRs[0]
		n.Spec.PodCIDRs = podCIDRs
	}
	// Status is what real nodes are mostly made of; the informer's transform drops it.
	n.Status.Images = []corev1.ContainerImage{{Names: []string{"registry.example/big:1"}, SizeBytes: 1 << 30}}
	return n
}

func withIP6(ann map[string]string, ip6 string) map[string]string {
	ann[AnnPublicIP6] = ip6
	return ann
}

func published(ip, backend, mac string) map[string]string {
	return map[string]string{AnnPublicIP: ip, AnnBackend: backend, AnnVTEPMAC: mac}
}

// wgPub is a valid WireGuard public key.
const wgPub = "pOCSkrZRwni5dyxWn1+puxPZBrRqtoyd+dwrRAn4ogk="

func wgPublished(key, port string) map[string]string {
	return map[string]string{AnnPublicIP: "192.0.2.11", AnnBackend: "wireguard", AnnWGPublicKey: key, AnnWGPort: port}
}

func netConf(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "net-conf.json")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

const vxlanConf = `{"network":"10.244.0.0/16","backend":{"type":"vxlan"}}`

func TestLeaseOf(t *testing.T) {
	mac := plan.VTEPMAC("n1").String()
	for _, c := range []struct {
		name    string
		node    *corev1.Node
		want    string // lease rendered, or the error's text
		notPub  bool
		wantErr bool
	}{
		{name: "published", node: node("n1", []string{"10.244.1.0/24"}, published("192.0.2.11", "vxlan", strings.ToUpper(mac))),
			want: "n1 10.244.1.0/24 192.0.2.11 vxlan " + mac},
		{name: "dual stack takes both", node: node("n1", []string{"fd00:1::/64", "10.244.1.0/24"}, published("192.0.2.11", "host-gw", "")),
			want: "n1 10.244.1.0/24 fd00:1::/64 192.0.2.11 invalid IP host-gw "},
		{name: "unmasked CIDR is masked", node: node("n1", []string{"10.244.1.7/24"}, published("192.0.2.11", "host-gw", "")),
			want: "n1 10.244.1.0/24 192.0.2.11 host-gw "},
		{name: "agent not started", node: node("n1", []string{"10.244.1.0/24"}, nil), notPub: true},
		{name: "no podCIDR", node: node("n1", nil, published("192.0.2.11", "vxlan", mac)), wantErr: true, want: "no spec.podCIDR"},
		{name: "IPv6 only", node: node("n1", []string{"fd00:1::/64"}, published("192.0.2.11", "vxlan", mac)),
			want: "n1 invalid Prefix fd00:1::/64 192.0.2.11 invalid IP vxlan " + mac},
		{name: "dual stack, both underlays", node: node("n1", []string{"10.244.1.0/24", "fd00:1::/64"}, withIP6(published("192.0.2.11", "host-gw", ""), "2001:db8::11")),
			want: "n1 10.244.1.0/24 fd00:1::/64 192.0.2.11 2001:db8::11 host-gw "},
		{name: "IPv6 underlay only", node: node("n1", []string{"fd00:1::/64"}, map[string]string{AnnPublicIP6: "2001:db8::11", AnnBackend: "vxlan", AnnVTEPMAC: mac}),
			want: "n1 invalid Prefix fd00:1::/64 invalid IP 2001:db8::11 vxlan " + mac},
		{name: "IPv4 in the IPv6 annotation", node: node("n1", []string{"fd00:1::/64"}, map[string]string{AnnPublicIP6: "192.0.2.11", AnnBackend: "vxlan"}), wantErr: true, want: "invalid IPv6 public IP"},
		{name: "link-local IPv6 underlay", node: node("n1", []string{"fd00:1::/64"}, map[string]string{AnnPublicIP6: "fe80::1", AnnBackend: "vxlan"}), wantErr: true, want: "invalid IPv6 public IP"},
		{name: "garbage IPv6 underlay", node: node("n1", []string{"fd00:1::/64"}, map[string]string{AnnPublicIP6: "nope", AnnBackend: "vxlan"}), wantErr: true, want: AnnPublicIP6},
		{name: "garbage CIDR", node: node("n1", []string{"10.244.1.0/33"}, published("192.0.2.11", "vxlan", mac)), wantErr: true, want: "spec.podCIDRs entry"},
		{name: "bad IP", node: node("n1", []string{"10.244.1.0/24"}, published("192.0.2.300", "vxlan", mac)), wantErr: true, want: AnnPublicIP},
		{name: "IPv6 public IP", node: node("n1", []string{"10.244.1.0/24"}, published("2001:db8::1", "vxlan", mac)), wantErr: true, want: "invalid public IP"},
		{name: "bad MAC", node: node("n1", []string{"10.244.1.0/24"}, published("192.0.2.11", "vxlan", "zz:zz")), wantErr: true, want: "invalid VTEP MAC"},
		{name: "wireguard", node: node("n1", []string{"10.244.1.0/24"}, wgPublished(wgPub, "51820")),
			want: "n1 10.244.1.0/24 192.0.2.11 wireguard  " + wgPub + " 51820"},
		{name: "wireguard port not a number", node: node("n1", []string{"10.244.1.0/24"}, wgPublished(wgPub, "x")), wantErr: true, want: AnnWGPort},
		{name: "wireguard port out of range", node: node("n1", []string{"10.244.1.0/24"}, wgPublished(wgPub, "65536")), wantErr: true, want: AnnWGPort},
		{name: "wireguard port 0", node: node("n1", []string{"10.244.1.0/24"}, wgPublished(wgPub, "0")), wantErr: true, want: "invalid WireGuard port 0"},
		{name: "wireguard key without port", node: node("n1", []string{"10.244.1.0/24"}, map[string]string{AnnPublicIP: "192.0.2.11", AnnWGPublicKey: wgPub}), wantErr: true, want: "invalid WireGuard port"},
		{name: "wireguard bad key", node: node("n1", []string{"10.244.1.0/24"}, wgPublished("AAAA", "51820")), wantErr: true, want: "invalid WireGuard public key"},
	} {
		t.Run(c.name, func(t *testing.T) {
			l, err := LeaseOf(ours(c.node))
			switch {
			case c.notPub:
				if err != errNotPublished {
					t.Fatalf("err = %v, want errNotPublished", err)
				}
			case c.wantErr:
				if err == nil || !strings.Contains(err.Error(), c.want) {
					t.Fatalf("err = %v, want one containing %q", err, c.want)
				}
			case err != nil:
				t.Fatal(err)
			default:
				got := fmt.Sprintf("%s %s %s %s %s", l.Node, l.Subnet, l.PublicIP, l.Backend, l.VTEPMAC)
				if l.Subnet6.IsValid() {
					got = fmt.Sprintf("%s %s %s %s %s %s %s", l.Node, l.Subnet, l.Subnet6, l.PublicIP, l.PublicIP6, l.Backend, l.VTEPMAC)
				}
				if l.WGPublicKey != "" {
					got += fmt.Sprintf(" %s %d", l.WGPublicKey, l.WGPort)
				}
				if got != c.want {
					t.Fatalf("lease = %q, want %q", got, c.want)
				}
			}
		})
	}
}

func TestAcquire(t *testing.T) {
	cfg, _ := config.Parse([]byte(vxlanConf))
	self := lease.Lease{Node: "n1", PublicIP: netip.MustParseAddr("192.0.2.11"), Backend: "vxlan", VTEPMAC: plan.VTEPMAC("n1").String()}
	for _, c := range []struct {
		name    string
		nodes   []*corev1.Node
		want    string // subnet, or a piece of the error
		wantErr bool
	}{
		{name: "podCIDR", nodes: []*corev1.Node{node("n1", []string{"10.244.7.0/24"}, nil)}, want: "10.244.7.0/24"},
		{name: "no podCIDR names the controller-manager flags", nodes: []*corev1.Node{node("n1", nil, nil)}, wantErr: true,
			want: "--allocate-node-cidrs=true --cluster-cidr=10.244.0.0/16"},
		{name: "outside the network", nodes: []*corev1.Node{node("n1", []string{"10.99.7.0/24"}, nil)}, wantErr: true,
			want: "outside the network 10.244.0.0/16"},
		{name: "wider than the network", nodes: []*corev1.Node{node("n1", []string{"10.0.0.0/8"}, nil)}, wantErr: true,
			want: "outside the network"},
		{name: "no such node", wantErr: true, want: `node "n1" does not exist`},
	} {
		t.Run(c.name, func(t *testing.T) {
			cs := fake.NewClientset()
			for _, n := range c.nodes {
				if _, err := cs.CoreV1().Nodes().Create(t.Context(), n, metav1.CreateOptions{}); err != nil {
					t.Fatal(err)
				}
			}
			s := New(nodesOf(cs), "n1", "", slog.New(slog.DiscardHandler))
			h, err := s.Acquire(t.Context(), cfg, self, netip.Prefix{})
			if c.wantErr {
				if err == nil || !strings.Contains(err.Error(), c.want) {
					t.Fatalf("err = %v, want one containing %q", err, c.want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if h.Lease.Subnet.String() != c.want {
				t.Fatalf("subnet %s, want %s", h.Lease.Subnet, c.want)
			}
			n, _ := cs.CoreV1().Nodes().Get(t.Context(), "n1", metav1.GetOptions{})
			if got, want := n.Annotations, published("192.0.2.11", "vxlan", self.VTEPMAC); !mapsEqual(got, want) {
				t.Fatalf("annotations %v, want %v", got, want)
			}
			// Republished as host-gw: the stale VTEP MAC annotation is removed, not left behind.
			hg := self
			hg.Backend, hg.VTEPMAC = "host-gw", ""
			if _, err := s.Acquire(t.Context(), cfg, hg, netip.Prefix{}); err != nil {
				t.Fatal(err)
			}
			n, _ = cs.CoreV1().Nodes().Get(t.Context(), "n1", metav1.GetOptions{})
			if _, ok := n.Annotations[AnnVTEPMAC]; ok || n.Annotations[AnnBackend] != "host-gw" {
				t.Fatalf("annotations after host-gw %v", n.Annotations)
			}
		})
	}
}

// A dual-stack config takes both podCIDRs and publishes both underlay addresses; a family
// the config leaves off is not leased even if the Node has a podCIDR of it.
func TestAcquireDualStack(t *testing.T) {
	dual, _ := config.Parse([]byte(`{"network":"10.244.0.0/16","ipv6Network":"fd00:10:244::/48","backend":{"type":"vxlan"}}`))
	v6only, _ := config.Parse([]byte(`{"ipv6Network":"fd00:10:244::/48","backend":{"type":"vxlan"}}`))
	v4only, _ := config.Parse([]byte(vxlanConf))
	self := lease.Lease{Node: "n1", PublicIP: netip.MustParseAddr("192.0.2.11"), PublicIP6: netip.MustParseAddr("2001:db8::11"), Backend: "vxlan", VTEPMAC: plan.VTEPMAC("n1").String()}
	both := []string{"10.244.7.0/24", "fd00:10:244:7::/64"}
	for _, c := range []struct {
		name  string
		cfg   config.Network
		cidrs []string
		want  string // subnets, or a piece of the error
	}{
		{"dual", dual, both, "10.244.7.0/24 fd00:10:244:7::/64"},
		{"IPv6 only", v6only, []string{"fd00:10:244:7::/64"}, "invalid Prefix fd00:10:244:7::/64"},
		{"IPv4 config on a dual-stack node", v4only, both, "10.244.7.0/24 invalid Prefix"},
		{"no IPv6 podCIDR", dual, []string{"10.244.7.0/24"}, "holds no IPv6 subnet"},
		{"IPv6 podCIDR outside", dual, []string{"10.244.7.0/24", "fd00:99::/64"}, "outside the network fd00:10:244::/48"},
		{"no podCIDR names both cluster CIDRs", dual, nil, "--cluster-cidr=10.244.0.0/16,fd00:10:244::/48"},
	} {
		t.Run(c.name, func(t *testing.T) {
			cs := fake.NewClientset()
			if _, err := cs.CoreV1().Nodes().Create(t.Context(), node("n1", c.cidrs, nil), metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			s := New(nodesOf(cs), "n1", "", slog.New(slog.DiscardHandler))
			h, err := s.Acquire(t.Context(), c.cfg, self, netip.Prefix{})
			if err != nil {
				if !strings.Contains(err.Error(), c.want) {
					t.Fatalf("Acquire() = %v, want %q", err, c.want)
				}
				return
			}
			if got := fmt.Sprintf("%s %s", h.Lease.Subnet, h.Lease.Subnet6); got != c.want {
				t.Fatalf("Acquire() = %s, want %s", got, c.want)
			}
			n, _ := cs.CoreV1().Nodes().Get(t.Context(), "n1", metav1.GetOptions{})
			if n.Annotations[AnnPublicIP6] != "2001:db8::11" || n.Annotations[AnnPublicIP] != "192.0.2.11" {
				t.Errorf("annotations %v, want both public IPs", n.Annotations)
			}
			// What peers read back is what was leased (as the Peers view keeps it).
			l, err := LeaseOf(ours(n))
			l = lease.Rules{Network: c.cfg.Network, Network6: c.cfg.IPv6Network}.Enabled(l)
			if err != nil || l.Subnet != h.Lease.Subnet || l.Subnet6 != h.Lease.Subnet6 || l.PublicIP6 != self.PublicIP6 {
				t.Errorf("LeaseOf(the Node) = %+v, %v; want %+v", l, err, h.Lease)
			}
			if _, err := s.Renew(t.Context(), h); err != nil {
				t.Errorf("Renew() = %v", err)
			}
		})
	}
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

type countStats struct{ n int }

func (c *countStats) WatchRestart(string) { c.n++ }

// cluster runs Watch against a fake clientset and renders the plan node n1 would build.
type cluster struct {
	t       *testing.T
	cs      *fake.Clientset
	s       *Store
	peers   *lease.Peers
	changed chan struct{}
	cfg     config.Network
}

func newCluster(t *testing.T, backend string, nodes ...*corev1.Node) *cluster {
	t.Helper()
	cfg, err := config.Parse(fmt.Appendf(nil, `{"network":"10.244.0.0/16","backend":{"type":%q}}`, backend))
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{t: t, cs: fake.NewClientset(), peers: lease.NewPeers(), changed: make(chan struct{}, 1), cfg: cfg}
	for _, n := range nodes {
		c.create(n)
	}
	c.s = New(nodesOf(c.cs), "n1", "", slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); c.s.Watch(ctx, c.peers, c.changed, &countStats{}) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-c.changed:
	case <-time.After(10 * time.Second):
		t.Fatal("no signal after the first list")
	}
	return c
}

func (c *cluster) create(n *corev1.Node) {
	c.t.Helper()
	if _, err := c.cs.CoreV1().Nodes().Create(context.Background(), n, metav1.CreateOptions{}); err != nil {
		c.t.Fatal(err)
	}
}

func (c *cluster) annotate(name string, ann map[string]string) {
	c.t.Helper()
	n, err := c.cs.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		c.t.Fatal(err)
	}
	n.Annotations = ann
	if _, err := c.cs.CoreV1().Nodes().Update(context.Background(), n, metav1.UpdateOptions{}); err != nil {
		c.t.Fatal(err)
	}
}

// plan waits until node n1's plan renders as want.
func (c *cluster) plan(want ...string) {
	c.t.Helper()
	slices.Sort(want)
	deadline := time.After(10 * time.Second)
	var got []string
	for {
		self := lease.Lease{Node: "n1", Subnet: netip.MustParsePrefix("10.244.1.0/24"), PublicIP: netip.MustParseAddr("192.0.2.11")}
		p := plan.Build(plan.Input{Config: c.cfg, Self: self, Peers: c.peers.Snapshot(), VXLANDev: "netagent.1",
			Underlay: plan.Underlay{Dev: "eth0", MTU: 1500, Connected: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}}})
		got = got[:0]
		for _, r := range p.Routes {
			got = append(got, fmt.Sprintf("route %s via %s dev %s", r.Dst, r.Gw, r.Dev))
		}
		for _, f := range p.FDB {
			got = append(got, fmt.Sprintf("fdb %s dst %s", f.MAC, f.Dst))
		}
		for _, pe := range p.Peers {
			if pe.Mode == plan.Unreachable {
				got = append(got, fmt.Sprintf("unreachable %s: %s", pe.Node, pe.Reason))
			}
		}
		slices.Sort(got)
		if slices.Equal(got, want) {
			return
		}
		select {
		case <-c.changed:
		case <-time.After(20 * time.Millisecond):
		case <-deadline:
			c.t.Fatalf("plan:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
		}
	}
}

const n4Unreachable = "unreachable n4: host-gw: 198.51.100.14 is not on-link from eth0 (use the hybrid or vxlan backend to reach it)"

func TestWatchHostGW(t *testing.T) {
	c := newCluster(t, "host-gw",
		node("n1", []string{"10.244.1.0/24"}, published("192.0.2.11", "host-gw", "")),
		node("n2", []string{"10.244.2.0/24"}, published("192.0.2.12", "host-gw", "")),
		node("n3", []string{"10.244.3.0/24"}, nil), // its agent has not started yet
	)
	c.plan("route 10.244.2.0/24 via 192.0.2.12 dev eth0")
	if got := c.peers.Len(); got != 2 {
		t.Fatalf("peers %d, want 2 (self and n2; n3 is not published)", got)
	}

	c.annotate("n3", published("192.0.2.13", "host-gw", ""))
	c.plan("route 10.244.2.0/24 via 192.0.2.12 dev eth0", "route 10.244.3.0/24 via 192.0.2.13 dev eth0")

	// n2 moved to a new address.
	c.annotate("n2", published("192.0.2.22", "host-gw", ""))
	c.plan("route 10.244.2.0/24 via 192.0.2.22 dev eth0", "route 10.244.3.0/24 via 192.0.2.13 dev eth0")

	// A node off the underlay: reported, not routed into a black hole.
	c.create(node("n4", []string{"10.244.4.0/24"}, published("198.51.100.14", "host-gw", "")))
	c.plan("route 10.244.2.0/24 via 192.0.2.22 dev eth0", "route 10.244.3.0/24 via 192.0.2.13 dev eth0",
		n4Unreachable)

	// Bad data on a node drops its routes and is recorded.
	c.annotate("n3", published("not-an-ip", "host-gw", ""))
	c.plan("route 10.244.2.0/24 via 192.0.2.22 dev eth0",
		n4Unreachable)
	if why := c.peers.Invalids()["n3"]; !strings.Contains(why, AnnPublicIP) {
		t.Fatalf("invalid n3 recorded as %q", why)
	}
	// A broadcast address, and a second Node given n2's podCIDR (registered later): ignored
	// and recorded, n2 keeps its route.
	c.create(node("n5", []string{"10.244.5.0/24"}, published("255.255.255.255", "host-gw", "")))
	late := node("n6", []string{"10.244.2.0/24"}, published("192.0.2.16", "host-gw", ""))
	late.CreationTimestamp = metav1.NewTime(time.Now().Add(time.Hour))
	c.create(late)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		bad := c.peers.Invalids()
		if strings.Contains(bad["n5"], "not a unicast") && strings.Contains(bad["n6"], "held by n2") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ignored nodes recorded as %q", bad)
		}
	}
	c.plan("route 10.244.2.0/24 via 192.0.2.22 dev eth0",
		n4Unreachable)
	for _, n := range []string{"n5", "n6"} {
		if err := c.cs.CoreV1().Nodes().Delete(context.Background(), n, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	// A deleted Node's routes go away.
	if err := c.cs.CoreV1().Nodes().Delete(context.Background(), "n2", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := c.cs.CoreV1().Nodes().Delete(context.Background(), "n4", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	c.plan()
}

func TestWatchVXLAN(t *testing.T) {
	mac2, mac3 := plan.VTEPMAC("n2").String(), plan.VTEPMAC("n3").String()
	c := newCluster(t, "vxlan",
		node("n1", []string{"10.244.1.0/24"}, published("192.0.2.11", "vxlan", plan.VTEPMAC("n1").String())),
		node("n2", []string{"10.244.2.0/24"}, published("192.0.2.12", "vxlan", mac2)),
	)
	c.plan("route 10.244.2.0/24 via 10.244.2.0 dev netagent.1", "fdb "+mac2+" dst 192.0.2.12")

	c.create(node("n3", []string{"10.244.3.0/24"}, published("198.51.100.13", "vxlan", mac3)))
	c.plan("route 10.244.2.0/24 via 10.244.2.0 dev netagent.1", "fdb "+mac2+" dst 192.0.2.12",
		"route 10.244.3.0/24 via 10.244.3.0 dev netagent.1", "fdb "+mac3+" dst 198.51.100.13")

	// n2's VTEP MAC changed (a re-created node with another name would do this).
	newMAC := "02:aa:bb:cc:dd:ee"
	c.annotate("n2", published("192.0.2.12", "vxlan", newMAC))
	c.plan("route 10.244.2.0/24 via 10.244.2.0 dev netagent.1", "fdb "+newMAC+" dst 192.0.2.12",
		"route 10.244.3.0/24 via 10.244.3.0 dev netagent.1", "fdb "+mac3+" dst 198.51.100.13")

	// ... and its IP.
	c.annotate("n2", published("192.0.2.42", "vxlan", newMAC))
	c.plan("route 10.244.2.0/24 via 10.244.2.0 dev netagent.1", "fdb "+newMAC+" dst 192.0.2.42",
		"route 10.244.3.0/24 via 10.244.3.0 dev netagent.1", "fdb "+mac3+" dst 198.51.100.13")

	// The agent on n3 stopped publishing (annotations removed): no longer a peer.
	c.annotate("n3", nil)
	c.plan("route 10.244.2.0/24 via 10.244.2.0 dev netagent.1", "fdb "+newMAC+" dst 192.0.2.42")

	if err := c.cs.CoreV1().Nodes().Delete(context.Background(), "n2", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	c.plan()
}

// Someone strips our annotations: KeepAlive notices and Renew puts them back.
func TestKeepAliveRepublishes(t *testing.T) {
	c := newCluster(t, "vxlan", node("n1", []string{"10.244.1.0/24"}, nil))
	self := lease.Lease{Node: "n1", PublicIP: netip.MustParseAddr("192.0.2.11"), Backend: "vxlan", VTEPMAC: plan.VTEPMAC("n1").String()}
	h, err := c.s.Acquire(t.Context(), c.cfg, self, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- c.s.KeepAlive(t.Context(), h) }()
	select {
	case err := <-errc:
		t.Fatalf("KeepAlive returned %v with our annotations in place", err)
	case <-time.After(200 * time.Millisecond):
	}
	patch := fmt.Appendf(nil, `{"metadata":{"annotations":{%q:null}}}`, AnnPublicIP)
	if _, err := c.cs.CoreV1().Nodes().Patch(t.Context(), "n1", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errc:
		if !strings.Contains(err.Error(), "not ours any more") {
			t.Fatalf("KeepAlive: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("KeepAlive did not notice the removed annotation")
	}
	if _, err := c.s.Renew(t.Context(), h); err != nil {
		t.Fatal(err)
	}
	n, _ := c.cs.CoreV1().Nodes().Get(t.Context(), "n1", metav1.GetOptions{})
	if n.Annotations[AnnPublicIP] != "192.0.2.11" {
		t.Fatalf("not republished: %v", n.Annotations)
	}
	// Another host's agent publishes itself on our Node: not overwritten back (no flapping).
	patch = fmt.Appendf(nil, `{"metadata":{"annotations":{%q:"192.0.2.99"}}}`, AnnPublicIP)
	if _, err := c.cs.CoreV1().Nodes().Patch(t.Context(), "n1", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.s.Renew(t.Context(), h); !errors.Is(err, lease.ErrIdentity) || !strings.Contains(err.Error(), "192.0.2.99") {
		t.Fatalf("Renew over another agent's annotations: %v, want ErrIdentity naming 192.0.2.99", err)
	}
}

// The Node deleted and registered again with another podCIDR: Renew says the subnet was
// reassigned (the agent then exits and its restart takes the new one).
func TestRenewReassigned(t *testing.T) {
	c := newCluster(t, "vxlan", node("n1", []string{"10.244.1.0/24"}, nil))
	self := lease.Lease{Node: "n1", PublicIP: netip.MustParseAddr("192.0.2.11"), Backend: "vxlan", VTEPMAC: plan.VTEPMAC("n1").String()}
	h, err := c.s.Acquire(t.Context(), c.cfg, self, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.cs.CoreV1().Nodes().Delete(t.Context(), "n1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.cs.CoreV1().Nodes().Create(t.Context(), node("n1", []string{"10.244.3.0/24"}, nil), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.s.Renew(t.Context(), h); !errors.Is(err, lease.ErrReassigned) || !strings.Contains(err.Error(), "10.244.3.0/24") {
		t.Fatalf("Renew after the podCIDR moved: %v, want ErrReassigned naming 10.244.3.0/24", err)
	}
}

func TestConfigFile(t *testing.T) {
	for _, c := range []struct {
		body string
		want string // error piece; "" = valid
	}{
		{body: vxlanConf},
		{body: `{"network":"10.244.0.0/16","backend":{"type":"ipip"}}`, want: "backend.type"},
		{body: `{"network":"10.244.0.0/16","subnetLen":40,"backend":{"type":"vxlan"}}`, want: "subnetLen"},
		{body: `{"network":"10.244.0.0/16","backnd":{"type":"vxlan"}}`, want: "unknown field"},
		{body: `not json`, want: "decode network config"},
	} {
		s := New(nil, "n1", netConf(t, c.body), slog.New(slog.DiscardHandler))
		_, _, err := s.Config(t.Context())
		if c.want == "" && err != nil || c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "--net-conf")) {
			t.Errorf("%s: err = %v, want %q", c.body, err, c.want)
		}
	}
	s := New(nil, "n1", filepath.Join(t.TempDir(), "missing.json"), slog.New(slog.DiscardHandler))
	if _, _, err := s.Config(t.Context()); err == nil || !strings.Contains(err.Error(), "--net-conf") {
		t.Fatalf("missing file: %v", err)
	}
}

func TestWatchConfig(t *testing.T) {
	p := netConf(t, vxlanConf)
	s := New(nil, "n1", p, slog.New(slog.DiscardHandler))
	s.ConfigPoll = 10 * time.Millisecond
	changed := make(chan struct{}, 1)
	go s.WatchConfig(t.Context(), changed)
	select {
	case <-changed:
		t.Fatal("signalled without a change")
	case <-time.After(100 * time.Millisecond):
	}
	if err := os.WriteFile(p, []byte(`{"network":"10.244.0.0/16","backend":{"type":"vxlan"},"mtu":1400}`), 0o644); err != nil {
		t.Fatal(err)
	}
	select {
	case <-changed:
	case <-time.After(5 * time.Second):
		t.Fatal("no signal after the file changed")
	}
}

// The informer keeps only what leases need.
func TestSlim(t *testing.T) {
	n := ours(node("n1", []string{"10.244.1.0/24"}, map[string]string{AnnPublicIP: "192.0.2.11", "other.io/x": "y"}))
	n.ManagedFields = []metav1.ManagedFieldsEntry{{Manager: "kubelet"}}
	n.Labels = map[string]string{"kubernetes.io/hostname": "n1"}
	out, err := slim(n)
	if err != nil {
		t.Fatal(err)
	}
	s := out.(*Node)
	if len(s.ManagedFields) != 0 || len(s.Labels) != 0 || len(s.Annotations) != 1 || s.Spec.PodCIDR != "10.244.1.0/24" || s.Name != "n1" {
		t.Fatalf("slim kept %+v", s)
	}
}

// A real Node's JSON (what the API server sends) decodes into our Node with every field
// netagent reads.
func TestNodeDecode(t *testing.T) {
	n := node("n1", []string{"10.244.1.0/24", "fd00::/64"}, published("192.0.2.11", "vxlan", "0e:72:07:23:2f:14"))
	n.TypeMeta = metav1.TypeMeta{Kind: "Node", APIVersion: "v1"}
	n.ResourceVersion, n.UID = "42", "uid-1"
	got := ours(n)
	if got.Name != "n1" || got.ResourceVersion != "42" || got.UID != "uid-1" || got.Spec.PodCIDR != "10.244.1.0/24" ||
		!slices.Equal(got.Spec.PodCIDRs, n.Spec.PodCIDRs) || !mapsEqual(got.Annotations, n.Annotations) || got.Kind != "Node" {
		t.Fatalf("decoded %+v", got)
	}
	c := got.DeepCopy()
	c.Spec.PodCIDRs[0] = "x"
	if got.Spec.PodCIDRs[0] == "x" {
		t.Fatal("DeepCopy shares PodCIDRs")
	}
}

// Node objects come from the API server and their annotations from anyone with patch
// rights on nodes: decoding must never panic, and a lease it accepts must be valid.
func FuzzLeaseOf(f *testing.F) {
	f.Add("n1", "10.244.1.0/24", "192.0.2.11", "vxlan", "0e:72:07:23:2f:14")
	f.Add("n1", "fd00::/64", "192.0.2.11", "host-gw", "")
	f.Add("", "10.244.1.7/33", "::1", "x", "zz")
	f.Fuzz(func(t *testing.T, name, cidr, ip, backend, mac string) {
		n := node(name, []string{cidr}, published(ip, backend, mac))
		l, err := LeaseOf(ours(n))
		if err != nil {
			return
		}
		if err := l.Validate(); err != nil {
			t.Fatalf("LeaseOf accepted an invalid lease %+v: %v", l, err)
		}
		if l.Subnet.IsValid() && (!l.Subnet.Addr().Is4() || l.Subnet != l.Subnet.Masked()) {
			t.Fatalf("subnet %s", l.Subnet)
		}
		if l.Subnet6.IsValid() && !lease.ValidSubnet6(l.Subnet6) {
			t.Fatalf("subnet6 %s", l.Subnet6)
		}
	})
}

// The agent's lease gained an IPv6 underlay address after the start: Renew publishes it
// on the Node (there was none to conflict with).
func TestRenewPublishesGainedAddress(t *testing.T) {
	c := newCluster(t, "host-gw", node("n1", []string{"10.244.1.0/24"}, nil))
	self := lease.Lease{Node: "n1", PublicIP: netip.MustParseAddr("192.0.2.11"), Backend: "host-gw"}
	h, err := c.s.Acquire(t.Context(), c.cfg, self, netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	h.Lease.PublicIP6 = netip.MustParseAddr("2001:db8:1::11")
	if h, err = c.s.Renew(t.Context(), h); err != nil {
		t.Fatal(err)
	}
	n, _ := c.cs.CoreV1().Nodes().Get(t.Context(), "n1", metav1.GetOptions{})
	if n.Annotations[AnnPublicIP6] != "2001:db8:1::11" || n.Annotations[AnnPublicIP] != "192.0.2.11" {
		t.Fatalf("annotations after Renew with the gained address: %v", n.Annotations)
	}
}

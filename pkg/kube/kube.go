// Package kube is the Kubernetes subnet manager (`netagent run --subnet-manager=kube`):
// a node's subnet is the podCIDR the controller-manager assigned to its Node object, the
// agent publishes how peers reach it as annotations on that Node, and peers come from a
// Node informer. It implements lease.Store, as pkg/lease/etcdstore does, so the agent's
// loop, planner and reconcilers do not know which one they run on.
//
// There is no TTL here: a node's subnet lives as long as its Node object. Deleting the
// Node removes its routes on every other node.
package kube

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/lease"
)

// Annotations netagent publishes on its Node.
const (
	AnnotationPrefix = "netagent.io/"
	AnnPublicIP      = AnnotationPrefix + "public-ip"
	AnnPublicIP6     = AnnotationPrefix + "public-ip6" // the node's IPv6 underlay address
	AnnBackend       = AnnotationPrefix + "backend"
	AnnVTEPMAC       = AnnotationPrefix + "vtep-mac"
	AnnUnderlayMAC   = AnnotationPrefix + "underlay-mac"
	// The WireGuard backend's public key and listen port (never the private key).
	AnnWGPublicKey = AnnotationPrefix + "wg-public-key"
	AnnWGPort      = AnnotationPrefix + "wg-port"
)

// ErrNoPodCIDR means the Node has no podCIDR yet.
var ErrNoPodCIDR = errors.New("node has no spec.podCIDR")

// Store is the Kubernetes subnet manager.
type Store struct {
	nodes   Nodes
	self    string
	netConf string // path of the network config JSON (a mounted ConfigMap)
	log     *slog.Logger
	// ConfigPoll is how often WatchConfig re-reads netConf (a ConfigMap update reaches
	// the mounted file within about a minute, so polling costs nothing that matters).
	ConfigPoll time.Duration

	synced   chan struct{} // closed once Watch's informer has listed every node
	selfMu   sync.Mutex
	selfNode *Node         // our own Node as last seen by the informer
	selfCh   chan struct{} // signalled when our own Node changes
}

// New returns a store for node self. nodes is a Nodes client (NewNodes, or a fake
// clientset's in tests); netConf is the network config file.
func New(nodes Nodes, self, netConf string, log *slog.Logger) *Store {
	if log == nil {
		log = slog.Default()
	}
	return &Store{
		nodes: nodes, self: self, netConf: netConf, log: log,
		ConfigPoll: 10 * time.Second,
		synced:     make(chan struct{}),
		selfCh:     make(chan struct{}, 1),
	}
}

// Config reads and validates the network config file.
func (s *Store) Config(ctx context.Context) (config.Network, int64, error) {
	b, err := os.ReadFile(s.netConf)
	if err != nil {
		return config.Network{}, 0, fmt.Errorf("--net-conf: %w", err)
	}
	n, err := config.Parse(b)
	if err != nil {
		return config.Network{}, 0, fmt.Errorf("--net-conf %s: %w", s.netConf, err)
	}
	return n, 0, nil
}

// WatchConfig signals changed whenever the config file's content changes.
func (s *Store) WatchConfig(ctx context.Context, changed chan<- struct{}) {
	last, _ := os.ReadFile(s.netConf)
	t := time.NewTicker(s.ConfigPoll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cur, err := os.ReadFile(s.netConf)
		if err != nil || bytes.Equal(cur, last) {
			continue
		}
		last = cur
		select {
		case changed <- struct{}{}:
		default:
		}
	}
}

// PodCIDR is the node's IPv4 pod subnet: the first IPv4 entry of spec.podCIDRs (dual
// stack lists both families), else spec.podCIDR.
func PodCIDR(n *Node) (netip.Prefix, error) {
	v4, _, err := PodCIDRs(n)
	if err == nil && !v4.IsValid() {
		return netip.Prefix{}, fmt.Errorf("node %s: spec.podCIDRs %v holds no IPv4 subnet", n.Name, n.Spec.PodCIDRs)
	}
	return v4, err
}

// PodCIDRs are the node's pod subnets of each family (either may be invalid): the first
// entry of each family in spec.podCIDRs, else spec.podCIDR.
func PodCIDRs(n *Node) (v4, v6 netip.Prefix, err error) {
	cidrs := n.Spec.PodCIDRs
	if len(cidrs) == 0 && n.Spec.PodCIDR != "" {
		cidrs = []string{n.Spec.PodCIDR}
	}
	if len(cidrs) == 0 {
		return netip.Prefix{}, netip.Prefix{}, ErrNoPodCIDR
	}
	for _, c := range cidrs {
		p, err := netip.ParsePrefix(c)
		if err != nil {
			return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("node %s: spec.podCIDRs entry %q: %w", n.Name, c, err)
		}
		switch {
		case p.Addr().Is4() && !v4.IsValid():
			v4 = p.Masked()
		case p.Addr().Is6() && !v6.IsValid():
			v6 = p.Masked()
		}
	}
	return v4, v6, nil
}

// errNotPublished means the node's agent has not published its annotations yet: not a
// peer (yet), and nothing wrong.
var errNotPublished = errors.New("no netagent annotations yet")

// LeaseOf is the lease a Node stands for.
func LeaseOf(n *Node) (lease.Lease, error) {
	ann := n.Annotations
	pub, ok := ann[AnnPublicIP]
	pub6, ok6 := ann[AnnPublicIP6]
	if !ok && !ok6 {
		return lease.Lease{}, errNotPublished
	}
	subnet, subnet6, err := PodCIDRs(n)
	if err != nil {
		return lease.Lease{}, err
	}
	var ips [2]netip.Addr
	for i, a := range [2]struct{ key, v string }{{AnnPublicIP, pub}, {AnnPublicIP6, pub6}} {
		if a.v == "" {
			continue
		}
		if ips[i], err = netip.ParseAddr(a.v); err != nil {
			return lease.Lease{}, fmt.Errorf("node %s: annotation %s=%q: %w", n.Name, a.key, a.v, err)
		}
	}
	l := lease.Lease{
		Node:      n.Name,
		Subnet:    subnet,
		Subnet6:   subnet6,
		PublicIP:  ips[0],
		PublicIP6: ips[1],
		Backend:   ann[AnnBackend],
		VTEPMAC:   strings.ToLower(ann[AnnVTEPMAC]),
		// Peers on the same L2 accept VXLAN from this node only from this MAC.
		UnderlayMAC: strings.ToLower(ann[AnnUnderlayMAC]),
		WGPublicKey: ann[AnnWGPublicKey],
	}
	if p, ok := ann[AnnWGPort]; ok {
		port, err := strconv.ParseUint(p, 10, 16)
		if err != nil {
			return lease.Lease{}, fmt.Errorf("node %s: annotation %s=%q: not a port", n.Name, AnnWGPort, p)
		}
		l.WGPort = int(port)
	}
	if err := l.Validate(); err != nil {
		return lease.Lease{}, err
	}
	return l, nil
}

// annotations are what self publishes.
func annotations(self lease.Lease) map[string]string {
	return map[string]string{
		AnnPublicIP:    addrString(self.PublicIP),
		AnnPublicIP6:   addrString(self.PublicIP6),
		AnnBackend:     self.Backend,
		AnnVTEPMAC:     self.VTEPMAC,
		AnnUnderlayMAC: self.UnderlayMAC,
		AnnWGPublicKey: self.WGPublicKey,
		AnnWGPort:      wgPort(self.WGPort),
	}
}

func wgPort(p int) string {
	if p == 0 {
		return ""
	}
	return strconv.Itoa(p)
}

// Acquire takes the node's podCIDR as its subnet and publishes self's public IP, backend
// and VTEP MAC on the Node. hint is ignored: the controller-manager owns the assignment.
func (s *Store) Acquire(ctx context.Context, cfg config.Network, self lease.Lease, _ netip.Prefix) (lease.Held, error) {
	n, err := s.nodes.Get(ctx, s.self)
	if err != nil {
		if apierrors.IsNotFound(err) {
			return lease.Held{}, fmt.Errorf("node %q does not exist in the API (is --node-name right? the DaemonSet sets it from spec.nodeName): %w", s.self, err)
		}
		return lease.Held{}, fmt.Errorf("get node %s: %w", s.self, err)
	}
	subnet, subnet6, err := s.podCIDRs(n, cfg)
	if err != nil {
		return lease.Held{}, err
	}
	self.Node = s.self
	self.Subnet, self.Subnet6 = subnet, subnet6
	// The Node object is the node's identity here and no instance is published: two agents
	// for one Node see each other's annotations change (KeepAlive, Renew).
	self.Instance = ""
	if !publishedAs(n, self) { // a restart with nothing changed writes nothing
		if err := s.publish(ctx, self); err != nil {
			return lease.Held{}, err
		}
	}
	return lease.Held{Lease: self}, nil
}

// subnetStrings names l's subnets.
func subnetStrings(l lease.Lease) []string {
	var out []string
	for _, s := range l.Subnets() {
		out = append(out, s.String())
	}
	return out
}

// addrString is a's text, empty when a is unset (so its annotation is removed).
func addrString(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// podCIDRs are the node's pod subnets of the families cfg enables, checked against cfg.
func (s *Store) podCIDRs(n *Node, cfg config.Network) (v4, v6 netip.Prefix, err error) {
	v4, v6, err = PodCIDRs(n)
	var networks []string
	for _, p := range [2]netip.Prefix{cfg.Network, cfg.IPv6Network} {
		if p.IsValid() {
			networks = append(networks, p.String())
		}
	}
	clusterCIDR := strings.Join(networks, ",")
	if errors.Is(err, ErrNoPodCIDR) {
		return v4, v6, fmt.Errorf("node %s has no spec.podCIDR: run kube-controller-manager with --allocate-node-cidrs=true --cluster-cidr=%s (or set the node's podCIDR yourself)", s.self, clusterCIDR)
	}
	if err != nil {
		return v4, v6, err
	}
	for _, f := range []struct {
		family  string
		subnet  *netip.Prefix
		network netip.Prefix
		len     int
	}{{"IPv4", &v4, cfg.Network, cfg.SubnetLen}, {"IPv6", &v6, cfg.IPv6Network, cfg.IPv6SubnetLen}} {
		p := *f.subnet
		switch {
		case !f.network.IsValid():
			*f.subnet = netip.Prefix{} // the family is off in --net-conf
		case !p.IsValid():
			return v4, v6, fmt.Errorf("node %s: spec.podCIDRs %v holds no %s subnet, and --net-conf has the %s network %s (run kube-controller-manager with --cluster-cidr=%s)",
				s.self, n.Spec.PodCIDRs, f.family, f.family, f.network, clusterCIDR)
		case !f.network.Contains(p.Addr()) || p.Bits() < f.network.Bits():
			return v4, v6, fmt.Errorf("node %s: podCIDR %s is outside the network %s of --net-conf (kube-controller-manager's --cluster-cidr and the net-conf network must agree)", s.self, p, f.network)
		case p.Bits() != f.len:
			s.log.Warn("the node's podCIDR length differs from the subnet length in --net-conf; set it to kube-controller-manager's --node-cidr-mask-size",
				"podCIDR", p, "subnetLen", f.len)
		}
	}
	return v4, v6, nil
}

// publishedAs reports whether n carries self's annotations (an empty value: absent).
func publishedAs(n *Node, self lease.Lease) bool {
	for k, v := range annotations(self) {
		if cur, ok := n.Annotations[k]; cur != v || ok != (v != "") {
			return false
		}
	}
	return true
}

func (s *Store) publish(ctx context.Context, self lease.Lease) error {
	ann := map[string]any{}
	for k, v := range annotations(self) {
		if v == "" {
			ann[k] = nil // a JSON merge patch deletes keys set to null
		} else {
			ann[k] = v
		}
	}
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": ann}})
	if _, err := s.nodes.Patch(ctx, s.self, types.MergePatchType, patch); err != nil {
		return fmt.Errorf("annotate node %s: %w", s.self, err)
	}
	return nil
}

// Renew publishes h's annotations again (after KeepAlive saw them changed or removed).
func (s *Store) Renew(ctx context.Context, h lease.Held) (lease.Held, error) {
	n, err := s.nodes.Get(ctx, s.self)
	if err != nil {
		return lease.Held{}, fmt.Errorf("get node %s: %w", s.self, err)
	}
	v4, v6, err := PodCIDRs(n)
	if !h.Lease.Subnet6.IsValid() {
		v6 = netip.Prefix{} // IPv6 is off
	}
	if !h.Lease.Subnet.IsValid() {
		v4 = netip.Prefix{}
	}
	if err != nil || v4 != h.Lease.Subnet || v6 != h.Lease.Subnet6 {
		// The Node was deleted and registered again with another podCIDR: this agent's
		// pods are on the old one. Not a conflict with another node; a restart of the
		// agent (and of the node's pods) moves the node to the new subnet.
		if err == nil {
			return lease.Held{}, fmt.Errorf("%w: node %s: its podCIDRs are now %v, not %s as when this agent started; the node's pods on the old one must be recreated",
				lease.ErrReassigned, s.self, n.Spec.PodCIDRs, strings.Join(subnetStrings(h.Lease), ","))
		}
		return lease.Held{}, fmt.Errorf("node %s: no usable podCIDR now (%w), %s when this agent started", s.self, err, strings.Join(subnetStrings(h.Lease), ","))
	}
	for _, a := range [2]struct {
		key  string
		mine netip.Addr
	}{{AnnPublicIP, h.Lease.PublicIP}, {AnnPublicIP6, h.Lease.PublicIP6}} {
		if ip, err := netip.ParseAddr(n.Annotations[a.key]); err == nil && ip != a.mine {
			// Another agent published itself on our Node (two hosts with one node name):
			// publishing back would flip the node's address on every peer.
			return lease.Held{}, fmt.Errorf("%w: node %s is annotated with public IP %s by another agent, this agent's is %s: give each host its own --node-name",
				lease.ErrIdentity, s.self, ip, addrString(a.mine))
		}
	}
	if err := s.publish(ctx, h.Lease); err != nil {
		return lease.Held{}, err
	}
	return h, nil
}

// KeepAlive (which needs Watch running) returns when our own Node no longer carries h's
// annotations (someone removed or changed them, or the Node was deleted), so the agent
// re-publishes them via Renew. There is no TTL to refresh. Until the cache has shown our
// annotations once, a mismatch must outlast settle: the informer may still hold the Node
// from before our own patch.
func (s *Store) KeepAlive(ctx context.Context, h lease.Held) error {
	const settle = 2 * time.Second
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-s.synced:
	}
	seen := false
	var deadline <-chan time.Time
	for {
		s.selfMu.Lock()
		n := s.selfNode
		s.selfMu.Unlock()
		ok := n != nil && publishedAs(n, h.Lease)
		switch {
		case ok:
			seen, deadline = true, nil
		case seen:
			return lost(s.self, n)
		case deadline == nil:
			deadline = time.After(settle)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.selfCh:
		case <-deadline:
			return lost(s.self, n)
		}
	}
}

func lost(self string, n *Node) error {
	if n == nil {
		return fmt.Errorf("node %s is gone from the API", self)
	}
	return fmt.Errorf("the netagent annotations on node %s are not ours any more (%v)", self, n.Annotations)
}

// Watch keeps peers current from a Node informer until ctx ends. The informer re-lists
// and re-watches by itself and keeps its cache while doing so, so a broken watch never
// drops a peer. changed is signalled once the first list is complete (the agent touches
// nothing before that) and after every change since.
func (s *Store) Watch(ctx context.Context, peers *lease.Peers, changed chan<- struct{}, stats lease.WatchStats) {
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			return s.nodes.List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			return s.nodes.Watch(ctx, o)
		},
	}
	// Streaming lists (WatchListClient) unless the client says it cannot do them (fakes).
	inf := cache.NewSharedIndexInformer(cache.ToListWatcherWithWatchListSemantics(lw, s.nodes), &Node{}, 0, cache.Indexers{})
	// Keep only what a lease needs: a Node's status (images, conditions) is most of its
	// size and changes every few seconds; dropping it keeps memory flat at thousands of nodes.
	_ = inf.SetTransform(slim)
	_ = inf.SetWatchErrorHandlerWithContext(func(_ context.Context, _ *cache.Reflector, err error) {
		s.log.Warn("node watch restarting; keeping the current peers", "err", err)
		if stats != nil {
			stats.WatchRestart("kube-watch")
		}
	})
	var synced atomic.Bool
	after := func() {
		if synced.Load() {
			signal(changed)
		}
	}
	reg, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { s.update(peers, obj); after() },
		UpdateFunc: func(_, obj any) { s.update(peers, obj); after() },
		DeleteFunc: func(obj any) { s.remove(peers, obj); after() },
	})
	if err != nil {
		s.log.Error("node informer", "err", err)
		return
	}
	done := make(chan struct{})
	go func() { defer close(done); inf.RunWithContext(ctx) }()
	defer func() { <-done }() // the agent's WaitGroup covers the informer too
	// The registration's HasSynced, not the informer's: it is true only once our handler
	// has processed the first list, so peers really holds every node.
	if !cache.WaitForCacheSync(ctx.Done(), reg.HasSynced) {
		return
	}
	synced.Store(true)
	close(s.synced)
	signal(changed)
	<-ctx.Done()
}

func (s *Store) update(peers *lease.Peers, obj any) {
	n, ok := obj.(*Node)
	if !ok {
		return
	}
	if n.Name == s.self {
		s.selfMu.Lock()
		s.selfNode = n
		s.selfMu.Unlock()
		signal(s.selfCh)
	}
	l, err := LeaseOf(n)
	switch {
	case err == nil:
		// The Node registered first wins a podCIDR two Nodes claim.
		peers.Set(n.Name, l, n.CreationTimestamp.UnixNano())
	case errors.Is(err, errNotPublished):
		peers.Delete(n.Name)
	default:
		s.log.Debug("node with unusable netagent data", "node", n.Name, "err", err) // the agent logs it once
		peers.Invalid(n.Name, err.Error())
	}
}

func (s *Store) remove(peers *lease.Peers, obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	n, ok := obj.(*Node)
	if !ok {
		return
	}
	if n.Name == s.self {
		s.selfMu.Lock()
		s.selfNode = nil
		s.selfMu.Unlock()
		signal(s.selfCh)
	}
	peers.Delete(n.Name)
}

func signal(ch chan<- struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// slim keeps a Node's name, netagent annotations and pod CIDRs.
func slim(obj any) (any, error) {
	n, ok := obj.(*Node)
	if !ok {
		return obj, nil // a DeletedFinalStateUnknown: passed on as is
	}
	out := &Node{
		ObjectMeta: metav1.ObjectMeta{Name: n.Name, UID: n.UID, ResourceVersion: n.ResourceVersion, CreationTimestamp: n.CreationTimestamp},
		Spec:       NodeSpec{PodCIDR: n.Spec.PodCIDR, PodCIDRs: n.Spec.PodCIDRs},
	}
	for k, v := range n.Annotations {
		if strings.HasPrefix(k, AnnotationPrefix) {
			if out.Annotations == nil {
				out.Annotations = map[string]string{}
			}
			out.Annotations[k] = v
		}
	}
	return out, nil
}

var _ lease.Store = (*Store)(nil)

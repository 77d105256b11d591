package k8s_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/lab/k8s"
	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/test/netns"
)

// peerState is what a node holds for one peer under the vxlan backend: the route to its
// podCIDR, and on the VXLAN device the neighbour entry of its VTEP address and the FDB
// entry towards its underlay address. Any of them left means the peer is not gone.
func peerState(h *netlink.Handle, cidr netip.Prefix, ip netip.Addr) (string, error) {
	var have []string
	routes, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: prefixNet(cidr)}, netlink.RT_FILTER_DST)
	if err != nil {
		return "", err
	}
	for _, r := range routes {
		if r.Protocol == 180 {
			have = append(have, "route "+r.String())
		}
	}
	dev, err := h.LinkByName(plan.VXLANDevName(config.DefaultVNI))
	if err != nil {
		return strings.Join(have, "; "), nil
	}
	neighs, err := h.NeighList(dev.Attrs().Index, netlink.FAMILY_V4)
	if err != nil {
		return "", err
	}
	for _, n := range neighs {
		if n.IP.Equal(cidr.Addr().AsSlice()) {
			have = append(have, "neighbour "+n.String())
		}
	}
	fdb, err := h.NeighList(dev.Attrs().Index, unix.AF_BRIDGE)
	if err != nil {
		return "", err
	}
	for _, n := range fdb {
		if n.IP.Equal(ip.AsSlice()) {
			have = append(have, "fdb "+n.HardwareAddr.String()+" dst "+n.IP.String())
		}
	}
	return strings.Join(have, "; "), nil
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}
}

// nodeCIDR is a node's spec.podCIDR ("" when it has none or is gone).
func (l *lab) nodeCIDR(name string) string {
	out, _ := l.c.Kubectl(context.Background(), "get", "node", name, "-o", "jsonpath={.spec.podCIDR}")
	return strings.TrimSpace(out)
}

// waitPeerState polls every node but skip until want(state of peer) holds on all of them
// and returns when it first did.
func (l *lab) waitPeerState(skip *k8s.Node, cidr netip.Prefix, ip netip.Addr, timeout time.Duration, want func(string) bool) (time.Time, error) {
	var hs []*netlink.Handle
	var names []string
	defer func() {
		for _, h := range hs {
			h.Close()
		}
	}()
	for _, n := range l.nodes {
		if n == skip {
			continue
		}
		ns, err := netns.Open(n.NS)
		if err != nil {
			return time.Time{}, err
		}
		h, err := ns.Handle()
		if err != nil {
			return time.Time{}, err
		}
		hs, names = append(hs, h), append(names, n.Name)
	}
	deadline := time.Now().Add(timeout)
	var last []string
	for time.Now().Before(deadline) {
		last = last[:0]
		for i, h := range hs {
			st, err := peerState(h, cidr, ip)
			if err != nil {
				return time.Time{}, err
			}
			if !want(st) {
				last = append(last, fmt.Sprintf("%s: %q", names[i], st))
			}
		}
		if len(last) == 0 {
			return time.Now(), nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Time{}, fmt.Errorf("not within %s: %s", timeout, strings.Join(last, ", "))
}

// hasAll: a node holds the peer's route, neighbour and FDB entry.
func hasAll(st string) bool {
	return strings.Contains(st, "route") && strings.Contains(st, "neighbour") && strings.Contains(st, "fdb")
}

// nodeLifecycle is issue 13's item 3 (under the vxlan backend): a deleted Node's routes,
// neighbour and FDB entries go from every other node; its kubelet registers it again and
// its pods get connectivity back; a fourth node joins and every other node can reach it
// by the time its agent is ready. It returns the web pods afterwards.
func (l *lab) nodeLifecycle(t *testing.T, pods []podInfo) []podInfo {
	ctx := context.Background()
	victim := l.nodes[len(l.nodes)-1]
	cidr := netip.MustParsePrefix(l.nodeCIDR(victim.Name))
	// Before: every other node has all three.
	if _, err := l.waitPeerState(victim, cidr, victim.IP, 10*time.Second, hasAll); err != nil {
		t.Fatalf("%s's route, neighbour and FDB entry before the delete: %v", victim.Name, err)
	}
	l.kubectl("delete", "node", victim.Name, "--wait=false")
	t0 := time.Now()
	gone, err := l.waitPeerState(victim, cidr, victim.IP, 30*time.Second, func(st string) bool { return st == "" })
	if err != nil {
		t.Fatalf("the deleted node's route, neighbour and FDB entry removed: %v", err)
	}
	t.Logf("kubectl delete node %s: its route, neighbour and FDB entry gone from every other node %s after the delete returned", victim.Name, gone.Sub(t0).Round(time.Millisecond))

	// The kubelet registers its Node only when it starts (a service manager restarts it).
	if err := l.c.RestartKubelet(victim); err != nil {
		t.Fatal(err)
	}
	var newCIDR string
	l.eventually(victim.Name+" registered again with a podCIDR", 2*time.Minute, func() (bool, string) {
		newCIDR = l.nodeCIDR(victim.Name)
		return newCIDR != "", newCIDR
	})
	t.Logf("%s registered again: podCIDR %s (was %s)", victim.Name, newCIDR, cidr)
	l.eventually("the agent on "+victim.Name+" published itself again", 3*time.Minute, func() (bool, string) {
		out := l.kubectl("get", "node", victim.Name, "-o", "jsonpath={.metadata.annotations.netagent\\.io/public-ip}")
		return out == victim.IP.String(), out
	})
	l.waitRollout(t)
	// Pods on the re-registered node with addresses from an old podCIDR cannot be routed
	// any more: they are recreated, as the agent's error says (on the same podCIDR they
	// keep working).
	if newCIDR != cidr.String() {
		l.kubectl("delete", "pods", "-l", "app=web", "--field-selector", "spec.nodeName="+victim.Name, "--wait=true")
	}
	pods = l.waitWebPods(t, len(l.nodes))
	l.checkMatrix(t, pods)

	// A fourth node joins the running cluster.
	n4 := l.newNode(len(l.nodes) + 1)
	// The image the DaemonSet runs now (an upgrade re-tagged it) is on the new node too.
	img := l.kubectl("-n", "netagent", "get", "ds", "netagent", "-o", "jsonpath={.spec.template.spec.containers[0].image}")
	if err := l.c.AddNode(ctx, n4, img); err != nil {
		t.Fatal(err)
	}
	l.nodes = append(l.nodes, n4)
	var cidr4 string
	l.eventually(n4.Name+" has a podCIDR", time.Minute, func() (bool, string) { cidr4 = l.nodeCIDR(n4.Name); return cidr4 != "", cidr4 })
	// Watch the other nodes from now on: they learn the new node when its agent publishes
	// its annotations, which may be before or after the agent is ready.
	type seen struct {
		at  time.Time
		err error
	}
	reached := make(chan seen, 1)
	go func() {
		at, err := l.waitPeerState(n4, netip.MustParsePrefix(cidr4), n4.IP, 4*time.Minute, hasAll)
		reached <- seen{at, err}
	}()
	ready := l.waitAgentReady(t, n4, 3*time.Minute)
	r := <-reached
	if r.err != nil {
		t.Fatalf("every node reaches %s: %v", n4.Name, r.err)
	}
	t.Logf("%s joined (podCIDR %s): every other node had its route, neighbour and FDB entry %s after its agent's /readyz first answered 200 (negative: before)",
		n4.Name, cidr4, r.at.Sub(ready).Round(time.Millisecond))
	if d := r.at.Sub(ready); d > time.Second {
		t.Errorf("%s reachable from every node %s after its agent was ready, want within 1s", n4.Name, d)
	}
	l.waitRollout(t)
	l.kubectl("scale", "deployment", "web", fmt.Sprintf("--replicas=%d", len(l.nodes)))
	pods = l.waitWebPods(t, len(l.nodes))
	l.checkMatrix(t, pods)
	return pods
}

// waitAgentReady polls the agent's /readyz on n (host network, 127.0.0.1:9476) every
// 10 ms and returns when it first answered 200.
func (l *lab) waitAgentReady(t *testing.T, n *k8s.Node, timeout time.Duration) time.Time {
	t.Helper()
	ns, err := netns.Open(n.NS)
	if err != nil {
		t.Fatal(err)
	}
	// The transport dials on goroutines of its own: the dial itself enters the namespace.
	client := &http.Client{Timeout: time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (c net.Conn, err error) {
			err = ns.Do(func() error { c, err = (&net.Dialer{}).DialContext(ctx, network, addr); return err })
			return c, err
		},
	}}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		resp, err := client.Get("http://127.0.0.1:9476/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return time.Now()
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("the agent on %s not ready within %s", n.Name, timeout)
	return time.Time{}
}

// waitRollout waits until the DaemonSet has a ready agent on every node.
func (l *lab) waitRollout(t *testing.T) {
	t.Helper()
	l.eventually("an agent ready on every node", 3*time.Minute, func() (bool, string) {
		out := l.kubectl("-n", "netagent", "get", "ds", "netagent", "-o", "jsonpath={.status.numberReady}/{.status.desiredNumberScheduled}")
		return out == fmt.Sprintf("%d/%d", len(l.nodes), len(l.nodes)), out
	})
}

// waitWebPods waits for n ready web pods, one per node, and returns them.
func (l *lab) waitWebPods(t *testing.T, n int) []podInfo {
	t.Helper()
	var pods []podInfo
	l.eventually(fmt.Sprintf("%d web pods ready, one per node", n), 2*time.Minute, func() (bool, string) {
		pods = l.webPods()
		nodes := map[string]bool{}
		for _, p := range pods {
			nodes[p.Node] = true
		}
		return len(pods) == n && len(nodes) == n, fmt.Sprint(pods)
	})
	return pods
}

package cluster_test

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/antispoof"
	"github.com/netagent/netagent/pkg/bridge"
	"github.com/netagent/netagent/pkg/lab"
	"github.com/netagent/netagent/test/netns"
)

// ping6 reports whether an ICMPv6 echo from ns to ip is answered (lab.Ping).
func ping6(ns *netns.NS, ip string) error { return lab.Ping(ns, ip) }

// matrix is what fails in the lab's connectivity matrix (every pod to every pod and the
// outside host, over each family), as text.
func matrix(l *lab.Lab) string {
	if m := l.Matrix(context.Background()); len(lab.Failures(m)) > 0 {
		return lab.FormatMatrix(m)
	}
	return ""
}

// Every backend carries IPv6 pods, in IPv6-only and dual-stack clusters: pod to pod over
// each family across nodes (on the same L2 and, for vxlan and hybrid, behind a router), pod
// IPv6 egress masqueraded to the node's IPv6 address, drift of an IPv6 route, neighbour
// and FDB entry repaired. The -routed cases wire the pods without a bridge (the plugin's
// podInterface routed), and also check that a pod's anti-spoofing chain removed by hand
// is put back by the agent.
func TestIPv6Backends(t *testing.T) {
	for _, tc := range []struct {
		family, backend string
		nodes, remote   int
		podIface        string
	}{
		{"ipv6", "host-gw", 2, 0, "bridge"},
		{"ipv6", "vxlan", 3, 1, "bridge"},
		{"ipv6", "hybrid", 3, 1, "bridge"},
		{"dual", "host-gw", 2, 0, "bridge"},
		{"dual", "vxlan", 3, 1, "bridge"},
		{"dual", "hybrid", 3, 1, "bridge"},
		{"dual", "host-gw", 2, 0, "routed"},
		{"ipv6", "vxlan", 3, 1, "routed"},
	} {
		name := tc.family + "/" + tc.backend
		if tc.podIface != "bridge" {
			name += "-" + tc.podIface
		}
		t.Run(name, func(t *testing.T) {
			l := newLabWith(t, lab.Options{Backend: tc.backend, Nodes: tc.nodes, Remote: tc.remote, PodsPerNode: 1, IPFamily: tc.family, PodInterface: tc.podIface})
			for _, p := range l.Pods() {
				if !p.IP6.IsValid() || (tc.family == "dual") != p.IP.IsValid() {
					t.Fatalf("pod %s has addresses %s and %s, want the lab's families (%s)", p.Name, p.IP, p.IP6, tc.family)
				}
			}
			if bad := matrix(l); bad != "" {
				t.Fatalf("connectivity failures:\n%s\n%s", bad, dump6(t, l))
			}
			n1 := l.Nodes[0]
			pod := n1.Pods[0]
			// Egress over IPv6 leaves with the node's IPv6 underlay address.
			l.ExtNS().Serve6(t, 7001, func(client string) string { return client })
			if got, err := l.PodNS(pod).Fetch6(fmt.Sprintf("[%s]:7001", l.Ext6)); err != nil || got != n1.IP6.String() {
				t.Errorf("pod -> outside over IPv6: server saw %q (%v), want node IP %s", got, err, n1.IP6)
			}
			st := status(t, l, n1)
			if st.PodInterface != tc.podIface {
				t.Errorf("status: pods %q, want %q", st.PodInterface, tc.podIface)
			}
			if st.Subnet6 == "" || st.PublicIP6 != n1.IP6.String() || (tc.family == "dual") != (st.Subnet != "") {
				t.Errorf("status: subnet %q subnet6 %q publicIP6 %q", st.Subnet, st.Subnet6, st.PublicIP6)
			}
			for _, p := range st.Peers {
				if p.Subnet6 == "" || !p.Route || p.Mode == "unreachable" {
					t.Errorf("peer %s: %+v", p.Node, p)
				}
			}
			// Drift: an IPv6 route, neighbour and FDB entry removed by hand come back.
			ns := l.NodeNS(n1)
			peer := st.Peers[len(st.Peers)-1]
			ns.MustRun(t, "ip", "-6", "route", "del", peer.Subnet6)
			if peer.Mode == "vxlan" {
				ns.MustRun(t, "ip", "-6", "neigh", "del", strings.TrimSuffix(peer.Subnet6, "/64"), "dev", "netagent.1")
				dst := peer.PublicIP
				if tc.family == "ipv6" {
					dst = peer.PublicIP6
				}
				for _, line := range strings.Split(ns.MustRun(t, "bridge", "fdb", "show", "dev", "netagent.1"), "\n") {
					if f := strings.Fields(line); len(f) > 2 && strings.Contains(line, "dst "+dst+" ") {
						ns.MustRun(t, "bridge", "fdb", "del", f[0], "dev", "netagent.1", "dst", dst, "self")
					}
				}
			}
			var chain string
			if tc.podIface == "routed" {
				chain = bridge.HostVethName(pod.Name, "eth0")
				ns.MustRun(t, "nft", "delete", "chain", "netdev", antispoof.RoutedTable, chain)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if chain != "" {
				took := waitUntil(t, 10*time.Second, "the agent puts back routed pod "+pod.Name+"'s anti-spoofing chain", func() bool {
					_, err := ns.Run("nft", "list", "chain", "netdev", antispoof.RoutedTable, chain)
					return err == nil
				})
				t.Logf("chain put back after %s", took.Round(time.Millisecond))
			}
			if err := l.WaitConverged(ctx, 10*time.Second); err != nil {
				t.Fatalf("drift not repaired: %v\nroutes:\n%s", err, ns.MustRun(t, "ip", "-6", "route", "show", "proto", "180"))
			}
			if bad := matrix(l); bad != "" {
				t.Errorf("after the repair:\n%s", bad)
			}
		})
	}
}

// dump6 is the lab's IPv6 state, for a failure message.
func dump6(t *testing.T, l *lab.Lab) string {
	var b strings.Builder
	for _, n := range l.Nodes {
		fmt.Fprintf(&b, "%s routes:\n%s%s neighbours:\n%s", n.Name, l.NodeNS(n).MustRun(t, "ip", "-6", "route"), n.Name, l.NodeNS(n).MustRun(t, "ip", "-6", "neigh"))
		fmt.Fprintf(&b, "%s counters: %s\n", n.Name, snmp6(l.NodeNS(n)))
		if out, err := l.NodeNS(n).Run("nft", "list", "table", "netdev", antispoof.RoutedTable); err == nil {
			fmt.Fprintf(&b, "%s routed pods' table:\n%s", n.Name, out)
		}
		for _, p := range n.Pods {
			fmt.Fprintf(&b, "%s:\n%s%s%s neighbours:\n%s%s counters: %s\n", p.Name, l.PodNS(p).MustRun(t, "ip", "-6", "addr"), l.PodNS(p).MustRun(t, "ip", "-6", "route"),
				p.Name, l.PodNS(p).MustRun(t, "ip", "-6", "neigh"), p.Name, snmp6(l.PodNS(p)))
		}
	}
	// Whether what failed fails still, or was lost once.
	for _, row := range l.Matrix(context.Background()) {
		for _, c := range row {
			if !c.OK && c.From != c.To {
				fmt.Fprintf(&b, "again: %s -> %s fails still\n", c.From, c.To)
			}
		}
	}
	return b.String()
}

// snmp6 is ns's non-zero IPv6 and ICMPv6 counters that say where a packet went or was
// dropped (/proc/net/snmp6), for a failure message.
func snmp6(ns *netns.NS) string {
	out, err := ns.Run("cat", "/proc/net/snmp6")
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) != 2 || f[1] == "0" || strings.Contains(f[0], "Octets") || strings.Contains(f[0], "ECT") || strings.Contains(f[0], "Mcast") {
			continue
		}
		fmt.Fprintf(&b, "%s=%s ", strings.TrimPrefix(f[0], "Ip6"), f[1])
	}
	return b.String()
}

// icmp6 reads a pod's ICMPv6 echo counters from its kernel (/proc/net/snmp6): the
// requests it sent and the replies it got.
func icmp6(t *testing.T, ns *netns.NS) (out, in int) {
	t.Helper()
	for _, line := range strings.Split(ns.MustRun(t, "cat", "/proc/net/snmp6"), "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		v, _ := strconv.Atoi(f[1])
		switch f[0] {
		case "Icmp6OutEchos":
			out = v
		case "Icmp6InEchoReplies":
			in = v
		}
	}
	return out, in
}

// With IPv6 masquerading switched off, pods reach the outside with their own addresses
// (a routable prefix); and an agent restart, and a kill -9 and restart, under a running
// IPv6 ping lose no packet; with bridged pods and with routed ones.
func TestIPv6NoMasqueradeAndRestart(t *testing.T) {
	for _, podIface := range []string{"bridge", "routed"} {
		t.Run("pods "+podIface, func(t *testing.T) { noMasqueradeAndRestart(t, podIface) })
	}
}

func noMasqueradeAndRestart(t *testing.T, podIface string) {
	off := false
	l := newLabWith(t, lab.Options{Backend: "vxlan", Nodes: 2, PodsPerNode: 1, IPFamily: "dual", IPv6Network: "2001:db8:100::/48", IPv6Masquerade: &off, PodInterface: podIface})
	n1, n2 := l.Nodes[0], l.Nodes[1]
	a, b := n1.Pods[0], n2.Pods[0]
	// The outside host routes the pod network to node1 (as a router announcing it would).
	l.ExtNS().MustRun(t, "ip", "-6", "route", "add", "2001:db8:100::/48", "via", n1.IP6.String())
	l.ExtNS().Serve6(t, 7002, func(client string) string { return client })
	if got, err := l.PodNS(a).Fetch6(fmt.Sprintf("[%s]:7002", l.Ext6)); err != nil || got != a.IP6.String() {
		t.Errorf("pod -> outside without IPv6 masquerade: server saw %q (%v), want the pod's own %s", got, err, a.IP6)
	}
	// Restart node1's agent under a 10 ms ping a -> b over IPv6 (once a first exchange has
	// settled the neighbours).
	if err := ping6(l.PodNS(a), b.IP6.String()); err != nil {
		t.Fatalf("pod to pod over IPv6 before the restart: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for _, kill := range []bool{false, true} { // SIGTERM, then kill -9
		how := map[bool]string{false: "restart", true: "kill -9 and restart"}[kill]
		out0, in0 := icmp6(t, l.PodNS(a))
		ping := l.PodNS(a).Command(ctx, "ping", "-6", "-i", "0.01", "-q", b.IP6.String())
		if err := ping.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond)
		if err := l.StopAgent(n1, kill); err != nil {
			t.Fatal(err)
		}
		if err := l.StartAgent(n1); err != nil {
			t.Fatal(err)
		}
		if err := l.WaitReady(ctx, n1, 20*time.Second); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		_ = ping.Process.Signal(os.Interrupt)
		_ = ping.Wait()
		time.Sleep(100 * time.Millisecond) // the last reply in flight
		out, in := icmp6(t, l.PodNS(a))
		sent, got := out-out0, in-in0
		if sent < 50 || got < sent-1 { // the one sent as ping stopped may be unanswered
			t.Errorf("agent %s under an IPv6 ping: %d echo requests, %d replies", how, sent, got)
		}
		t.Logf("agent %s under an IPv6 ping: %d echo requests, %d replies", how, sent, got)
	}
}

// The first IPv6 ping to a freshly wired pod on another node is answered at once. The
// first pod of a node brings up its bridge; the node resolves a pod's address for packets
// it forwards with a solicitation from the bridge's link-local address, and sent none
// while that address was in duplicate address detection (1 to 2 s after the bridge's
// first carrier), so the first exchange took over 2 s. One second is less than that
// detection takes. Both directions, with bridged pods and with routed ones (whose first
// packet needs no resolution at all: the node's entry for the pod is permanent).
func TestIPv6FirstPingAcrossNodes(t *testing.T) {
	for _, tc := range []struct{ family, backend, podIface string }{
		{"ipv6", "vxlan", "bridge"},
		{"dual", "host-gw", "bridge"},
		{"dual", "host-gw", "routed"},
	} {
		name := tc.family + "/" + tc.backend
		if tc.podIface != "bridge" {
			name += "-" + tc.podIface
		}
		t.Run(name, func(t *testing.T) {
			l := newLabWith(t, lab.Options{Backend: tc.backend, Nodes: 2, IPFamily: tc.family, PodInterface: tc.podIface})
			ctx := context.Background()
			a, err := l.AddPod(ctx, l.Nodes[0], "first-a")
			if err != nil {
				t.Fatal(err)
			}
			b, err := l.AddPod(ctx, l.Nodes[1], "first-b")
			if err != nil {
				t.Fatal(err)
			}
			// Both directions, each the first packet towards a freshly wired pod.
			for _, d := range []struct{ from, to *lab.Pod }{{a, b}, {b, a}} {
				if d.to == a {
					if d.to, err = l.AddPod(ctx, l.Nodes[0], "first-c"); err != nil {
						t.Fatal(err)
					}
				}
				start := time.Now()
				if out, err := l.PodNS(d.from).Run("ping", "-6", "-c", "1", "-W", "1", d.to.IP6.String()); err != nil {
					t.Errorf("first IPv6 ping %s -> %s (another node's new pod) unanswered within 1 s: %v\n%s\n%s", d.from.IP6, d.to.IP6, err, out, dump6(t, l))
				}
				t.Logf("first IPv6 ping %s -> %s answered after %s", d.from.Name, d.to.Name, time.Since(start).Round(time.Millisecond))
			}
		})
	}
}

// A node whose IPv6 underlay address is still in duplicate address detection when its
// agent starts (an interface just configured, as at boot) publishes that address: its
// agent waits for it to become usable before leasing, so peers route IPv6 to it.
func TestIPv6UnderlayTentativeAtStart(t *testing.T) {
	l := newLabWith(t, lab.Options{Backend: "host-gw", Nodes: 2, PodsPerNode: 1, IPFamily: "dual"})
	n1, n2 := l.Nodes[0], l.Nodes[1]
	ns := l.NodeNS(n1)
	if err := l.StopAgent(n1, false); err != nil {
		t.Fatal(err)
	}
	// The address again, with detection this time (3 probes: about 3 s tentative; the
	// lab's underlay links skip it unless told otherwise).
	ns.MustRun(t, "sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=1", "net.ipv6.conf.eth0.dad_transmits=3")
	ns.MustRun(t, "ip", "-6", "addr", "del", n1.IP6.String()+"/64", "dev", "eth0")
	ns.MustRun(t, "ip", "-6", "addr", "add", n1.IP6.String()+"/64", "dev", "eth0")
	start := time.Now()
	if err := l.StartAgent(n1); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(ns.MustRun(t, "ip", "-6", "addr", "show", "dev", "eth0", "tentative"), n1.IP6.String()) {
		t.Fatal("the address was no longer tentative when the agent started: the test shows nothing")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := l.WaitReady(ctx, n1, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	t.Logf("node1's agent ready %s after its start", time.Since(start).Round(time.Millisecond))
	if st := status(t, l, n1); st.PublicIP6 != n1.IP6.String() {
		t.Fatalf("node1 leased with publicIP6 %q, want %s (its address was tentative at start)", st.PublicIP6, n1.IP6)
	}
	waitUntil(t, 10*time.Second, "node2 routes IPv6 directly to node1", func() bool {
		for _, p := range status(t, l, n2).Peers {
			if p.Node == n1.Name {
				return p.PublicIP6 == n1.IP6.String() && p.Mode == "direct"
			}
		}
		return false
	})
	if err := ping6(l.PodNS(n2.Pods[0]), n1.Pods[0].IP6.String()); err != nil {
		t.Errorf("pod on node2 -> pod on node1 over IPv6: %v", err)
	}
	t.Logf("done %s after the agent's start", time.Since(start).Round(time.Millisecond))
}

// An underlay IPv6 address that comes up after the agent started (router advertisements
// that arrive late, an address configured later) is published in the lease: in host-gw
// the node becomes reachable over both families (a peer without an IPv6 next hop cannot
// be routed to directly), and where it already was (vxlan over the IPv4 underlay)
// publishing loses nothing of a 10 ms ping over either family.
func TestIPv6UnderlayAddedAfterStart(t *testing.T) {
	for _, backend := range []string{"host-gw", "vxlan"} {
		t.Run(backend, func(t *testing.T) {
			l := newLabWith(t, lab.Options{Backend: backend, Nodes: 2, PodsPerNode: 1, IPFamily: "dual"})
			n1, n2 := l.Nodes[0], l.Nodes[1]
			ns := l.NodeNS(n1)
			if err := l.StopAgent(n1, false); err != nil {
				t.Fatal(err)
			}
			ns.MustRun(t, "ip", "-6", "addr", "del", n1.IP6.String()+"/64", "dev", "eth0")
			if err := l.StartAgent(n1); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			peerOf := func(n, of *lab.Node) (publicIP6, mode string) {
				for _, p := range status(t, l, n).Peers {
					if p.Node == of.Name {
						return p.PublicIP6, p.Mode
					}
				}
				return "", "absent"
			}
			begin := time.Now()
			if err := l.WaitReady(ctx, n1, 20*time.Second); err != nil {
				t.Fatal(err)
			}
			t.Logf("node1's agent restarted without an IPv6 address: ready in %s", time.Since(begin).Round(time.Millisecond))
			seen := waitUntil(t, 10*time.Second, "node2 sees node1's lease without an IPv6 address", func() bool {
				ip6, mode := peerOf(n2, n1)
				return ip6 == "" && mode != "absent"
			})
			_, before := peerOf(n2, n1)
			t.Logf("node2 saw node1's lease without an IPv6 address %s later", seen.Round(time.Millisecond))
			var pings []*pinger
			if backend == "vxlan" {
				pings = []*pinger{
					startPinger(t, "IPv4", l.PodNS(n2.Pods[0]), n1.Pods[0].IP.String()),
					startPinger(t, "IPv6", l.PodNS(n2.Pods[0]), n1.Pods[0].IP6.String()),
				}
				time.Sleep(time.Second)
			}
			ns.MustRun(t, "ip", "-6", "addr", "add", n1.IP6.String()+"/64", "dev", "eth0", "nodad")
			took := waitUntil(t, 10*time.Second, "node2 sees node1's IPv6 address", func() bool {
				ip6, mode := peerOf(n2, n1)
				return ip6 == n1.IP6.String() && mode == "direct" == (backend == "host-gw")
			})
			t.Logf("node1's IPv6 address published and planned on node2 %s after it was added (node2's mode for node1 was %q before)", took.Round(time.Millisecond), before)
			if got := status(t, l, n1).PublicIP6; got != n1.IP6.String() {
				t.Errorf("node1's status publicIP6 %q, want %s", got, n1.IP6)
			}
			time.Sleep(time.Second)
			for _, p := range pings {
				if lost, sent := p.finish(); len(lost) > 0 || sent < 100 {
					t.Errorf("%s ping node2 pod -> node1 pod while node1 published its address: %d sent, lost %v", p.name, sent, lost)
				}
			}
			for _, ip := range []string{n1.Pods[0].IP.String(), n1.Pods[0].IP6.String()} {
				if err := ping6(l.PodNS(n2.Pods[0]), ip); err != nil {
					t.Errorf("pod on node2 -> pod on node1 (%s): %v", ip, err)
				}
			}
		})
	}
}

package cluster_test

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/lab"
	"github.com/netagent/netagent/test/netns"
)

// TestRouteModeDockerHosts: three Docker hosts (one behind a router), each a netns with a
// real dockerd whose bridge uses the subnet `netagent route-mode` leased and wrote into its
// daemon.json. Containers reach containers on the other hosts and see each other's own
// addresses; traffic to an outside host is masqueraded; a dockerd restart (which puts
// Docker's FORWARD and NAT rules back first) and an agent restart keep it working.
func TestRouteModeDockerHosts(t *testing.T) {
	requireDockerd(t)
	ctx := context.Background()
	l := newLabWith(t, lab.Options{Nodes: 3, Remote: 1, Backend: "hybrid", RouteMode: true})
	type ctr struct {
		node *lab.Node
		name string
		ip   string
	}
	var ctrs []ctr
	inspectIP := func(c ctr) string {
		out, err := l.Docker(ctx, c.node, "inspect", "-f", "{{.NetworkSettings.IPAddress}}", c.name)
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(out)
	}
	for _, n := range l.Nodes { // lab.Up started dockerd on each and imported busybox:local
		c := ctr{node: n, name: "c-" + n.Name}
		if _, err := l.Docker(ctx, n, "run", "-d", "--restart", "always", "--name", c.name, "busybox:local", "/bin/sleep", "86400"); err != nil {
			t.Fatal(err)
		}
		c.ip = inspectIP(c)
		if sub := status(t, l, n).Subnet; !netip.MustParsePrefix(sub).Contains(netip.MustParseAddr(c.ip)) {
			t.Fatalf("container on %s got %s, outside the leased %s", n.Name, c.ip, sub)
		}
		ctrs = append(ctrs, c)
	}
	ns := func(c ctr) *netns.NS {
		pid, err := l.ContainerPid(ctx, c.node, c.name)
		if err != nil {
			t.Fatal(err)
		}
		return &netns.NS{Name: c.name, Path: fmt.Sprintf("/proc/%d/ns/net", pid)}
	}
	check := func(stage string) {
		t.Helper()
		for _, a := range ctrs {
			for _, b := range ctrs {
				if a == b {
					continue
				}
				if _, err := l.Docker(ctx, a.node, "exec", a.name, "ping", "-c", "1", "-W", "2", b.ip); err != nil {
					t.Errorf("%s: %s -> %s (%s): %v", stage, a.name, b.name, b.ip, err)
				}
			}
		}
		// The receiver sees the sender's container address, not its host's.
		port := 7000 + int(time.Now().UnixNano()%1000)
		ns(ctrs[1]).Serve(t, port, func(client string) string { return client })
		if got, err := ns(ctrs[0]).Fetch(fmt.Sprintf("%s:%d", ctrs[1].ip, port)); err != nil || got != ctrs[0].ip {
			t.Errorf("%s: %s -> %s: server saw %q (%v), want %s", stage, ctrs[0].name, ctrs[1].name, got, err, ctrs[0].ip)
		}
		// Outbound to an underlay host outside the cluster is masqueraded to the host's IP.
		l.ExtNS().Serve(t, port, func(client string) string { return client })
		if got, err := ns(ctrs[0]).Fetch(fmt.Sprintf("%s:%d", l.Ext, port)); err != nil || got != ctrs[0].node.IP.String() {
			t.Errorf("%s: container -> outside: server saw %q (%v), want %s", stage, got, err, ctrs[0].node.IP)
		}
	}
	check("initial")

	if err := l.RestartDocker(ctx, l.Nodes[0]); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 30*time.Second, "container back after the dockerd restart", func() bool {
		out, err := l.Docker(ctx, l.Nodes[0], "inspect", "-f", "{{.State.Running}}", ctrs[0].name)
		return err == nil && strings.TrimSpace(out) == "true"
	})
	ctrs[0].ip = inspectIP(ctrs[0])
	fwd := l.NodeNS(l.Nodes[0]).MustRun(t, "iptables", "-S", "FORWARD")
	if !belowDocker(fwd) {
		t.Errorf("after the dockerd restart our FORWARD jump is not right below Docker's:\n%s", fwd)
	}
	check("after dockerd restart")

	if err := l.StopAgent(l.Nodes[1], true); err != nil {
		t.Fatal(err)
	}
	if err := l.StartAgent(l.Nodes[1]); err != nil {
		t.Fatal(err)
	}
	if err := l.WaitReady(ctx, l.Nodes[1], 20*time.Second); err != nil {
		t.Fatal(err)
	}
	check("after agent restart")
}

// TestRouteModeDockerNetwork: with --docker-network the agent creates a user-defined
// bridge network on its lease through the Docker API; containers on it reach each other
// across hosts, Docker's isolation between that network and the default bridge holds, and
// the network is created again when someone removes it.
func TestRouteModeDockerNetwork(t *testing.T) {
	requireDockerd(t)
	l := newLabWith(t, lab.Options{Nodes: 2, Backend: "host-gw", RouteMode: true, DockerNetwork: "podnet", PodsPerNode: 1, Resync: 2 * time.Second})
	for _, n := range l.Nodes {
		sub := netip.MustParsePrefix(status(t, l, n).Subnet)
		if !sub.Contains(n.Pods[0].IP) {
			t.Errorf("container on %s got %s, outside the leased %s", n.Name, n.Pods[0].IP, sub)
		}
	}
	if f := lab.Failures(l.Matrix(context.Background())); len(f) > 0 {
		t.Errorf("containers on the created networks: %v", f)
	}

	// A container on the default bridge of node1 and one on the leased network: Docker
	// isolates the two networks, and netagent must not open a path between them.
	ctx := context.Background()
	n1 := l.Nodes[0]
	if _, err := l.Docker(ctx, n1, "run", "-d", "--name", "other", "busybox:local", "/bin/sleep", "86400"); err != nil {
		t.Fatal(err)
	}
	out, err := l.Docker(ctx, n1, "inspect", "-f", "{{.State.Pid}} {{.NetworkSettings.IPAddress}}", "other")
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	var ip string
	if _, err := fmt.Sscan(out, &pid, &ip); err != nil {
		t.Fatalf("inspect other: %q: %v", out, err)
	}
	other := &netns.NS{Name: "other", Path: fmt.Sprintf("/proc/%d/ns/net", pid)}
	other.Serve(t, 7100, func(client string) string { return client })
	if got, err := l.PodNS(n1.Pods[0]).Fetch(ip + ":7100"); err == nil {
		t.Errorf("container on %s reached %s on the default bridge (server saw %q)", l.DockerNetwork, ip, got)
	}
	if got, err := other.Fetch(servePod(t, l, n1.Pods[0])); err == nil {
		t.Errorf("container on the default bridge reached %s on %s (server saw %q)", n1.Pods[0].IP, l.DockerNetwork, got)
	}

	// Removed by hand (its container first): the agent creates it again.
	if _, err := l.Docker(ctx, n1, "rm", "-f", n1.Pods[0].Name); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Docker(ctx, n1, "network", "rm", l.DockerNetwork); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 20*time.Second, "the removed docker network back", func() bool {
		_, err := l.Docker(ctx, n1, "network", "inspect", l.DockerNetwork)
		return err == nil
	})
}

// TestRouteModeDockerDualStack: Docker hosts in a dual-stack cluster over a dual-stack
// underlay. route-mode writes the IPv6 subnet into daemon.json (ipv6, fixed-cidr-v6) beside
// bip, dockerd gives containers an address of each family from the leases, and containers
// reach each other across hosts over IPv6 with their own source addresses, while traffic
// to an outside host is masqueraded to the host's IPv6 address.
func TestRouteModeDockerDualStack(t *testing.T) {
	requireDockerd(t)
	l := newLabWith(t, lab.Options{Nodes: 2, Backend: "host-gw", IPFamily: "dual", RouteMode: true, PodsPerNode: 1})
	var pods []*lab.Pod
	for _, n := range l.Nodes {
		st := status(t, l, n)
		p := n.Pods[0]
		sub6, err := netip.ParsePrefix(st.Subnet6)
		if err != nil {
			t.Fatalf("%s: no IPv6 subnet in status (%q): %v", n.Name, st.Subnet6, err)
		}
		if !p.IP6.IsValid() || !sub6.Contains(p.IP6) {
			t.Fatalf("container on %s has IPv6 %v, want one in the leased %s", n.Name, p.IP6, sub6)
		}
		if !netip.MustParsePrefix(st.Subnet).Contains(p.IP) {
			t.Errorf("container on %s has %s, outside the leased %s", n.Name, p.IP, st.Subnet)
		}
		pods = append(pods, p)
	}
	// The agents took the bridges' IPv6 addresses out of duplicate address detection, as
	// the plugin adds its bridge's: otherwise a container's IPv6 gateway, and the node's
	// solicitations for its containers, wait for DAD at each first carrier of docker0.
	for _, n := range l.Nodes {
		out := l.NodeNS(n).MustRun(t, "ip", "-6", "-o", "addr", "show", "dev", "docker0")
		if gw := status(t, l, n).Subnet6; strings.Contains(out, "tentative") || !strings.Contains(out, strings.TrimSuffix(gw, "/64")+"1/64 scope global nodad") {
			t.Errorf("%s: docker0's addresses not taken out of DAD (gateway of %s):\n%s", n.Name, gw, out)
		}
		if v := l.NodeNS(n).MustRun(t, "cat", "/proc/sys/net/ipv6/conf/docker0/accept_dad"); strings.TrimSpace(v) != "0" {
			t.Errorf("%s: docker0 accept_dad = %s, want 0", n.Name, v)
		}
	}
	a, b := pods[0], pods[1]
	for _, ip := range []netip.Addr{b.IP, b.IP6} {
		if err := lab.Ping(l.PodNS(a), ip.String()); err != nil {
			t.Errorf("%s -> %s (%s): %v", a.Name, b.Name, ip, err)
		}
	}
	port := 7600 + int(time.Now().UnixNano()%300)
	l.PodNS(b).Serve6(t, port, func(client string) string { return client })
	if got, err := l.PodNS(a).Fetch6(netip.AddrPortFrom(b.IP6, uint16(port)).String()); err != nil || got != a.IP6.String() {
		t.Errorf("%s -> %s over IPv6: server saw %q (%v), want the container's own %s", a.Name, b.Name, got, err, a.IP6)
	}
	l.ExtNS().Serve6(t, port, func(client string) string { return client })
	if got, err := l.PodNS(a).Fetch6(netip.AddrPortFrom(l.Ext6, uint16(port)).String()); err != nil || got != l.Nodes[0].IP6.String() {
		t.Errorf("container -> outside over IPv6: server saw %q (%v), want the host's %s", got, err, l.Nodes[0].IP6)
	}
}

package cluster_test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
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
// Docker's FORWARD and NAT rules back above ours) and an agent restart keep it working.
func TestRouteModeDockerHosts(t *testing.T) {
	netns.RequireRoot(t)
	if _, err := exec.LookPath("dockerd"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("dockerd is missing (scripts/deps.sh installs docker.io)")
		}
		t.Skip("dockerd is not installed (apt-get install docker.io)")
	}
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
	if lines := strings.Split(fwd, "\n"); len(lines) < 2 || !strings.Contains(lines[1], "NETAGENT-FWD") {
		t.Errorf("after the dockerd restart our FORWARD jump is not first:\n%s", fwd)
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
// across hosts.
func TestRouteModeDockerNetwork(t *testing.T) {
	netns.RequireRoot(t)
	if _, err := exec.LookPath("dockerd"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("dockerd is missing (scripts/deps.sh installs docker.io)")
		}
		t.Skip("no dockerd")
	}
	l := newLabWith(t, lab.Options{Nodes: 2, Backend: "host-gw", RouteMode: true, DockerNetwork: "podnet", PodsPerNode: 1})
	for _, n := range l.Nodes {
		sub := netip.MustParsePrefix(status(t, l, n).Subnet)
		if !sub.Contains(n.Pods[0].IP) {
			t.Errorf("container on %s got %s, outside the leased %s", n.Name, n.Pods[0].IP, sub)
		}
	}
	if f := lab.Failures(l.Matrix(context.Background())); len(f) > 0 {
		t.Errorf("containers on the created networks: %v", f)
	}
}

package cluster_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/agent"
	"github.com/netagent/netagent/pkg/lab"
	"github.com/netagent/netagent/test/netns"
)

// requireDockerd skips (or fails in CI) without a dockerd to start.
func requireDockerd(t *testing.T) {
	t.Helper()
	netns.RequireRoot(t)
	if _, err := exec.LookPath("dockerd"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("dockerd is missing (scripts/deps.sh installs docker.io)")
		}
		t.Skip("dockerd is not installed (apt-get install docker.io)")
	}
}

// fetchPort picks a TCP port for one check (each Serve keeps its port until the test ends).
var fetchPort = 7400

func servePod(t *testing.T, l *lab.Lab, p *lab.Pod) string {
	t.Helper()
	fetchPort++
	l.PodNS(p).Serve(t, fetchPort, func(client string) string { return client })
	return fmt.Sprintf("%s:%d", p.IP, fetchPort)
}

// TestRouteModeFirewall: route mode accepts only traffic between the cluster's container
// subnets and leaves everything else to Docker: an underlay host with a route to a host's
// subnet cannot reach a container's unpublished port, an admin's DOCKER-USER rules apply to
// peer traffic too (and stay first in FORWARD, also after dockerd restarts), while
// containers on different hosts still reach each other.
func TestRouteModeFirewall(t *testing.T) {
	requireDockerd(t)
	ctx := context.Background()
	l := newLabWith(t, lab.Options{Nodes: 2, Backend: "host-gw", RouteMode: true, PodsPerNode: 1})
	n1, n2 := l.Nodes[0], l.Nodes[1]
	c1, c2 := n1.Pods[0], n2.Pods[0]
	host := l.NodeNS(n1)

	peer := func(stage string, want bool) {
		t.Helper()
		addr := servePod(t, l, c1)
		got, err := l.PodNS(c2).Fetch(addr)
		if ok := err == nil && got == c2.IP.String(); ok != want {
			t.Errorf("%s: peer container %s -> %s: got %q, %v; want reachable=%v", stage, c2.IP, addr, got, err, want)
		}
	}
	peer("initial", true)
	for _, n := range l.Nodes { // the ready line counts other nodes, not this one's lease
		b, _ := os.ReadFile(filepath.Join(n.Dir, "agent.log"))
		if m := regexp.MustCompile(`msg=ready .*peers=(\d+)`).FindSubmatch(b); m == nil || string(m[1]) > "1" {
			t.Errorf("%s: ready line %q, want peers=0 or 1 of 2 nodes", n.Name, m)
		}
	}

	// doctor knows a route-mode host from the agent's status: no CNI checks, Docker's
	// bridge, netagent's jump below Docker's.
	out, err := host.Run(l.Opt.Netagent, "doctor", "--subnet-file", filepath.Join(n1.Dir, "subnet.env"), "--iface", "eth0")
	if err != nil || strings.Contains(out, "PROBLEM") || strings.Contains(out, "CNI") || !strings.Contains(out, "right below Docker's") {
		t.Errorf("doctor on a healthy route-mode host: %v\n%s", err, out)
	}

	// An underlay host that routes n1's subnet to n1 must not get past Docker's DOCKER
	// chain (the port is not published).
	sub := status(t, l, n1).Subnet
	l.ExtNS().MustRun(t, "ip", "route", "add", sub, "via", n1.IP.String())
	if got, err := l.ExtNS().Fetch(servePod(t, l, c1)); err == nil {
		t.Errorf("underlay host reached an unpublished port of %s (server saw %q)", c1.IP, got)
	}

	// An admin's DOCKER-USER rule sees (and here drops) peer traffic.
	rule := []string{"DOCKER-USER", "-s", c2.IP.String(), "-p", "tcp", "-j", "DROP"}
	host.MustRun(t, "iptables", append([]string{"-I"}, rule...)...)
	peer("DOCKER-USER drops the peer", false)
	if out := host.MustRun(t, "iptables", "-L", "DOCKER-USER", "-v", "-x", "-n"); !strings.Contains(out, c2.IP.String()) || counted(out, c2.IP.String()) == 0 {
		t.Errorf("the DOCKER-USER rule counted no packets:\n%s", out)
	}
	host.MustRun(t, "iptables", append([]string{"-D"}, rule...)...)
	peer("DOCKER-USER rule removed", true)

	// A dockerd restart puts Docker's jumps back at the top of FORWARD; netagent's goes
	// back below DOCKER-USER, never above it.
	if err := l.RestartDocker(ctx, n1); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 30*time.Second, "container back after the dockerd restart", func() bool {
		out, err := l.Docker(ctx, n1, "inspect", "-f", "{{.State.Running}}", c1.Name)
		return err == nil && strings.TrimSpace(out) == "true"
	})
	if err := l.ReattachContainer(ctx, n1, c1); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "netagent's FORWARD jump right below Docker's", func() bool {
		return belowDocker(host.MustRun(t, "iptables", "-S", "FORWARD"))
	})
	peer("after dockerd restart", true)
	host.MustRun(t, "iptables", append([]string{"-I"}, rule...)...)
	peer("DOCKER-USER drops the peer after dockerd restart", false)
}

// belowDocker reports whether `iptables -S FORWARD` has DOCKER-USER first and
// netagent's jump right below Docker's DOCKER-USER and isolation jumps.
func belowDocker(fwd string) bool {
	rules := strings.Split(strings.TrimSpace(fwd), "\n")[1:] // after "-P FORWARD ..."
	if len(rules) < 2 || rules[0] != "-A FORWARD -j DOCKER-USER" {
		return false
	}
	i := 1
	if rules[i] == "-A FORWARD -j DOCKER-ISOLATION-STAGE-1" {
		i++
	}
	return i < len(rules) && rules[i] == "-A FORWARD -j NETAGENT-FWD" && strings.Count(fwd, "NETAGENT-FWD") == 1
}

// counted is the packet counter of the first rule of an `iptables -L -v -x -n` listing
// that mentions s.
func counted(listing, s string) int {
	for _, line := range strings.Split(listing, "\n") {
		if strings.Contains(line, s) {
			var n int
			_, _ = fmt.Sscan(line, &n)
			return n
		}
	}
	return 0
}

// TestRouteModeDockerLifecycle: a Docker host that already runs dockerd keeps its
// docker0 subnet when it is free in the cluster network (no renumbering); when it cannot
// be kept, the agent writes the lease into daemon.json and is not ready, saying why and
// what to do, until dockerd is restarted onto it.
func TestRouteModeDockerLifecycle(t *testing.T) {
	requireDockerd(t)
	ctx := context.Background()
	l := newLabWith(t, lab.Options{Nodes: 2, Backend: "host-gw", RouteMode: true})
	n := l.Nodes[0]
	cfg := filepath.Join(n.Dir, "daemon.json")
	// rebase makes node1 a host whose dockerd already runs on bip, with no lease and no
	// subnet file, then starts its agent again.
	rebase := func(bip string) {
		t.Helper()
		if err := l.StopAgent(n, false); err != nil {
			t.Fatal(err)
		}
		if out, err := l.Netagent(ctx, "leave", "--node-name", n.Name); err != nil {
			t.Fatalf("leave: %v: %s", err, out)
		}
		if err := os.Remove(filepath.Join(n.Dir, "subnet.env")); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(cfg, []byte(fmt.Sprintf(`{"bip": %q}`, bip)), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := l.RestartDocker(ctx, n); err != nil {
			t.Fatal(err)
		}
		if err := l.StartAgent(n); err != nil {
			t.Fatal(err)
		}
	}

	rebase("10.244.77.1/24")
	if err := l.WaitReady(ctx, n, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	if got := status(t, l, n).Subnet; got != "10.244.77.0/24" {
		t.Errorf("lease = %s, want docker0's own 10.244.77.0/24 (adopted)", got)
	}

	rebase("172.18.0.1/16")
	var st agent.Status
	waitUntil(t, 20*time.Second, "the agent reports why it is not ready", func() bool {
		code, b, err := l.Get(n, "/status")
		return err == nil && code == 200 && json.Unmarshal(b, &st) == nil && st.Errors["docker"] != ""
	})
	msg := st.Errors["docker"]
	for _, want := range []string{"restart dockerd", "172.18.0.0/16 is outside the cluster network"} {
		if !strings.Contains(msg, want) {
			t.Errorf("docker error %q does not say %q", msg, want)
		}
	}
	if code, _, _ := l.Get(n, "/readyz"); code == 200 {
		t.Errorf("ready while docker0 is on 172.18.0.1/16, not the lease %s", st.Subnet)
	}
	if err := l.RestartDocker(ctx, n); err != nil {
		t.Fatal(err)
	}
	if err := l.WaitReady(ctx, n, 20*time.Second); err != nil {
		t.Fatal(err)
	}
}

package lab

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/netagent/netagent/pkg/lab/k8s"
)

// Docker hosts in the lab: a real dockerd per node namespace, started with nsenter (ip
// netns exec would remount /sys and hide the cgroup mounts dockerd needs), each with its
// own data root, exec root, API socket and pid file, configured by the daemon.json that
// `netagent route-mode --write-docker-config` wrote for the node's lease.

func (l *Lab) dockerSock(n *Node) string { return filepath.Join(n.Dir, "docker.sock") }

// dockerExecRoot is short: dockerd puts unix sockets under it (108-byte path limit).
func (l *Lab) dockerExecRoot(n *Node) string {
	return filepath.Join("/run/nadk", fmt.Sprintf("%d-%s", os.Getpid(), n.Name))
}

// StartDocker starts dockerd on node n and waits for its API.
func (l *Lab) StartDocker(ctx context.Context, n *Node) error {
	cfg := filepath.Join(n.Dir, "daemon.json")
	if _, err := os.Stat(cfg); err != nil {
		return fmt.Errorf("%s: no daemon.json from netagent route-mode yet: %w", n.Name, err)
	}
	if err := os.MkdirAll(l.dockerExecRoot(n), 0o700); err != nil {
		return err
	}
	cmd := l.NodeNS(n).Command(context.Background(), "dockerd",
		"--config-file", cfg,
		"--data-root", filepath.Join(n.Dir, "docker-data"),
		"--exec-root", l.dockerExecRoot(n),
		"-H", "unix://"+l.dockerSock(n),
		"--pidfile", filepath.Join(n.Dir, "docker.pid"),
		"--log-level", "warn",
		"--shutdown-timeout", "2")
	pid, err := k8s.StartDetached(cmd, filepath.Join(n.Dir, "dockerd.log"))
	if err != nil {
		return err
	}
	n.Dockerd = pid
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := l.Docker(ctx, n, "info", "--format", "{{.ServerVersion}}"); err == nil {
			return nil
		}
		if syscall.Kill(pid, 0) != nil || zombie(pid) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("dockerd on %s did not come up; log:\n%s", n.Name, tail(filepath.Join(n.Dir, "dockerd.log"), 20))
}

// waitDaemonJSON waits for the node's agent to write the lease into daemon.json.
func (l *Lab) waitDaemonJSON(ctx context.Context, n *Node, timeout time.Duration) error {
	cfg := filepath.Join(n.Dir, "daemon.json")
	deadline := time.Now().Add(timeout)
	for {
		if b, err := os.ReadFile(cfg); err == nil && strings.Contains(string(b), `"bip"`) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the agent on %s wrote no bip into %s in %s; log:\n%s", n.Name, cfg, timeout, tail(filepath.Join(n.Dir, "agent.log"), 20))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// StopDocker removes every container and stops dockerd gracefully (so it unmounts its
// layers).
func (l *Lab) StopDocker(ctx context.Context, n *Node) error {
	if n.Dockerd == 0 {
		return nil
	}
	if ids, err := l.Docker(ctx, n, "ps", "-aq"); err == nil && strings.TrimSpace(ids) != "" {
		_, _ = l.Docker(ctx, n, append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
	}
	err := signalWaitFor(n.Dockerd, syscall.SIGTERM, 60*time.Second)
	n.Dockerd = 0
	_ = os.RemoveAll(l.dockerExecRoot(n))
	return err
}

// Docker runs the docker CLI against node n's dockerd.
func (l *Lab) Docker(ctx context.Context, n *Node, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "docker", append([]string{"-H", "unix://" + l.dockerSock(n)}, args...)...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("docker %s on %s: %w: %s", strings.Join(args, " "), n.Name, err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// ImportBusybox makes the image busybox:local on node n from /bin/busybox, without a
// registry.
func (l *Lab) ImportBusybox(ctx context.Context, n *Node) error {
	root := filepath.Join(n.Dir, "busybox-root")
	if err := os.MkdirAll(filepath.Join(root, "bin"), 0o755); err != nil {
		return err
	}
	b, err := os.ReadFile("/bin/busybox")
	if err != nil {
		return fmt.Errorf("busybox-static is needed: %w", err)
	}
	if err := os.WriteFile(filepath.Join(root, "bin", "busybox"), b, 0o755); err != nil {
		return err
	}
	list, err := exec.Command("/bin/busybox", "--list").Output()
	if err != nil {
		return err
	}
	for _, app := range strings.Fields(string(list)) {
		if app != "busybox" {
			_ = os.Symlink("busybox", filepath.Join(root, "bin", app))
		}
	}
	tar := exec.CommandContext(ctx, "tar", "-C", root, "-c", ".")
	imp := exec.CommandContext(ctx, "docker", "-H", "unix://"+l.dockerSock(n), "import", "-", "busybox:local")
	pipe, err := tar.StdoutPipe()
	if err != nil {
		return err
	}
	imp.Stdin = pipe
	if err := tar.Start(); err != nil {
		return err
	}
	out, ierr := imp.CombinedOutput()
	terr := tar.Wait()
	if err := errors.Join(ierr, terr); err != nil {
		return fmt.Errorf("import busybox on %s: %w: %s", n.Name, err, out)
	}
	return nil
}

// ContainerPid is the pid of a running container's first process (its network namespace
// is /proc/PID/ns/net).
func (l *Lab) ContainerPid(ctx context.Context, n *Node, name string) (int, error) {
	out, err := l.Docker(ctx, n, "inspect", "-f", "{{.State.Pid}}", name)
	if err != nil {
		return 0, err
	}
	var pid int
	_, err = fmt.Sscan(out, &pid)
	return pid, err
}

// RestartDocker stops dockerd (containers stay defined) and starts it again.
func (l *Lab) RestartDocker(ctx context.Context, n *Node) error {
	if err := signalWaitFor(n.Dockerd, syscall.SIGTERM, 60*time.Second); err != nil {
		return err
	}
	n.Dockerd = 0
	return l.StartDocker(ctx, n)
}

// upDocker is the Docker scenario after the agents are ready: a dockerd per node on the
// lease, busybox imported, containers started, each container's network namespace
// attached under the lab's prefix so the matrix and `ip netns exec` reach it.
func (l *Lab) upDocker(ctx context.Context) error {
	for _, n := range l.Nodes {
		if n.Dockerd == 0 {
			if err := l.StartDocker(ctx, n); err != nil {
				return err
			}
		}
		if err := l.ImportBusybox(ctx, n); err != nil {
			return err
		}
		for i := range l.Opt.PodsPerNode {
			name := fmt.Sprintf("%s-c%d", n.Name, i+1)
			args := []string{"run", "-d", "--restart", "always", "--name", name}
			if l.DockerNetwork != "" {
				args = append(args, "--network", l.DockerNetwork)
			}
			if _, err := l.Docker(ctx, n, append(args, "busybox:local", "/bin/sleep", "2147483647")...); err != nil {
				return err
			}
			if err := l.attachContainer(ctx, n, name); err != nil {
				return err
			}
		}
	}
	return nil
}

// attachContainer names a container's network namespace <prefix><name> and records it as
// one of the node's pods.
func (l *Lab) attachContainer(ctx context.Context, n *Node, name string) error {
	p := &Pod{Name: name, NS: l.Prefix + name, Node: n.Name}
	if err := l.ReattachContainer(ctx, n, p); err != nil {
		return err
	}
	l.Namespaces = append(l.Namespaces, p.NS)
	n.Pods = append(n.Pods, p)
	return nil
}

// ReattachContainer points p's namespace name at its container's current network
// namespace and updates its address (a restarted container has new ones).
func (l *Lab) ReattachContainer(ctx context.Context, n *Node, p *Pod) error {
	pid, err := l.ContainerPid(ctx, n, p.Name)
	if err != nil {
		return err
	}
	format := "{{.NetworkSettings.IPAddress}} {{.NetworkSettings.GlobalIPv6Address}}"
	if l.DockerNetwork != "" {
		format = fmt.Sprintf("{{with index .NetworkSettings.Networks %q}}{{.IPAddress}} {{.GlobalIPv6Address}}{{end}}", l.DockerNetwork)
	}
	out, err := l.Docker(ctx, n, "inspect", "-f", format, p.Name)
	if err != nil {
		return err
	}
	f := strings.Fields(out)
	if len(f) == 0 {
		return fmt.Errorf("container %s has no address", p.Name)
	}
	ip, err := netip.ParseAddr(f[0])
	if err != nil {
		return fmt.Errorf("container %s has no address: %w", p.Name, err)
	}
	var ip6 netip.Addr
	if len(f) > 1 {
		if ip6, err = netip.ParseAddr(f[1]); err != nil || !ip6.Is6() {
			return fmt.Errorf("container %s: IPv6 address %q: %v", p.Name, f[1], err)
		}
	}
	_ = exec.Command("ip", "netns", "delete", p.NS).Run()
	if b, err := exec.Command("ip", "netns", "attach", p.NS, fmt.Sprint(pid)).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns attach %s %d: %v: %s", p.NS, pid, err, b)
	}
	p.IP, p.IP6 = ip, ip6
	return nil
}

package containerd

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/netagent/netagent/pkg/lab/cgroup"
	"github.com/netagent/netagent/test/netns"
)

const (
	// imageName is what the imported archive is called and the CRI's sandbox_image.
	imageName = "netagent.local/pause:1"
	// criTimeout bounds every single CRI call; RunPodSandbox (snapshot, shim, CNI ADD) is
	// the slowest and takes well under a second here.
	criTimeout = 30 * time.Second
	// podNamespace is the Kubernetes namespace of every test pod.
	podNamespace = "netagent-test"
	// shimSocketDir is where containerd 1.6's runc shim puts its socket, whatever the
	// configured state dir (runtime/v2/shim.SocketAddress).
	shimSocketDir = "/run/containerd/s"
)

// node is one containerd running in its own network namespace, reached over the CRI.
type node struct {
	ns           *netns.NS
	dir          string // everything containerd owns lives below it
	sock         string
	logPath      string
	snapshotter  string
	cgroupParent string
	rt           runtimeapi.RuntimeServiceClient

	mu        sync.Mutex
	sandboxes []string     // every sandbox ID ever created, for shim socket cleanup
	shims     map[int]bool // every shim seen, to wait until they are reaped
}

// nodeOptions says which CNI network the node's containerd uses.
type nodeOptions struct {
	// plugins maps a CNI plugin name (the "type" in the config) to its binary; each is
	// symlinked into the node's own CNI bin dir.
	plugins map[string]string
	// confName is the file name of conflist in the CNI conf dir.
	confName string
	conflist []byte
	// setup prepares the node namespace (its own address) before containerd starts.
	setup func(*netns.NS) error
}

// startNode creates a node namespace, starts containerd in it with every path in a fresh
// temp dir, imports the busybox image and waits until the CRI reports the network ready.
// Everything is torn down when the test ends, whether it passed or not.
func startNode(ctx context.Context, t *testing.T, opts nodeOptions) *node {
	t.Helper()
	requireTools(t, "containerd", "containerd-shim-runc-v2", "runc", "ctr", "nsenter", "iptables-save", "/bin/busybox")
	// The name carries "netagent" so leftovers are easy to spot in `mount` and /proc, and
	// stays short: the gRPC socket path must fit in sun_path (108 bytes).
	dir, err := os.MkdirTemp("", "netagent-containerd-")
	if err != nil {
		t.Fatal(err)
	}
	n := &node{
		dir:          dir,
		sock:         filepath.Join(dir, "containerd.sock"),
		logPath:      filepath.Join(dir, "containerd.log"),
		cgroupParent: "/" + filepath.Base(dir),
	}
	_, runContainerdErr := os.Stat("/run/containerd")
	// Registered first so it runs last: after the CRI removal pass and after the node
	// namespace (with containerd and the shims in it) is gone.
	t.Cleanup(func() {
		if err := n.sweep(os.IsNotExist(runContainerdErr)); err != nil {
			t.Errorf("clean up after containerd: %v", err)
		}
	})

	for _, d := range []string{"cni/bin", "cni/conf", "logs"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for name, bin := range opts.plugins {
		if err := os.Symlink(bin, filepath.Join(dir, "cni/bin", name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "cni/conf", opts.confName), opts.conflist, 0o644); err != nil {
		t.Fatal(err)
	}
	archive := filepath.Join(dir, "image.tar")
	if err := writeImage(archive, imageName); err != nil {
		t.Fatal(err)
	}

	n.ns = netns.New(t, "ctrd")
	if opts.setup != nil {
		if err := opts.setup(n.ns); err != nil {
			t.Fatalf("set up node netns: %v", err)
		}
	}

	conn, err := grpc.NewClient("unix://"+n.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("grpc client for %s: %v", n.sock, err)
	}
	n.rt = runtimeapi.NewRuntimeServiceClient(conn)
	// Runs before the namespace is removed: remove pods through the runtime first, so
	// the plugin's DEL runs and the shims exit on their own.
	t.Cleanup(func() {
		if err := n.removeAllPods(); err != nil {
			t.Errorf("remove pods on cleanup: %v", err)
		}
		if t.Failed() {
			n.logTail(t, 60)
		}
		_ = conn.Close()
	})

	// overlayfs is what a real node uses; fall back to native where the kernel or the
	// backing filesystem cannot stack overlays.
	for _, snap := range []string{"overlayfs", "native"} {
		n.snapshotter = snap
		cmd, err := n.startContainerd(ctx)
		if err != nil {
			n.logTail(t, 40)
			t.Fatal(err)
		}
		ok, err := n.snapshotterLoaded(ctx, snap)
		if err != nil {
			n.logTail(t, 40)
			t.Fatal(err)
		}
		if ok {
			break
		}
		t.Logf("snapshotter %s unavailable, restarting containerd", snap)
		_ = cmd.Process.Kill()
		_, _ = cmd.Process.Wait()
		if snap == "native" {
			t.Fatal("no usable snapshotter")
		}
	}
	t.Logf("containerd up in netns %s with snapshotter %s, dir %s", n.ns.Name, n.snapshotter, dir)

	if err := importImage(ctx, n.sock, n.snapshotter, archive); err != nil {
		n.logTail(t, 40)
		t.Fatal(err)
	}
	if err := n.waitNetworkReady(ctx); err != nil {
		n.logTail(t, 40)
		t.Fatal(err)
	}
	return n
}

// requireTools skips the test when a program it drives is missing; with CI set it fails
// instead, like netns.RequireRoot, so CI cannot pass by skipping.
func requireTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") != "" {
				t.Fatalf("%s is needed (CI is set, so this is a failure, not a skip): %v", tool, err)
			}
			t.Skipf("%s is needed: %v", tool, err)
		}
	}
}

// config renders containerd's configuration. Every path points into the temp dir; the
// shim socket (/run/containerd/s) is the one path containerd 1.6 does not let us move.
func (n *node) config() string {
	d := n.dir
	return fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
]

[grpc]
  address = %[3]q

[ttrpc]
  address = %[4]q

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = %[5]q

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[6]q
  # root here lacks CAP_SYS_RESOURCE, so it cannot lower oom_score_adj.
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true
  # Pod namespaces go below the state dir instead of /run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = %[7]q
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # runc's state would otherwise go to /run/containerd/runc.
        Root = %[8]q

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %[9]q
    conf_dir = %[10]q
    max_conf_num = 1
`,
		filepath.Join(d, "root"), filepath.Join(d, "state"), n.sock, filepath.Join(d, "containerd.ttrpc"),
		filepath.Join(d, "opt"), imageName, n.snapshotter, filepath.Join(d, "runc"),
		filepath.Join(d, "cni/bin"), filepath.Join(d, "cni/conf"))
}

// startContainerd starts containerd in the node namespace and waits for its API.
func (n *node) startContainerd(ctx context.Context) (*exec.Cmd, error) {
	cfg := filepath.Join(n.dir, "config.toml")
	if err := os.WriteFile(cfg, []byte(n.config()), 0o644); err != nil {
		return nil, fmt.Errorf("write containerd config: %w", err)
	}
	log, err := os.OpenFile(n.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("containerd log: %w", err)
	}
	defer log.Close() // the child holds its own descriptor
	// nsenter --net, not `ip netns exec`: the latter remounts /sys, which containerd and
	// runc need as the host's.
	cmd := exec.Command("nsenter", "--net="+n.ns.Path, "--", "containerd", "--config", cfg)
	cmd.Stdout = log
	cmd.Stderr = log
	if err := n.ns.Start(cmd); err != nil {
		return nil, fmt.Errorf("start containerd: %w", err)
	}
	err = poll(ctx, 15*time.Second, func(ctx context.Context) error {
		if !processExists(cmd.Process.Pid) {
			return permanent(errors.New("containerd exited"))
		}
		_, err := n.rt.Version(ctx, &runtimeapi.VersionRequest{})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("containerd in %s not answering on %s: %w", n.ns.Name, n.sock, err)
	}
	return cmd, nil
}

// snapshotterLoaded reports whether containerd loaded the snapshotter plugin (it skips
// overlayfs when a test mount fails).
func (n *node) snapshotterLoaded(ctx context.Context, name string) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, criTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ctr", "--address", n.sock, "plugins", "ls").CombinedOutput()
	if err != nil {
		return false, fmt.Errorf("ctr plugins ls: %w: %s", err, bytes.TrimSpace(out))
	}
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		if len(f) >= 3 && f[0] == "io.containerd.snapshotter.v1" && f[1] == name {
			return f[len(f)-1] == "ok", nil
		}
	}
	return false, nil
}

// waitNetworkReady waits until the CRI has loaded the CNI config.
func (n *node) waitNetworkReady(ctx context.Context) error {
	return poll(ctx, 15*time.Second, func(ctx context.Context) error {
		resp, err := n.rt.Status(ctx, &runtimeapi.StatusRequest{})
		if err != nil {
			return err
		}
		for _, c := range resp.GetStatus().GetConditions() {
			if c.GetType() == runtimeapi.NetworkReady {
				if c.GetStatus() {
					return nil
				}
				return fmt.Errorf("network not ready: %s: %s", c.GetReason(), c.GetMessage())
			}
		}
		return errors.New("no NetworkReady condition")
	})
}

// poll calls fn until it succeeds, returns a permanent error or limit passes, returning
// fn's last error.
func poll(ctx context.Context, limit time.Duration, fn func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	for {
		callCtx, callCancel := context.WithTimeout(ctx, 2*time.Second)
		err := fn(callCtx)
		callCancel()
		var perm permanentError
		if err == nil || errors.As(err, &perm) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// permanentError stops poll early: retrying cannot help.
type permanentError struct{ error }

func (e permanentError) Unwrap() error { return e.error }

func permanent(err error) error { return permanentError{err} }

// logTail prints the end of containerd's log, the first place to look when a CRI call or
// a CNI plugin fails.
func (n *node) logTail(t *testing.T, lines int) {
	t.Helper()
	b, err := os.ReadFile(n.logPath)
	if err != nil {
		t.Logf("containerd log: %v", err)
		return
	}
	all := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	t.Logf("last %d lines of %s:\n%s", len(all), n.logPath, strings.Join(all, "\n"))
}

// pod is one running pod sandbox.
type pod struct {
	name string
	id   string
	ip   string
	// additional are the pod's other addresses as PodSandboxStatus reports them (the
	// IPv6 one of a dual-stack pod), which containerd takes from the CNI result.
	additional []string
	config     *runtimeapi.PodSandboxConfig
}

// runPod starts a pod sandbox (which runs the CNI ADD) and reads its IP back from the
// runtime, as the kubelet would.
func (n *node) runPod(ctx context.Context, name string, ports []*runtimeapi.PortMapping) (*pod, error) {
	cfg := n.sandboxConfig(name, ports, runtimeapi.NamespaceMode_POD)
	callCtx, cancel := context.WithTimeout(ctx, criTimeout)
	defer cancel()
	resp, err := n.rt.RunPodSandbox(callCtx, &runtimeapi.RunPodSandboxRequest{Config: cfg})
	if err != nil {
		return nil, fmt.Errorf("RunPodSandbox %s: %w", name, err)
	}
	p := &pod{name: name, id: resp.GetPodSandboxId(), config: cfg}
	n.mu.Lock()
	n.sandboxes = append(n.sandboxes, p.id)
	n.mu.Unlock()
	n.recordShims()
	st, err := n.rt.PodSandboxStatus(callCtx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: p.id})
	if err != nil {
		return p, fmt.Errorf("PodSandboxStatus %s: %w", name, err)
	}
	if s := st.GetStatus().GetState(); s != runtimeapi.PodSandboxState_SANDBOX_READY {
		return p, fmt.Errorf("pod %s is %s, want SANDBOX_READY", name, s)
	}
	p.ip = st.GetStatus().GetNetwork().GetIp()
	for _, a := range st.GetStatus().GetNetwork().GetAdditionalIps() {
		p.additional = append(p.additional, a.GetIp())
	}
	return p, nil
}

// sandboxConfig is a pod's sandbox config; network NODE is a host-network pod (no CNI).
func (n *node) sandboxConfig(name string, ports []*runtimeapi.PortMapping, network runtimeapi.NamespaceMode) *runtimeapi.PodSandboxConfig {
	return &runtimeapi.PodSandboxConfig{
		Metadata: &runtimeapi.PodSandboxMetadata{
			Name:      name,
			Namespace: podNamespace,
			Uid:       fmt.Sprintf("%s-%s", filepath.Base(n.dir), name),
		},
		Hostname:     name,
		LogDirectory: filepath.Join(n.dir, "logs", name),
		PortMappings: ports,
		Linux: &runtimeapi.LinuxPodSandboxConfig{
			CgroupParent: n.cgroupParent,
			SecurityContext: &runtimeapi.LinuxSandboxSecurityContext{
				NamespaceOptions: &runtimeapi.NamespaceOption{
					Network: network,
					Pid:     runtimeapi.NamespaceMode_POD,
					Ipc:     runtimeapi.NamespaceMode_POD,
				},
			},
		},
	}
}

// startContainer runs cmd in a new container of pod p, from the same busybox image.
func (n *node) startContainer(ctx context.Context, p *pod, name string, cmd ...string) (string, error) {
	callCtx, cancel := context.WithTimeout(ctx, criTimeout)
	defer cancel()
	created, err := n.rt.CreateContainer(callCtx, &runtimeapi.CreateContainerRequest{
		PodSandboxId: p.id,
		Config: &runtimeapi.ContainerConfig{
			Metadata: &runtimeapi.ContainerMetadata{Name: name},
			Image:    &runtimeapi.ImageSpec{Image: imageName},
			Command:  cmd,
			LogPath:  name + ".log",
			Linux: &runtimeapi.LinuxContainerConfig{
				SecurityContext: &runtimeapi.LinuxContainerSecurityContext{
					NamespaceOptions: p.config.GetLinux().GetSecurityContext().GetNamespaceOptions(),
				},
			},
		},
		SandboxConfig: p.config,
	})
	if err != nil {
		return "", fmt.Errorf("CreateContainer %s in %s: %w", name, p.name, err)
	}
	id := created.GetContainerId()
	if _, err := n.rt.StartContainer(callCtx, &runtimeapi.StartContainerRequest{ContainerId: id}); err != nil {
		return id, fmt.Errorf("StartContainer %s in %s: %w", name, p.name, err)
	}
	return id, nil
}

// execSync runs cmd in a container and returns its stdout; a non-zero exit is an error
// carrying stderr.
func (n *node) execSync(ctx context.Context, containerID string, timeout time.Duration, cmd ...string) (string, error) {
	callCtx, cancel := context.WithTimeout(ctx, timeout+criTimeout)
	defer cancel()
	resp, err := n.rt.ExecSync(callCtx, &runtimeapi.ExecSyncRequest{
		ContainerId: containerID,
		Cmd:         cmd,
		Timeout:     int64(timeout / time.Second),
	})
	if err != nil {
		return "", fmt.Errorf("ExecSync %q: %w", cmd, err)
	}
	if resp.GetExitCode() != 0 {
		return string(resp.GetStdout()), fmt.Errorf("ExecSync %q: exit code %d: %s", cmd, resp.GetExitCode(), bytes.TrimSpace(resp.GetStderr()))
	}
	return string(resp.GetStdout()), nil
}

// recordShims remembers the runtime's shims while they run: once they exit their command
// line is gone, and sweep needs their PIDs to wait for init to reap them.
func (n *node) recordShims() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.shims == nil {
		n.shims = map[int]bool{}
	}
	for _, pid := range pidsReferencing(n.dir) {
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if strings.HasPrefix(string(comm), "containerd-shim") {
			n.shims[pid] = true
		}
	}
}

// removePod stops the pod (CNI DEL) and removes it with its containers.
func (n *node) removePod(ctx context.Context, id string) error {
	callCtx, cancel := context.WithTimeout(ctx, criTimeout)
	defer cancel()
	for attempt := 1; ; attempt++ {
		_, err := n.rt.StopPodSandbox(callCtx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: id})
		// containerd bounds its wait for the sandbox's process to exit by its own deadline
		// and answers DeadlineExceeded when a loaded machine misses it (the network was
		// torn down or not yet): the kubelet calls StopPodSandbox again, and so do we.
		if err != nil && status.Code(err) == codes.DeadlineExceeded && callCtx.Err() == nil && attempt < 3 {
			continue
		}
		if err != nil {
			return fmt.Errorf("StopPodSandbox %s (attempt %d): %w", id, attempt, err)
		}
		break
	}
	if _, err := n.rt.RemovePodSandbox(callCtx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: id}); err != nil {
		return fmt.Errorf("RemovePodSandbox %s: %w", id, err)
	}
	return nil
}

// removeAllPods removes every pod the runtime still knows, so a failed test still gives
// the plugin its DELs before the namespace goes away.
func (n *node) removeAllPods() error {
	// One bound for the whole pass: cleanup must not hang on a wedged runtime.
	ctx, cancel := context.WithTimeout(context.Background(), 2*criTimeout)
	defer cancel()
	resp, err := n.rt.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{})
	if err != nil {
		return fmt.Errorf("ListPodSandbox: %w", err)
	}
	var errs []error
	for _, s := range resp.GetItems() {
		errs = append(errs, n.removePod(ctx, s.GetId()))
	}
	return errors.Join(errs...)
}

// sweep makes sure nothing the runtime started outlives the test: processes in the pod
// cgroups or naming the temp dir (shims survive containerd being killed), mounts below the
// temp dir (rootfs overlays, /dev/shm tmpfs, pod netns bind mounts), cgroups, shim sockets
// and finally the temp dir itself. It runs after the node namespace is gone.
func (n *node) sweep(removeRunContainerd bool) error {
	var errs []error
	pids := cgroup.Pids(n.cgroupParent)
	pids = append(pids, pidsReferencing(n.dir)...)
	slices.Sort(pids)
	pids = slices.Compact(pids)
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	// Killed processes hold their mounts and cgroups until they exit.
	deadline := time.Now().Add(5 * time.Second)
	for _, pid := range pids {
		for processExists(pid) && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if processExists(pid) {
			errs = append(errs, fmt.Errorf("process %d survived SIGKILL", pid))
		}
	}
	// Shims are daemons: init reaps them, lazily. Wait a little so the test does not end
	// with <defunct> shims in the process list; a zombie left after that is init's, and
	// harmless.
	n.mu.Lock()
	shims := slices.Collect(maps.Keys(n.shims))
	n.mu.Unlock()
	deadline = time.Now().Add(3 * time.Second)
	for _, pid := range append(shims, pids...) {
		for time.Now().Before(deadline) {
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if err := unmountBelow(n.dir); err != nil {
		errs = append(errs, err)
	}
	if err := cgroup.Remove(n.cgroupParent); err != nil {
		errs = append(errs, err)
	}
	n.mu.Lock()
	for _, id := range n.sandboxes {
		if err := os.Remove(shimSocket(n.sock, id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	n.mu.Unlock()
	if removeRunContainerd {
		// Only when this test created them, and only if empty: another runtime may use it.
		_ = os.Remove(shimSocketDir)
		_ = os.Remove(filepath.Dir(shimSocketDir))
	}
	if err := os.RemoveAll(n.dir); err != nil {
		errs = append(errs, fmt.Errorf("remove %s: %w", n.dir, err))
	}
	if left := pidsReferencing(n.dir); len(left) > 0 {
		errs = append(errs, fmt.Errorf("processes still referencing %s: %v", n.dir, left))
	}
	return errors.Join(errs...)
}

// shimSocket is the socket path containerd 1.6's runc shim serves on for sandbox id: a
// hash of containerd's address, the namespace and the ID, below /run/containerd/s.
func shimSocket(containerdAddr, id string) string {
	sum := sha256.Sum256([]byte(filepath.Join(containerdAddr, "k8s.io", id)))
	return filepath.Join(shimSocketDir, fmt.Sprintf("%x", sum))
}

// pidsReferencing lists processes whose command line, working directory or executable
// names something below dir (shims carry the containerd address and run in the bundle).
func pidsReferencing(dir string) []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	self := os.Getpid()
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		cwd, _ := os.Readlink(filepath.Join("/proc", e.Name(), "cwd"))
		exe, _ := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		if bytes.Contains(cmdline, []byte(dir)) || strings.HasPrefix(cwd, dir) || strings.HasPrefix(exe, dir) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func processExists(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// A zombie has released its mounts and cgroup; only its parent can reap it.
	_, rest, _ := strings.Cut(string(b), ") ")
	return !strings.HasPrefix(rest, "Z")
}

// mountsBelow lists mount points below dir, deepest (and most recently stacked) first.
func mountsBelow(dir string) ([]mount, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var ms []mount
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID parent major:minor root mountpoint options ... - fstype source superoptions
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		if mp != dir && !strings.HasPrefix(mp, dir+"/") {
			continue
		}
		m := mount{point: mp}
		if i := slices.Index(fields, "-"); i > 0 && i+1 < len(fields) {
			m.fstype = fields[i+1]
		}
		ms = append(ms, m)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	slices.Reverse(ms)
	slices.SortStableFunc(ms, func(a, b mount) int { return len(b.point) - len(a.point) })
	return ms, nil
}

type mount struct {
	point  string
	fstype string
}

// unmountBelow detaches every mount below dir; lazy unmounts cannot fail on a busy mount,
// and nothing should be using them any more.
func unmountBelow(dir string) error {
	for range 10 {
		ms, err := mountsBelow(dir)
		if err != nil {
			return err
		}
		if len(ms) == 0 {
			return nil
		}
		for _, m := range ms {
			_ = syscall.Unmount(m.point, syscall.MNT_DETACH)
		}
	}
	ms, _ := mountsBelow(dir)
	return fmt.Errorf("mounts left below %s: %v", dir, ms)
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space and so on).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Package k8s runs a real Kubernetes cluster in the lab's network namespaces: etcd,
// kube-apiserver, kube-controller-manager and kube-scheduler on the first node, and on
// every node its own containerd, kubelet and kube-proxy (iptables mode), each node in its
// network namespace and a private mount namespace. netagent then comes in the way a user
// installs it: its image imported into every node's containerd and the DaemonSet applied
// with kubectl.
//
// The binaries are real: Kubernetes as scripts/k8s-build.sh builds it from the Go module
// proxy, Debian's containerd and runc, the project's own etcd. Nothing is pulled: the
// images (netagent, a busybox workload, a busybox "pause") are OCI archives written here.
//
// Scale: every node costs a containerd, a kubelet and a kube-proxy; a lab of three or four
// nodes fits a 2-core machine.
package k8s

import (
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/template"
	"time"

	"github.com/netagent/netagent/pkg/lab/cgroup"
)

//go:embed node.sh
var nodeScript string

// Options describe a cluster.
type Options struct {
	Dir      string // cluster state: certificates, images, logs, per-node roots
	KubeBin  string // kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl
	Etcd     string // netagent-etcd, the API server's store (on a unix socket)
	Loopback string // the loopback CNI plugin containerd calls for every pod
	// NetagentImage is the netagent image archive (see BuildNetagentImage).
	NetagentImage string
	// Prefix names the per-node cgroups (PREFIXNODE in every hierarchy).
	Prefix string
	// ClusterCIDR is the controller-manager's --cluster-cidr and ServiceCIDR the service
	// range: one CIDR, or an IPv4,IPv6 pair for a dual-stack cluster (whose nodes then
	// need IP6 too).
	ClusterCIDR string
	ServiceCIDR string
	Log         func(format string, args ...any)
}

// Node is one machine of the cluster: a network namespace with its underlay address.
type Node struct {
	Name string     `json:"name"`
	NS   string     `json:"ns"` // network namespace name (/run/netns/NS)
	IP   netip.Addr `json:"ip"`
	IP6  netip.Addr `json:"ip6,omitzero"` // its IPv6 underlay address (dual-stack clusters)
	Dir  string     `json:"dir"`
	// Pid is the node's supervisor (the shell holding its mount namespace).
	Pid int `json:"pid"`
}

// Cluster is a running cluster; its JSON form is part of the lab's state.
type Cluster struct {
	Dir         string  `json:"dir"`
	KubeBin     string  `json:"kubeBin"`
	Prefix      string  `json:"prefix"`
	Nodes       []*Node `json:"nodes"`
	ControlPids []int   `json:"controlPids"`
	Kubeconfig  string  `json:"kubeconfig"` // admin
	// What a node that joins later needs (AddNode).
	Server      string   `json:"server"`
	Loopback    string   `json:"loopback"`
	ClusterCIDR string   `json:"clusterCIDR"`
	Images      []string `json:"images"`
}

// Images the cluster imports into every node.
const (
	NetagentImageName = "ghcr.io/netagent/netagent:0.1.0" // as manifests/ name it
	BusyboxImageName  = "lab.local/busybox:1"
	PauseImageName    = "registry.k8s.io/pause:3.10" // busybox sleeping, under the name clusters have
	serviceIP         = "10.96.0.1"
)

// Up starts the control plane on nodes[0] and a kubelet on every node, and waits until
// every node has registered (they stay NotReady until a network writes its CNI config).
func Up(ctx context.Context, opt Options, nodes []*Node) (c *Cluster, err error) {
	if len(nodes) == 0 {
		return nil, errors.New("a cluster needs a node")
	}
	if opt.ClusterCIDR == "" {
		opt.ClusterCIDR = "10.244.0.0/16"
	}
	if opt.ServiceCIDR == "" {
		opt.ServiceCIDR = "10.96.0.0/16"
	}
	logf := opt.Log
	if logf == nil {
		logf = func(string, ...any) {}
	}
	c = &Cluster{Dir: opt.Dir, KubeBin: opt.KubeBin, Prefix: opt.Prefix, Nodes: nodes, Loopback: opt.Loopback, ClusterCIDR: opt.ClusterCIDR}
	defer func() {
		if err != nil {
			_ = c.Down()
		}
	}()
	for _, b := range []string{"kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubectl"} {
		if _, err := os.Stat(filepath.Join(opt.KubeBin, b)); err != nil {
			return c, fmt.Errorf("kubernetes binaries: %w (build them with scripts/k8s-build.sh)", err)
		}
	}
	t0 := time.Now()
	p, err := newPKI(filepath.Join(opt.Dir, "pki"))
	if err != nil {
		return c, err
	}
	server := "https://" + nodes[0].IP.String() + ":6443"
	c.Server = server
	apiIPs := []net.IP{net.ParseIP(nodes[0].IP.String()), net.ParseIP(serviceIP), net.ParseIP("127.0.0.1")}
	if err := p.issue("apiserver", "kube-apiserver", nil, apiIPs,
		[]string{"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}); err != nil {
		return c, err
	}
	for _, u := range []struct{ name, cn, org string }{
		{"admin", "lab-admin", "system:masters"},
		{"apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters"},
		{"controller-manager", "system:kube-controller-manager", ""},
		{"scheduler", "system:kube-scheduler", ""},
		{"kube-proxy", "system:kube-proxy", ""},
	} {
		var orgs []string
		if u.org != "" {
			orgs = []string{u.org}
		}
		if err := p.issue(u.name, u.cn, orgs, nil, nil); err != nil {
			return c, err
		}
		if _, err := p.kubeconfig(u.name, server); err != nil {
			return c, err
		}
	}
	if err := p.serviceAccountKey(); err != nil {
		return c, err
	}
	c.Kubeconfig = p.path("admin.kubeconfig")
	images, err := writeBaseImages(filepath.Join(opt.Dir, "images"))
	if err != nil {
		return c, err
	}
	c.Images = append(images, opt.NetagentImage)
	logf("kubernetes: certificates and images (%s)", time.Since(t0).Round(time.Millisecond))

	t0 = time.Now()
	if err := c.startControlPlane(ctx, opt, p, nodes[0]); err != nil {
		return c, err
	}
	logf("kubernetes: etcd, kube-apiserver at %s, controller-manager, scheduler on %s (%s)", server, nodes[0].Name, time.Since(t0).Round(time.Millisecond))

	t0 = time.Now()
	for _, n := range nodes {
		if err := c.startNode(ctx, p, n); err != nil {
			return c, err
		}
	}
	if err := c.waitNodes(ctx, 2*time.Minute); err != nil {
		return c, err
	}
	logf("kubernetes: %d nodes registered (containerd, kubelet, kube-proxy each) (%s)", len(nodes), time.Since(t0).Round(time.Millisecond))
	return c, nil
}

func writeBaseImages(dir string) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	root := filepath.Join(dir, "busybox-root")
	if err := BusyboxRoot(root); err != nil {
		return nil, err
	}
	env := []string{"PATH=/bin"}
	imgs := []Image{
		{Name: BusyboxImageName, Root: root, Cmd: []string{"sh"}, Env: env},
		// PID 1 in a pid namespace ignores SIGTERM unless it handles it; SIGKILL keeps
		// the sandbox's stop from waiting out a grace period.
		{Name: PauseImageName, Root: root, Entrypoint: []string{"/bin/sleep", "2147483647"}, Env: env, StopSignal: "SIGKILL"},
	}
	var paths []string
	for i, img := range imgs {
		path := filepath.Join(dir, fmt.Sprintf("image%d.tar", i))
		if err := WriteArchive(path, img); err != nil {
			return nil, err
		}
		paths = append(paths, path)
	}
	return paths, nil
}

// BusyboxRoot lays out Debian's static busybox with a link per applet.
func BusyboxRoot(root string) error {
	const busybox = "/bin/busybox"
	out, err := exec.Command(busybox, "--list").Output()
	if err != nil {
		return fmt.Errorf("busybox --list: %w", err)
	}
	_ = os.RemoveAll(root)
	for _, d := range []string{"bin", "dev", "etc", "proc", "sys", "root", "var", "tmp"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return err
		}
	}
	if err := os.Chmod(filepath.Join(root, "tmp"), 0o777|os.ModeSticky); err != nil {
		return err
	}
	bin, err := os.ReadFile(busybox)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(root, "bin/busybox"), bin, 0o755); err != nil {
		return err
	}
	for _, a := range strings.Fields(string(out)) {
		if a == "busybox" || strings.Contains(a, "/") {
			continue
		}
		if err := os.Symlink("busybox", filepath.Join(root, "bin", a)); err != nil {
			return err
		}
	}
	for name, data := range map[string]string{"etc/passwd": "root:x:0:0:root:/root:/bin/sh\n", "etc/group": "root:x:0:\n"} {
		if err := os.WriteFile(filepath.Join(root, name), []byte(data), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// BuildNetagentImage assembles the netagent image with scripts/image-rootfs.sh (the
// Dockerfile's assembly step) and writes it as an archive named like the manifests' image.
func BuildNetagentImage(ctx context.Context, script, netagent, cni, dir string) (string, error) {
	root := filepath.Join(dir, "netagent-root")
	cmd := exec.CommandContext(ctx, "bash", script, root, netagent, cni)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("%s: %w: %s", script, err, bytes.TrimSpace(out))
	}
	path := filepath.Join(dir, "netagent-image.tar")
	err := WriteArchive(path, Image{
		Name: NetagentImageName, Root: root, Entrypoint: []string{"/usr/local/bin/netagent"},
		Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
	})
	return path, err
}

func (c *Cluster) startControlPlane(ctx context.Context, opt Options, p *pki, n *Node) error {
	dir := filepath.Join(c.Dir, "control-plane")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	etcdDir := filepath.Join(dir, "etcd")
	pid, err := startIn(n.NS, filepath.Join(dir, "etcd.log"), opt.Etcd, "--data-dir", etcdDir)
	if err != nil {
		return err
	}
	c.ControlPids = append(c.ControlPids, pid)
	sock := filepath.Join(etcdDir, "etcd.sock:2379")
	if err := waitFor(ctx, 30*time.Second, func() bool { _, err := os.Stat(sock); return err == nil }); err != nil {
		return fmt.Errorf("etcd did not come up: see %s", filepath.Join(dir, "etcd.log"))
	}
	ip := n.IP.String()
	pid, err = startIn(n.NS, filepath.Join(dir, "kube-apiserver.log"), filepath.Join(c.KubeBin, "kube-apiserver"),
		"--etcd-servers=unix://"+sock,
		"--advertise-address="+ip, "--bind-address="+ip, "--secure-port=6443",
		"--service-cluster-ip-range="+opt.ServiceCIDR,
		"--client-ca-file="+p.path("ca.crt"),
		"--tls-cert-file="+p.path("apiserver.crt"), "--tls-private-key-file="+p.path("apiserver.key"),
		"--kubelet-client-certificate="+p.path("apiserver-kubelet-client.crt"),
		"--kubelet-client-key="+p.path("apiserver-kubelet-client.key"),
		// There is no DNS for node names.
		"--kubelet-preferred-address-types=InternalIP",
		"--service-account-key-file="+p.path("sa.pub"),
		"--service-account-signing-key-file="+p.path("sa.key"),
		"--service-account-issuer=https://kubernetes.default.svc",
		"--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
		"--allow-privileged=true")
	if err != nil {
		return err
	}
	c.ControlPids = append(c.ControlPids, pid)
	if err := waitFor(ctx, 3*time.Minute, func() bool {
		out, err := c.Kubectl(ctx, "get", "--raw", "/readyz")
		return err == nil && strings.TrimSpace(out) == "ok"
	}); err != nil {
		return fmt.Errorf("kube-apiserver not ready: see %s", filepath.Join(dir, "kube-apiserver.log"))
	}
	cm := p.path("controller-manager.kubeconfig")
	pid, err = startIn(n.NS, filepath.Join(dir, "kube-controller-manager.log"), filepath.Join(c.KubeBin, "kube-controller-manager"),
		"--kubeconfig="+cm, "--authentication-kubeconfig="+cm, "--authorization-kubeconfig="+cm,
		"--leader-elect=false", "--bind-address=127.0.0.1",
		"--allocate-node-cidrs=true", "--cluster-cidr="+opt.ClusterCIDR, nodeMaskFlag(opt.ClusterCIDR),
		"--service-cluster-ip-range="+opt.ServiceCIDR,
		"--cluster-signing-cert-file="+p.path("ca.crt"), "--cluster-signing-key-file="+p.path("ca.key"),
		"--root-ca-file="+p.path("ca.crt"), "--service-account-private-key-file="+p.path("sa.key"),
		"--use-service-account-credentials=true")
	if err != nil {
		return err
	}
	c.ControlPids = append(c.ControlPids, pid)
	sc := p.path("scheduler.kubeconfig")
	pid, err = startIn(n.NS, filepath.Join(dir, "kube-scheduler.log"), filepath.Join(c.KubeBin, "kube-scheduler"),
		"--kubeconfig="+sc, "--authentication-kubeconfig="+sc, "--authorization-kubeconfig="+sc,
		"--leader-elect=false", "--bind-address=127.0.0.1")
	if err != nil {
		return err
	}
	c.ControlPids = append(c.ControlPids, pid)
	return nil
}

// nodeMaskFlag is the controller-manager's node CIDR size for clusterCIDR: /24 for IPv4,
// /64 for IPv6 (a dual-stack pair takes one flag per family).
func nodeMaskFlag(clusterCIDR string) string {
	switch {
	case strings.Contains(clusterCIDR, ","):
		return "--node-cidr-mask-size-ipv6=64" // IPv4's default is /24
	case strings.Contains(clusterCIDR, ":"):
		return "--node-cidr-mask-size=64"
	}
	return "--node-cidr-mask-size=24"
}

// nodeIPs is the kubelet's --node-ip: the node's addresses, IPv4 first.
func (n *Node) nodeIPs() string {
	if n.IP6.IsValid() {
		return n.IP.String() + "," + n.IP6.String()
	}
	return n.IP.String()
}

func (c *Cluster) cgroupRoot(n *Node) string { return c.Prefix + n.Name }

// AddNode joins another node to the running cluster (its network namespace and underlay
// set up by the caller): its own certificate, containerd, kubelet and kube-proxy, as Up
// starts them. aliases are further names of the netagent image on the node (the running
// DaemonSet's, after an upgrade re-tagged it), there before the kubelet starts. It returns
// once the node has registered.
func (c *Cluster) AddNode(ctx context.Context, n *Node, aliases ...string) error {
	p, err := loadPKI(filepath.Join(c.Dir, "pki"))
	if err != nil {
		return err
	}
	if err := c.startNode(ctx, p, n, aliases...); err != nil {
		return err
	}
	c.Nodes = append(c.Nodes, n)
	return c.waitNodes(ctx, 2*time.Minute)
}

// RestartKubelet kills a node's kubelet; node.sh starts it again a second later, as a
// service manager would. A kubelet whose Node object was deleted registers it again only
// when it starts.
func (c *Cluster) RestartKubelet(n *Node) error {
	b, err := os.ReadFile(filepath.Join(n.Dir, "kubelet.pid"))
	if err != nil {
		return err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return fmt.Errorf("%s: kubelet.pid: %w", n.Name, err)
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		return fmt.Errorf("%s: stop kubelet %d: %w", n.Name, pid, err)
	}
	return nil
}

func (c *Cluster) startNode(ctx context.Context, p *pki, n *Node, aliases ...string) error {
	if err := os.MkdirAll(n.Dir, 0o755); err != nil {
		return err
	}
	if err := p.issue("kubelet-"+n.Name, "system:node:"+n.Name, []string{"system:nodes"}, nil, nil); err != nil {
		return err
	}
	if _, err := p.kubeconfig("kubelet-"+n.Name, c.Server); err != nil {
		return err
	}
	// A node forwards (kubeadm's preflight insists on it); the DaemonSet's agent runs
	// without write access to /proc/sys, so the node is set up with it, as a real one is.
	if out, err := exec.CommandContext(ctx, "nsenter", "--net=/run/netns/"+n.NS, "sysctl", "-qw", "net.ipv4.ip_forward=1").CombinedOutput(); err != nil {
		return fmt.Errorf("%s: ip_forward: %w: %s", n.Name, err, out)
	}
	sock := filepath.Join(n.Dir, "containerd.sock")
	files := map[string]string{
		"containerd.toml": fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q
[plugins."io.containerd.internal.v1.opt"]
  path = %[5]q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[6]q
  # root here lacks CAP_SYS_RESOURCE, so it cannot lower oom_score_adj.
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = %[7]q
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
`, filepath.Join(n.Dir, "containerd/root"), filepath.Join(n.Dir, "containerd/state"), sock,
			filepath.Join(n.Dir, "containerd.ttrpc"), filepath.Join(n.Dir, "containerd/opt"), PauseImageName,
			filepath.Join(n.Dir, "runc")),
		"kubelet.yaml": fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
failSwapOn: false
cgroupDriver: cgroupfs
cgroupsPerQOS: true
cgroupRoot: /%[1]s
enforceNodeAllocatable: [pods]
containerRuntimeEndpoint: unix://%[2]s
address: %[3]s
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: %[4]s}
authorization: {mode: Webhook}
clusterDomain: cluster.local
evictionHard: {memory.available: "100Mi", nodefs.available: "1%%", imagefs.available: "1%%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
localStorageCapacityIsolation: false
resolvConf: ""
serializeImagePulls: false
`, c.cgroupRoot(n), sock, n.IP, p.path("ca.crt")),
		// conntrack zeroed: kube-proxy leaves the machine's global conntrack sysctls alone.
		"kube-proxy.yaml": fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: %[1]s}
mode: iptables
clusterCIDR: %[2]s
hostnameOverride: %[3]s
bindAddress: %[4]s
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
`, p.path("kube-proxy.kubeconfig"), c.ClusterCIDR, n.Name, n.IP),
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(n.Dir, name), []byte(data), 0o644); err != nil {
			return err
		}
	}
	kc, err := os.ReadFile(p.path("kubelet-" + n.Name + ".kubeconfig"))
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(n.Dir, "kubelet.kubeconfig"), kc, 0o600); err != nil {
		return err
	}
	var script bytes.Buffer
	err = template.Must(template.New("node").Parse(nodeScript)).Execute(&script, map[string]any{
		"Name": n.Name, "IP": n.nodeIPs(), "Dir": n.Dir, "KubeBin": c.KubeBin, "Loopback": c.Loopback,
		"Images": c.Images, "Netagent": NetagentImageName, "Aliases": aliases, "Snapshotter": "overlayfs", "CgroupRoot": c.cgroupRoot(n),
	})
	if err != nil {
		return err
	}
	scriptPath := filepath.Join(n.Dir, "node.sh")
	if err := os.WriteFile(scriptPath, script.Bytes(), 0o755); err != nil {
		return err
	}
	// nsenter --net, not `ip netns exec`, which remounts /sys and hides the cgroup mounts.
	pid, err := StartDetached(exec.Command("nsenter", "--net=/run/netns/"+n.NS, "unshare", "-m", "--propagation", "private",
		"bash", scriptPath), filepath.Join(n.Dir, "node.log"))
	if err != nil {
		return err
	}
	n.Pid = pid
	return nil
}

// waitNodes waits until every node is registered with the API server.
func (c *Cluster) waitNodes(ctx context.Context, timeout time.Duration) error {
	var missing []string
	var dead error
	err := waitFor(ctx, timeout, func() bool {
		for _, n := range c.Nodes {
			// A node whose script failed holds nothing up: say so at once.
			if syscall.Kill(n.Pid, 0) != nil || processZombie(n.Pid) {
				dead = fmt.Errorf("node %s: its set-up script exited: %s", n.Name, TailFile(filepath.Join(n.Dir, "node.log"), 5))
				return true
			}
		}
		out, err := c.Kubectl(ctx, "get", "nodes", "-o", "jsonpath={.items[*].metadata.name}")
		if err != nil {
			return false
		}
		have := map[string]bool{}
		for _, f := range strings.Fields(out) {
			have[f] = true
		}
		missing = missing[:0]
		for _, n := range c.Nodes {
			if !have[n.Name] {
				missing = append(missing, n.Name)
			}
		}
		return len(missing) == 0
	})
	if dead != nil {
		return dead
	}
	if err != nil {
		var logs []string
		for _, name := range missing {
			logs = append(logs, name)
		}
		return fmt.Errorf("nodes %v did not register (see %s)", missing, strings.Join(logs, ", "))
	}
	return nil
}

// WebManifest is a test workload: a Deployment of busybox pods spread over the nodes, each
// serving its name over HTTP on 8080 (with hostPort, also on the node's address), behind a
// NodePort Service (30080).
func WebManifest(replicas, hostPort int) string {
	port := "{containerPort: 8080}"
	if hostPort > 0 {
		port = fmt.Sprintf("{containerPort: 8080, hostPort: %d}", hostPort)
	}
	return fmt.Sprintf(`apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: %d
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {matchLabels: {app: web}}}
      containers:
      - name: web
        image: %s
        imagePullPolicy: Never
        command: ["sh", "-c", "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"]
        ports: [%s]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
`, replicas, BusyboxImageName, port)
}

// Kubectl runs the cluster's kubectl as the admin from the first node's namespace (the API
// server listens on the underlay there).
func (c *Cluster) Kubectl(ctx context.Context, args ...string) (string, error) {
	cmd := c.KubectlCmd(ctx, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return stdout.String(), nil
}

// KubectlCmd is the command Kubectl runs, for callers that wire its standard streams.
func (c *Cluster) KubectlCmd(ctx context.Context, args ...string) *exec.Cmd {
	full := append([]string{"--net=/run/netns/" + c.Nodes[0].NS, filepath.Join(c.KubeBin, "kubectl"), "--kubeconfig", c.Kubeconfig}, args...)
	return exec.CommandContext(ctx, "nsenter", full...)
}

// Ctr runs containerd's ctr against a node's containerd, in the CRI's namespace.
func (c *Cluster) Ctr(ctx context.Context, n *Node, args ...string) (string, error) {
	full := append([]string{"--address", filepath.Join(n.Dir, "containerd.sock"), "--namespace", "k8s.io"}, args...)
	out, err := exec.CommandContext(ctx, "ctr", full...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// HostPath is where a node's private mount namespace has path (one of the per-node folders
// node.sh binds: /etc/cni/net.d, /opt/cni/bin, /run/netagent, /var/lib/cni, ...).
func HostPath(n *Node, path string) string {
	return filepath.Join(n.Dir, "root", strings.ReplaceAll(strings.Trim(path, "/"), "/", "-"))
}

// Down stops every process of the cluster (containers included: they are found through the
// nodes' cgroups, since their network namespaces are not named) and removes the nodes'
// cgroups. It is safe to call more than once.
func (c *Cluster) Down() error {
	var errs []error
	for _, n := range c.Nodes {
		if n.Pid > 0 {
			_ = syscall.Kill(n.Pid, syscall.SIGKILL)
		}
		killNetns(n.NS)
	}
	for _, pid := range c.ControlPids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	// Containers (pod sandboxes and their processes) live in the nodes' cgroups.
	for range 50 {
		left := 0
		for _, n := range c.Nodes {
			left += killCgroups(c.cgroupRoot(n))
		}
		if left == 0 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, n := range c.Nodes {
		if err := cgroup.Remove(c.cgroupRoot(n)); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// killNetns kills every process in the named network namespace (shims, hostNetwork pods,
// the node's daemons).
func killNetns(ns string) {
	out, err := exec.Command("ip", "netns", "pids", ns).Output()
	if err != nil {
		return
	}
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// killCgroups sends SIGKILL to every task below name and returns how many it found.
func killCgroups(name string) int {
	pids := cgroup.Pids(name)
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	return len(pids)
}

// startIn starts a long-running process in a network namespace, detached from the caller
// (the lab command exits while the cluster keeps running).
func startIn(ns, logPath, bin string, args ...string) (int, error) {
	return StartDetached(exec.Command("nsenter", append([]string{"--net=/run/netns/" + ns, bin}, args...)...), logPath)
}

// StartDetached starts cmd in its own session with output appended to logPath, so it
// outlives the starting process (a lab keeps running after `netagent lab up` returns).
func StartDetached(cmd *exec.Cmd, logPath string) (int, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	pid := cmd.Process.Pid
	go func() { _ = cmd.Wait() }()
	return pid, nil
}

// processZombie reports whether pid has exited but not been reaped (a detached child
// whose Wait has not run yet).
func processZombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || i+2 >= len(b) || b[i+2] == 'Z'
}

// TailFile returns the last n lines of a log file (empty when it cannot be read).
func TailFile(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func waitFor(ctx context.Context, timeout time.Duration, ok func() bool) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		if ok() {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

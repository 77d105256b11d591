package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/klog/v2"

	"github.com/netagent/netagent/pkg/agent"
	"github.com/netagent/netagent/pkg/kube"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/pkg/subnetfile"
	"github.com/netagent/netagent/pkg/wireguard/device"
)

// runFlags are `netagent run`'s flags (a separate type so a test can parse the
// DaemonSet's arguments with the real parser).
type runFlags struct {
	etcd         etcdFlags
	node         string
	iface        string
	publicIP     string
	subnetFile   string
	cniConfDir   string
	cniBridge    string
	cniDataDir   string
	podIface     string // --pod-interface
	leaseTTL     time.Duration
	resync       time.Duration
	listen       string
	metrics      string // --metrics-listen
	logLevel     string
	embeddedEtcd string
	pprof        bool
	fwdRepair    bool
	// The Kubernetes subnet manager (--subnet-manager=kube).
	subnetManager string
	kubeconfig    string
	netConf       string
	// The wireguard backend.
	wg agent.WireGuardOptions
}

func newRunFlags() (*flag.FlagSet, *runFlags) {
	fs, f := sharedAgentFlags("run")
	describe(fs, `usage: netagent run [flags]

Run the node agent: lease this node's pod subnet (from etcd, or the Node's podCIDR with
--subnet-manager=kube), keep routes, VXLAN and NAT in line with the other nodes' leases,
and write the subnet file and CNI config that netagent-cni reads.`)
	fs.StringVar(&f.cniConfDir, "cni-conf-dir", "/etc/cni/net.d", "where to write the CNI conflist (empty: do not write one)")
	fs.StringVar(&f.cniBridge, "cni-bridge", "cni0", "bridge name put into the conflist")
	fs.StringVar(&f.cniDataDir, "cni-data-dir", "", "plugin address store put into the conflist (empty: the plugin's default)")
	fs.StringVar(&f.podIface, "pod-interface", "auto", "how the plugin wires pods, put into the conflist: routed (no bridge: host routes over each pod's veth, as Calico; faster, see BENCHMARKS.md), bridge (veths on --cni-bridge), or auto: routed unless the node has bridged pods")
	fs.StringVar(&f.subnetManager, "subnet-manager", "etcd", "where subnets come from: etcd (leases in etcd) or kube (the Node's spec.podCIDR; peers from the Kubernetes API)")
	fs.StringVar(&f.kubeconfig, "kubeconfig", "", "kube: kubeconfig file (empty: the in-cluster service account)")
	fs.StringVar(&f.netConf, "net-conf", "/etc/netagent/net-conf.json", "kube: the network config JSON (a mounted ConfigMap; same schema as netagent config set --file)")
	fs.StringVar(&f.wg.StateDir, "state-dir", "/var/lib/netagent", "wireguard: the node's state directory, holding its WireGuard private key (created on first start, mode 0600)")
	fs.StringVar(&f.wg.Device, "wireguard-device", "", "wireguard: the WireGuard interface's name (default "+plan.DefaultWGDev+")")
	fs.StringVar(&f.wg.Impl, "wireguard-impl", "auto", "wireguard: auto (the kernel's WireGuard where it has one, else userspace), kernel or userspace")
	fs.StringVar(&f.wg.Daemon, "wireguard-daemon", "", "wireguard: the netagent-wireguard binary run for a userspace device (default: next to netagent, else on PATH); "+device.External+": it runs in a container of its own sharing "+device.SocketDir+", the agent never starts it")
	fs.BoolVar(&f.wg.RotateKey, "rotate-wireguard-key", false, "wireguard: replace the node's WireGuard key at start; peers pick up the new public key from the lease")
	group(fs, "Node", "node-name", "iface", "public-ip")
	group(fs, "WireGuard backend", "state-dir", "wireguard-device", "wireguard-impl", "wireguard-daemon", "rotate-wireguard-key")
	group(fs, "CNI files", "subnet-file", "cni-conf-dir", "cni-bridge", "cni-data-dir", "pod-interface")
	group(fs, "Subnet store: etcd", append([]string{"subnet-manager", "lease-ttl", "embedded-etcd"}, etcdFlagNames...)...)
	group(fs, "Subnet store: Kubernetes (--subnet-manager=kube)", "kubeconfig", "net-conf")
	group(fs, "Operation", "resync", "listen", "metrics-listen", "log-level", "pprof")
	return fs, f
}

// sharedAgentFlags are the flags `run` and `route-mode` share.
func sharedAgentFlags(name string) (*flag.FlagSet, *runFlags) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	f := &runFlags{subnetManager: "etcd"}
	host, _ := os.Hostname()
	f.etcd.register(fs)
	fs.StringVar(&f.node, "node-name", host, "this node's name: its identity in the lease store")
	fs.StringVar(&f.iface, "iface", "", "underlay interface peers reach this node on (default: the one holding --public-ip, else the default route's)")
	fs.StringVar(&f.publicIP, "public-ip", "", "address peers reach this node at (default: the first IPv4 address of --iface)")
	fs.StringVar(&f.subnetFile, "subnet-file", subnetfile.DefaultPath, "where to write the subnet file (network, subnet, MTU)")
	fs.DurationVar(&f.leaseTTL, "lease-ttl", 30*time.Second, "subnet lease TTL; the agent renews it continuously")
	fs.DurationVar(&f.resync, "resync", time.Minute, "full resync period (netlink and firewall events trigger repairs at once)")
	fs.StringVar(&f.listen, "listen", "127.0.0.1:9476", "address of /healthz, /readyz, /metrics and /status (empty: off)")
	fs.StringVar(&f.metrics, "metrics-listen", "", "another address serving /metrics alone, for a scraper off the node, e.g. the node's IP:9477 (empty: off)")
	fs.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&f.embeddedEtcd, "embedded-etcd", "", "run a single-member etcd in this process with its data in `DIR` and use it (single machine)")
	fs.BoolVar(&f.fwdRepair, "repair-ip-forward", true, "switch net.ipv4.ip_forward back on when found off (false: only report it)")
	fs.BoolVar(&f.pprof, "pprof", false, "also serve Go profiles at /debug/pprof/ on --listen")
	return fs, f
}

func (f *runFlags) validate() error {
	if f.node == "" {
		return errors.New("--node-name is empty")
	}
	if f.publicIP != "" {
		if a, err := netip.ParseAddr(f.publicIP); err != nil || !a.Is4() {
			return fmt.Errorf("--public-ip %q is not an IPv4 address", f.publicIP)
		}
	}
	if f.metrics != "" {
		if _, _, err := net.SplitHostPort(f.metrics); err != nil {
			return fmt.Errorf("--metrics-listen %q: want HOST:PORT: %w", f.metrics, err)
		}
	}
	switch f.wg.Impl {
	case "", "auto", "kernel", "userspace":
	default:
		return fmt.Errorf("--wireguard-impl %q: want auto, kernel or userspace", f.wg.Impl)
	}
	if f.wg.Device != "" {
		if err := device.ValidName(f.wg.Device); err != nil {
			return fmt.Errorf("--wireguard-device: %w", err)
		}
	}
	if f.leaseTTL < 2*time.Second {
		return fmt.Errorf("--lease-ttl %s is shorter than 2s", f.leaseTTL)
	}
	if f.resync < time.Second {
		return fmt.Errorf("--resync %s is shorter than 1s", f.resync)
	}
	switch f.subnetManager {
	case "etcd":
	case "kube":
		if f.embeddedEtcd != "" {
			return errors.New("--embedded-etcd needs --subnet-manager=etcd")
		}
		if f.netConf == "" {
			return errors.New("--net-conf is empty; --subnet-manager=kube reads the network config from it")
		}
	default:
		return fmt.Errorf("--subnet-manager %q: want etcd or kube", f.subnetManager)
	}
	if f.podIface != "" && f.podIface != "bridge" && f.podIface != "routed" && f.podIface != "auto" { // "": route-mode has no such flag
		return fmt.Errorf("--pod-interface %q: want auto, routed or bridge", f.podIface)
	}
	return nil
}

func cmdRun(ctx context.Context, args []string, stdout io.Writer) error {
	fs, f := newRunFlags()
	if err := parse(fs, args); err != nil {
		return err
	}
	return runAgent(ctx, f, nil)
}

// cmdRouteMode is `netagent run` for bare Docker hosts: the same lease and routing, with
// Docker's bridge on the leased subnet instead of a CNI plugin.
func cmdRouteMode(ctx context.Context, args []string, stdout io.Writer) error {
	fs, f := sharedAgentFlags("route-mode")
	describe(fs, `usage: netagent route-mode [flags]

Run the agent on a bare Docker host: lease a subnet, route it to and from the other hosts,
and make Docker put its containers on it. Pick one way:

  (default)               check that docker0 (--docker-bridge) carries the lease. A host that
                          already runs Docker keeps docker0's subnet when it is free in the
                          cluster network (to pin one first: netagent reserve); otherwise
                          start dockerd with the --bip the agent's error names.
  --write-docker-config   write bip and mtu into daemon.json; ready once dockerd is restarted
                          onto them. Do not also give dockerd --bip or --mtu.
  --docker-network NAME   create a user-defined bridge network on the lease (docker0 keeps
                          its own subnet); recreated if removed.

Containers reach containers on other hosts with their own addresses; only that traffic is
let through, below DOCKER-USER, so Docker's own rules and isolation still apply.`)
	d := &agent.DockerMode{}
	fs.StringVar(&d.ConfigPath, "write-docker-config", "", "write bip and mtu for the leased subnet into this daemon.json `FILE` (then restart dockerd)")
	fs.StringVar(&d.Network, "docker-network", "", "create this user-defined bridge network `NAME` on the leased subnet, through --docker-socket")
	fs.StringVar(&d.Socket, "docker-socket", "/var/run/docker.sock", "Docker Engine API socket")
	fs.StringVar(&d.Bridge, "docker-bridge", "docker0", "Docker's default bridge: it must carry the lease unless --docker-network is used")
	group(fs, "Docker", "write-docker-config", "docker-network", "docker-socket", "docker-bridge")
	group(fs, "Node", "node-name", "iface", "public-ip", "subnet-file")
	group(fs, "Subnet store: etcd", append([]string{"lease-ttl", "embedded-etcd"}, etcdFlagNames...)...)
	group(fs, "Operation", "resync", "listen", "metrics-listen", "log-level", "pprof")
	if err := parse(fs, args); err != nil {
		return err
	}
	if d.ConfigPath != "" && d.Network != "" {
		return errors.New("--write-docker-config and --docker-network are alternatives; pick one")
	}
	return runAgent(ctx, f, d)
}

func runAgent(ctx context.Context, f *runFlags, d *agent.DockerMode) error {
	if err := f.validate(); err != nil {
		return err
	}
	if !f.pprof {
		// No heap profile can be fetched without --pprof, so stop sampling for one: the
		// profiler's bucket table is otherwise touched page by page as cold start
		// allocates (BENCHMARKS.md, scale).
		runtime.MemProfileRate = 0
	}
	var onReady func()
	if os.Getenv("GOGC") == "" {
		// Until ready, collect rarely: start-up allocates memory that it mostly keeps
		// (descriptors, the lease snapshot, the plan), and collecting while it grows costs
		// more in page faults than it frees (BENCHMARKS.md, lifecycle). A soft limit bounds
		// it for huge clusters.
		debug.SetGCPercent(400)
		limit := os.Getenv("GOMEMLIMIT") == ""
		if limit {
			debug.SetMemoryLimit(64 << 20)
		}
		onReady = func() {
			// From then on the agent is idle nearly all the time, so collecting at 1.5x
			// the live heap instead of 2x costs no noticeable CPU and keeps its footprint
			// down (BENCHMARKS.md, scale). GOGC overrides it.
			debug.SetGCPercent(50)
			if limit {
				debug.SetMemoryLimit(math.MaxInt64)
			}
		}
	}
	log, err := newLogger(f.logLevel)
	if err != nil {
		return err
	}
	if f.embeddedEtcd != "" {
		stopEtcd, endpoint, err := startEmbeddedEtcd(ctx, f.embeddedEtcd)
		if err != nil {
			return err
		}
		defer stopEtcd()
		f.etcd.endpoints = endpoint
		log.Info("embedded etcd", "endpoint", endpoint)
	}
	metrics := agent.NewMetrics()
	var store lease.Store
	switch f.subnetManager {
	case "kube":
		nodes, err := kubeNodes(f.kubeconfig, f.node)
		if err != nil {
			return err
		}
		klog.SetSlogLogger(log) // client-go's own messages go to the same log
		store = kube.New(nodes, f.node, f.netConf, log)
	default:
		cli, err := f.etcd.client()
		if err != nil {
			return err
		}
		defer cli.Close()
		store = f.etcd.store(cli, f.leaseTTL, log)
		metrics.LeaseTTL.Set(f.leaseTTL.Seconds())
	}
	var pub netip.Addr
	if f.publicIP != "" {
		pub = netip.MustParseAddr(f.publicIP)
	}
	a, err := agent.New(agent.Options{
		Node:       f.node,
		Iface:      f.iface,
		PublicIP:   pub,
		SubnetFile: f.subnetFile,
		CNIConfDir: f.cniConfDir,
		CNIConf:    agent.CNIConf{Bridge: f.cniBridge, DataDir: f.cniDataDir, PodInterface: f.podIface},
		Resync:     f.resync,
		Store:      store,
		LeaseTTL:   f.leaseTTL,
		Log:        log,
		Metrics:    metrics,
		Docker:     d,
		OnReady:    onReady,

		RepairForwarding: f.fwdRepair,
		WireGuard:        f.wg,
	})
	if err != nil {
		return err
	}
	// /status (peers, addresses, errors) and the probes stay on --listen; --metrics-listen
	// serves the counters alone (see SECURITY.md).
	metricsOnly := http.NewServeMux()
	metricsOnly.Handle("/metrics", promhttp.HandlerFor(metrics.Registry, promhttp.HandlerOpts{}))
	for _, s := range []struct {
		flag, addr string
		h          http.Handler
	}{{"--listen", f.listen, a.Handler(f.pprof)}, {"--metrics-listen", f.metrics, metricsOnly}} {
		if s.addr == "" {
			continue
		}
		ln, err := net.Listen("tcp", s.addr)
		if err != nil {
			return fmt.Errorf("%s %s: %w", s.flag, s.addr, err)
		}
		srv := &http.Server{Handler: s.h, ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = srv.Serve(ln) }()
		defer srv.Close()
	}
	return a.Run(ctx)
}

// startEmbeddedEtcd runs netagent-etcd as a child with its data in dir and waits for its
// socket; the returned func stops it.
func startEmbeddedEtcd(ctx context.Context, dir string) (func(), string, error) {
	bin, err := etcdBinary()
	if err != nil {
		return nil, "", err
	}
	cmd := exec.Command(bin, "--data-dir", dir)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return nil, "", fmt.Errorf("start %s: %w", bin, err)
	}
	stop := func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	}
	sock := filepath.Join(dir, "etcd.sock:2379")
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(sock); err == nil {
			return stop, "unix://" + sock, nil
		}
		select {
		case <-ctx.Done():
			stop()
			return nil, "", ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	stop()
	return nil, "", fmt.Errorf("embedded etcd did not come up in %s", dir)
}

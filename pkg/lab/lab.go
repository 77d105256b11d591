// Package lab builds a multi-node container network on one machine out of network
// namespaces, with the real binaries: an underlay switch, N nodes each running `netagent
// run`, an etcd, pods wired by the real CNI plugin through libcni, and an outside host. The
// `netagent lab` command and the cluster integration tests both use it.
//
// Topology (addresses are documentation ranges):
//
//	          [ext 192.0.2.254]
//	                |
//	[node1 .11]--[switch: br0]--[node2 .12] ...
//	                |
//	          [router .1 | 198.51.100.1]--[switch2: br0]--[nodeN 198.51.100.10]   (remote nodes)
//
// Every namespace name starts with the lab's prefix; Down removes all of them, also after
// the lab process crashed, by name.
package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/netagent/netagent/pkg/etcdsock"
	"github.com/netagent/netagent/test/netns"
)

// Options describe a lab.
type Options struct {
	Prefix      string // namespace name prefix, e.g. "nalab-"
	Dir         string // state, logs, sockets
	Nodes       int
	Remote      int // how many of the nodes sit on the second underlay subnet behind a router
	Backend     string
	PodsPerNode int
	Netagent    string // path of the netagent binary
	CNIBinDir   string // directory holding netagent-cni
	LeaseTTL    time.Duration
	Network     string // pod network (default 10.244.0.0/16)
	// EtcdMembers > 1 runs a cluster of that many members; EtcdBinary runs an external
	// etcd (e.g. Debian's /usr/bin/etcd) instead of `netagent etcd`.
	EtcdMembers int
	EtcdBinary  string
	// EtcdTLS runs a single external etcd (EtcdBinary) with TLS and client-certificate
	// authentication on the underlay at 192.0.2.250:2379, in a namespace of its own.
	EtcdTLS bool
	// RouteMode runs `netagent route-mode --write-docker-config` instead of `netagent run`
	// (the Docker scenario: each node is a Docker host).
	// With RouteMode, Up starts a dockerd per node and PodsPerNode containers on each.
	RouteMode bool
	// DockerNetwork makes route mode create this user-defined network on the lease
	// (--docker-network) instead of writing daemon.json; dockerd then starts first.
	DockerNetwork string
	// Kube runs the agents with --subnet-manager=kube against this API server instead of
	// etcd (see startKube).
	Kube KubeAPI
	Log  func(format string, args ...any)
}

// Node is one lab node.
type Node struct {
	Name  string     `json:"name"`
	NS    string     `json:"ns"`
	IP    netip.Addr `json:"ip"`
	Agent int        `json:"agentPid"`
	Pods  []*Pod     `json:"pods"`
	// Dockerd is the node's dockerd (route-mode labs).
	Dockerd int          `json:"dockerdPid,omitempty"`
	Dir     string       `json:"dir"`
	Net     netip.Prefix `json:"underlay"`
}

// Pod is one lab pod.
type Pod struct {
	Name string     `json:"name"`
	NS   string     `json:"ns"`
	IP   netip.Addr `json:"ip"`
	Node string     `json:"node"`
}

// Lab is a running lab; its JSON form is saved in Dir/lab.json.
type Lab struct {
	Opt     Options `json:"-"`
	Prefix  string  `json:"prefix"`
	Dir     string  `json:"dir"`
	Backend string  `json:"backend"`
	// RouteMode is the Docker scenario.
	RouteMode     bool   `json:"routeMode,omitempty"`
	DockerNetwork string `json:"dockerNetwork,omitempty"`
	EtcdPid       int    `json:"etcdPid"`
	// EtcdPids are the members' processes in a multi-member etcd (EtcdPid is then 0).
	EtcdPids    []int     `json:"etcdPids,omitempty"`
	EtcdMembers int       `json:"etcdMembers,omitempty"`
	EtcdBinary  string    `json:"etcdBinary,omitempty"`
	EtcdTLS     *TLSFiles `json:"etcdTLS,omitempty"`
	Nodes       []*Node   `json:"nodes"`
	Ext         netip.Addr
	// Namespaces created, in creation order.
	Namespaces []string `json:"namespaces"`
	// Kube: the agents use the Kubernetes subnet manager (Opt.Kube).
	Kube    bool `json:"kube,omitempty"`
	kubeSrv *http.Server
}

const (
	underlayA = "192.0.2.0/24"
	underlayB = "198.51.100.0/24"
	routerA   = "192.0.2.1"
	routerB   = "198.51.100.1"
	extIP     = "192.0.2.254"
	// Network is the lab's default pod network.
	Network = "10.244.0.0/16"
)

func (l *Lab) logf(format string, args ...any) {
	if l.Opt.Log != nil {
		l.Opt.Log(format, args...)
	}
}

func (l *Lab) ns(name string) *netns.NS {
	return &netns.NS{Name: l.Prefix + name, Path: "/run/netns/" + l.Prefix + name}
}

func (l *Lab) newNS(name string) (*netns.NS, error) {
	n, err := netns.CreateNamed(l.Prefix + name)
	if err != nil {
		return nil, err
	}
	l.Namespaces = append(l.Namespaces, n.Name)
	return n, nil
}

// Switch is the underlay switch namespace, SwitchB the remote one.
func (l *Lab) Switch() *netns.NS  { return l.ns("switch") }
func (l *Lab) SwitchB() *netns.NS { return l.ns("switch2") }

// ExtNS is the outside host.
func (l *Lab) ExtNS() *netns.NS { return l.ns("ext") }

// NodeNS returns a node's namespace.
func (l *Lab) NodeNS(n *Node) *netns.NS { return &netns.NS{Name: n.NS, Path: "/run/netns/" + n.NS} }

// PodNS returns a pod's namespace.
func (l *Lab) PodNS(p *Pod) *netns.NS { return &netns.NS{Name: p.NS, Path: "/run/netns/" + p.NS} }

// etcdTLSAddr is where a TLS lab's etcd listens (on the underlay).
const etcdTLSAddr = "192.0.2.250"

// EtcdEndpoint is the etcd client URL (a comma-separated list for a cluster).
func (l *Lab) EtcdEndpoint() string {
	if l.EtcdTLS != nil {
		return "https://" + etcdTLSAddr + ":2379"
	}
	if l.EtcdMembers <= 1 && l.EtcdBinary == "" {
		return "unix://" + filepath.Join(l.Dir, "etcd", "etcd.sock:2379")
	}
	var eps []string
	for i := range max(l.EtcdMembers, 1) {
		eps = append(eps, etcdsock.ClientEndpoint(filepath.Join(l.Dir, "etcd"), memberName(i)))
	}
	return strings.Join(eps, ",")
}

func memberName(i int) string { return fmt.Sprintf("m%d", i+1) }

// Up builds the lab: namespaces, underlay, etcd, network config, agents, pods.
func Up(ctx context.Context, opt Options) (l *Lab, err error) {
	if opt.Nodes < 1 {
		return nil, errors.New("a lab needs at least one node")
	}
	if opt.Remote >= opt.Nodes && opt.Remote > 0 {
		return nil, errors.New("at least one node must be on the main underlay")
	}
	if opt.LeaseTTL == 0 {
		opt.LeaseTTL = 10 * time.Second
	}
	if opt.Network == "" {
		opt.Network = Network
	}
	l = &Lab{Opt: opt, Prefix: opt.Prefix, Dir: opt.Dir, Backend: opt.Backend, Ext: netip.MustParseAddr(extIP),
		EtcdMembers: opt.EtcdMembers, EtcdBinary: opt.EtcdBinary, RouteMode: opt.RouteMode, DockerNetwork: opt.DockerNetwork,
		Kube: opt.Kube != nil}
	if opt.EtcdTLS {
		if opt.EtcdBinary == "" {
			return nil, errors.New("EtcdTLS needs EtcdBinary (an external etcd)")
		}
		files, err := GenerateTLS(filepath.Join(opt.Dir, "pki"), net.ParseIP(etcdTLSAddr))
		if err != nil {
			return nil, err
		}
		l.EtcdTLS = &files
	}
	if err := os.MkdirAll(opt.Dir, 0o755); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			_ = l.Down()
			l = nil
		}
	}()
	t0 := time.Now()
	if err := l.underlay(); err != nil {
		return l, err
	}
	l.logf("underlay: switch, %d nodes, outside host (%s)", opt.Nodes, time.Since(t0).Round(time.Millisecond))
	t0 = time.Now()
	if l.Kube {
		if err := l.startKube(ctx); err != nil {
			return l, err
		}
		l.logf("Kubernetes API at %s, nodes registered with podCIDRs, network %s backend %s (%s)", l.KubeServer(), opt.Network, opt.Backend, time.Since(t0).Round(time.Millisecond))
	} else {
		if err := l.StartEtcd(); err != nil {
			return l, err
		}
		if err := l.setConfig(ctx); err != nil {
			return l, err
		}
		l.logf("etcd at %s, network %s backend %s (%s)", l.EtcdEndpoint(), opt.Network, opt.Backend, time.Since(t0).Round(time.Millisecond))
	}
	t0 = time.Now()
	if opt.RouteMode && opt.DockerNetwork != "" {
		// The agent creates the network through the Docker API, so dockerd comes first
		// (its own docker0 stays on Docker's default subnet, unused).
		for _, n := range l.Nodes {
			if err := os.WriteFile(filepath.Join(n.Dir, "daemon.json"), []byte("{}\n"), 0o644); err != nil {
				return l, err
			}
			if err := l.StartDocker(ctx, n); err != nil {
				return l, err
			}
		}
	}
	for _, n := range l.Nodes {
		if err := l.StartAgent(n); err != nil {
			return l, err
		}
	}
	for _, n := range l.Nodes {
		if err := l.WaitReady(ctx, n, 30*time.Second); err != nil {
			return l, err
		}
	}
	if err := l.WaitConverged(ctx, 30*time.Second); err != nil {
		return l, err
	}
	l.logf("agents ready on %d nodes, every peer programmed everywhere (%s)", len(l.Nodes), time.Since(t0).Round(time.Millisecond))
	t0 = time.Now()
	if opt.RouteMode {
		if err := l.upDocker(ctx); err != nil {
			return l, err
		}
		l.logf("dockerd on %d hosts, bridges on their leases, %d containers (%s)", len(l.Nodes), opt.PodsPerNode*len(l.Nodes), time.Since(t0).Round(time.Millisecond))
		return l, l.Save()
	}
	for _, n := range l.Nodes {
		for i := range opt.PodsPerNode {
			if _, err := l.AddPod(ctx, n, fmt.Sprintf("%s-pod%d", n.Name, i+1)); err != nil {
				return l, err
			}
		}
	}
	if opt.PodsPerNode > 0 {
		l.logf("%d pods wired through netagent-cni (%s)", opt.PodsPerNode*len(l.Nodes), time.Since(t0).Round(time.Millisecond))
	}
	return l, l.Save()
}

func (l *Lab) underlay() error {
	sw, err := l.newNS("switch")
	if err != nil {
		return err
	}
	if _, err := sw.Run("ip", "link", "add", "br0", "type", "bridge"); err != nil {
		return err
	}
	if _, err := sw.Run("ip", "link", "set", "br0", "up"); err != nil {
		return err
	}
	ext, err := l.newNS("ext")
	if err != nil {
		return err
	}
	if err := attach(sw, "ext", ext, extIP+"/24"); err != nil {
		return err
	}
	// Servers on the underlay (a TLS etcd, a Kubernetes API) get a namespace of their own,
	// with a route back to the second underlay through the router.
	for _, srv := range []struct {
		on         bool
		name, addr string
	}{{l.Kube, "api", kubeAPIAddr}, {l.EtcdTLS != nil, "etcd", etcdTLSAddr}} {
		if !srv.on {
			continue
		}
		ns, err := l.newNS(srv.name)
		if err != nil {
			return err
		}
		if err := attach(sw, srv.name, ns, srv.addr+"/24"); err != nil {
			return err
		}
		if l.Opt.Remote > 0 {
			if _, err := ns.Run("ip", "route", "add", underlayB, "via", routerA); err != nil {
				return err
			}
		}
	}
	var swB *netns.NS
	if l.Opt.Remote > 0 {
		if swB, err = l.newNS("switch2"); err != nil {
			return err
		}
		if _, err := swB.Run("ip", "link", "add", "br0", "type", "bridge"); err != nil {
			return err
		}
		if _, err := swB.Run("ip", "link", "set", "br0", "up"); err != nil {
			return err
		}
		rt, err := l.newNS("router")
		if err != nil {
			return err
		}
		if err := attach(sw, "rt", rt, routerA+"/24"); err != nil {
			return err
		}
		if err := attachAs(swB, "rt", rt, "eth1", routerB+"/24"); err != nil {
			return err
		}
		if _, err := rt.Run("sysctl", "-qw", "net.ipv4.ip_forward=1"); err != nil {
			return err
		}
		if _, err := ext.Run("ip", "route", "add", underlayB, "via", routerA); err != nil {
			return err
		}
	}
	local := l.Opt.Nodes - l.Opt.Remote
	for i := range l.Opt.Nodes {
		name := fmt.Sprintf("node%d", i+1)
		n := &Node{Name: name, Dir: filepath.Join(l.Dir, name)}
		ns, err := l.newNS(name)
		if err != nil {
			return err
		}
		n.NS = ns.Name
		if err := os.MkdirAll(n.Dir, 0o755); err != nil {
			return err
		}
		if i < local {
			n.IP = netip.MustParseAddr(fmt.Sprintf("192.0.2.%d", 11+i))
			n.Net = netip.MustParsePrefix(underlayA)
			if err := attach(sw, name, ns, n.IP.String()+"/24"); err != nil {
				return err
			}
			if l.Opt.Remote > 0 {
				if _, err := ns.Run("ip", "route", "add", "default", "via", routerA); err != nil {
					return err
				}
			}
		} else {
			n.IP = netip.MustParseAddr(fmt.Sprintf("198.51.100.%d", 10+i-local))
			n.Net = netip.MustParsePrefix(underlayB)
			if err := attach(swB, name, ns, n.IP.String()+"/24"); err != nil {
				return err
			}
			if _, err := ns.Run("ip", "route", "add", "default", "via", routerB); err != nil {
				return err
			}
		}
		l.Nodes = append(l.Nodes, n)
	}
	return nil
}

// attach connects ns to the switch with a veth: "eth0" in ns with addr, port name on br0.
func attach(sw *netns.NS, port string, ns *netns.NS, addr string) error {
	return attachAs(sw, port, ns, "eth0", addr)
}

func attachAs(sw *netns.NS, port string, ns *netns.NS, dev, addr string) error {
	if err := netns.Veth(sw, port, ns, dev); err != nil {
		return err
	}
	if _, err := sw.Run("ip", "link", "set", port, "master", "br0"); err != nil {
		return err
	}
	return ns.AddrAdd(dev, addr)
}

// StartEtcd starts etcd inside the switch namespace (it listens on unix sockets only):
// `netagent etcd`, or with EtcdMembers/EtcdBinary a cluster or an external etcd.
func (l *Lab) StartEtcd() error {
	dir := filepath.Join(l.Dir, "etcd")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if l.EtcdTLS != nil {
		t := l.EtcdTLS
		url := "https://" + etcdTLSAddr + ":2379"
		cmd := l.ns("etcd").Command(context.Background(), l.EtcdBinary, "--name", "tls", "--data-dir", filepath.Join(dir, "tls.data"),
			"--listen-client-urls", url, "--advertise-client-urls", url,
			"--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
			"--initial-cluster", "tls=http://127.0.0.1:2380",
			"--cert-file", t.ServerCert, "--key-file", t.ServerKey, "--trusted-ca-file", t.CA, "--client-cert-auth")
		pid, err := startDetached(cmd, filepath.Join(l.Dir, "etcd.log"))
		if err != nil {
			return err
		}
		l.EtcdPid = pid
	} else if l.EtcdMembers <= 1 && l.EtcdBinary == "" {
		cmd := l.Switch().Command(context.Background(), l.Opt.Netagent, "etcd", "--data-dir", dir)
		pid, err := startDetached(cmd, filepath.Join(l.Dir, "etcd.log"))
		if err != nil {
			return err
		}
		l.EtcdPid = pid
	} else {
		l.EtcdPids = nil
		for i := range max(l.EtcdMembers, 1) {
			if err := l.StartEtcdMember(i); err != nil {
				return err
			}
		}
	}
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if out, err := l.netagent(context.Background(), "config", "get"); err == nil || strings.Contains(out, "no network config") {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("etcd did not come up; see %s", filepath.Join(l.Dir, "etcd*.log"))
}

// StartEtcdMember starts member i of a multi-member (or external) etcd.
func (l *Lab) StartEtcdMember(i int) error {
	dir := filepath.Join(l.Dir, "etcd")
	n := max(l.EtcdMembers, 1)
	var cluster []string
	for j := range n {
		cluster = append(cluster, memberName(j)+"="+etcdsock.PeerURL(memberName(j)))
	}
	name := memberName(i)
	var cmd *exec.Cmd
	if l.EtcdBinary == "" {
		cmd = l.Switch().Command(context.Background(), l.Opt.Netagent, "etcd", "--data-dir", dir, "--name", name, "--initial-cluster", strings.Join(cluster, ","))
	} else {
		client := etcdsock.ClientURL(name)
		cmd = l.Switch().Command(context.Background(), l.EtcdBinary, "--name", name, "--data-dir", name+".data",
			"--listen-client-urls", client, "--advertise-client-urls", client,
			"--listen-peer-urls", etcdsock.PeerURL(name), "--initial-advertise-peer-urls", etcdsock.PeerURL(name),
			"--initial-cluster", strings.Join(cluster, ","), "--initial-cluster-token", "netagent", "--initial-cluster-state", "new")
	}
	cmd.Dir = dir // members find each other's peer sockets relative to it
	pid, err := startDetached(cmd, filepath.Join(l.Dir, "etcd-"+name+".log"))
	if err != nil {
		return err
	}
	for len(l.EtcdPids) <= i {
		l.EtcdPids = append(l.EtcdPids, 0)
	}
	l.EtcdPids[i] = pid
	return nil
}

// StopEtcdMember kills member i.
func (l *Lab) StopEtcdMember(i int) error {
	err := killWait(l.EtcdPids[i])
	l.EtcdPids[i] = 0
	return err
}

// StopEtcd kills etcd (every member).
func (l *Lab) StopEtcd() error {
	err := killWait(l.EtcdPid)
	l.EtcdPid = 0
	for i := range l.EtcdPids {
		if e := l.StopEtcdMember(i); err == nil {
			err = e
		}
	}
	return err
}

func (l *Lab) setConfig(ctx context.Context) error {
	out, err := l.netagent(ctx, "config", "set", "--network", l.Opt.Network, "--backend", l.Opt.Backend)
	if err != nil {
		return fmt.Errorf("config set: %v: %s", err, out)
	}
	return nil
}

// netagent runs a netagent subcommand against the lab's etcd.
func (l *Lab) netagent(ctx context.Context, args ...string) (string, error) {
	args = append(args, l.EtcdFlags()...)
	cmd := exec.CommandContext(ctx, l.Opt.Netagent, args...)
	if l.EtcdTLS != nil {
		cmd = l.ns("etcd").Command(ctx, l.Opt.Netagent, args...) // etcd is on the underlay
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// EtcdFlags are the etcd flags of netagent commands in this lab.
func (l *Lab) EtcdFlags() []string {
	f := []string{"--etcd-endpoints", l.EtcdEndpoint()}
	if t := l.EtcdTLS; t != nil {
		f = append(f, "--etcd-ca", t.CA, "--etcd-cert", t.ClientCert, "--etcd-key", t.ClientKey)
	}
	return f
}

func (l *Lab) storeFlags() []string {
	if l.Kube {
		return l.kubeFlags()
	}
	return l.EtcdFlags()
}

// AgentArgs are the `netagent run` arguments of a node.
func (l *Lab) AgentArgs(n *Node) []string {
	cmd := "run"
	var extra []string
	if l.Opt.RouteMode {
		cmd = "route-mode"
		extra = []string{"--write-docker-config", filepath.Join(n.Dir, "daemon.json")}
		if l.Opt.DockerNetwork != "" {
			extra = []string{"--docker-network", l.Opt.DockerNetwork, "--docker-socket", l.dockerSock(n)}
		}
	}
	return append(append([]string{cmd,
		"--node-name", n.Name,
		"--iface", "eth0",
		"--subnet-file", filepath.Join(n.Dir, "subnet.env"),
		"--cni-conf-dir", filepath.Join(n.Dir, "net.d"),
		"--cni-data-dir", filepath.Join(n.Dir, "ipam"),
		"--lease-ttl", l.Opt.LeaseTTL.String(),
		"--listen", "127.0.0.1:9476",
	}, l.storeFlags()...), extra...)
}

// StartAgent starts the node's agent.
func (l *Lab) StartAgent(n *Node) error {
	cmd := l.NodeNS(n).Command(context.Background(), l.Opt.Netagent, l.AgentArgs(n)...)
	pid, err := startDetached(cmd, filepath.Join(n.Dir, "agent.log"))
	if err != nil {
		return fmt.Errorf("start agent on %s: %w", n.Name, err)
	}
	n.Agent = pid
	return nil
}

// StopAgent stops the node's agent: SIGTERM (graceful) or SIGKILL.
func (l *Lab) StopAgent(n *Node, kill bool) error {
	sig := syscall.SIGTERM
	if kill {
		sig = syscall.SIGKILL
	}
	err := signalWait(n.Agent, sig)
	n.Agent = 0
	return err
}

// WaitReady waits until the node's agent answers /readyz.
func (l *Lab) WaitReady(ctx context.Context, n *Node, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if code, _, err := l.Get(n, "/readyz"); err == nil && code == 200 {
			return nil
		}
		if n.Agent != 0 && (syscall.Kill(n.Agent, 0) != nil || zombie(n.Agent)) {
			return fmt.Errorf("agent on %s exited; log:\n%s", n.Name, tail(filepath.Join(n.Dir, "agent.log"), 20))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
	return fmt.Errorf("agent on %s not ready after %s; log:\n%s", n.Name, timeout, tail(filepath.Join(n.Dir, "agent.log"), 20))
}

// WaitConverged waits until every node's agent has every other node as a peer with its
// route (and FDB and neighbour entries) in the kernel; unreachable peers count as settled.
func (l *Lab) WaitConverged(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		done := true
		for _, n := range l.Nodes {
			code, b, err := l.Get(n, "/status")
			if err != nil || code != 200 {
				done, last = false, fmt.Sprintf("%s: status %d %v", n.Name, code, err)
				break
			}
			var st struct {
				Peers []struct {
					Node, Mode string
					Route      bool
					FDB, Neigh *bool
				} `json:"peers"`
			}
			if err := json.Unmarshal(b, &st); err != nil {
				return err
			}
			if len(st.Peers) != len(l.Nodes)-1 {
				done, last = false, fmt.Sprintf("%s sees %d of %d peers", n.Name, len(st.Peers), len(l.Nodes)-1)
				break
			}
			for _, p := range st.Peers {
				if p.Mode != "unreachable" && (!p.Route || (p.FDB != nil && !*p.FDB) || (p.Neigh != nil && !*p.Neigh)) {
					done, last = false, fmt.Sprintf("%s has not programmed %s yet", n.Name, p.Node)
					break
				}
			}
			if !done {
				break
			}
		}
		if done {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
	return fmt.Errorf("the lab did not converge in %s: %s", timeout, last)
}

// Get fetches path from the node agent's HTTP endpoint, connecting inside the node's
// namespace (the agent listens on the node's loopback).
func (l *Lab) Get(n *Node, path string) (int, []byte, error) {
	ns := l.NodeNS(n)
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var conn net.Conn
			err := ns.Do(func() error {
				var err error
				conn, err = (&net.Dialer{Timeout: 2 * time.Second}).DialContext(ctx, network, addr)
				return err
			})
			return conn, err
		},
	}}
	resp, err := c.Get("http://127.0.0.1:9476" + path)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

// Status returns `netagent status` of a node.
func (l *Lab) Status(n *Node) (string, error) {
	return l.NodeNS(n).Run(l.Opt.Netagent, "status")
}

// Save writes lab.json.
func (l *Lab) Save() error {
	b, err := json.MarshalIndent(l, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(l.Dir, "lab.json"), b, 0o644)
}

// Load reads a saved lab.
func Load(dir string, opt Options) (*Lab, error) {
	b, err := os.ReadFile(filepath.Join(dir, "lab.json"))
	if err != nil {
		return nil, fmt.Errorf("no lab in %s: %w", dir, err)
	}
	l := &Lab{}
	if err := json.Unmarshal(b, l); err != nil {
		return nil, fmt.Errorf("%s/lab.json: %w", dir, err)
	}
	opt.Prefix, opt.Dir, opt.Backend, opt.RouteMode, opt.DockerNetwork = l.Prefix, l.Dir, l.Backend, l.RouteMode, l.DockerNetwork
	l.Opt = opt
	return l, nil
}

// Down stops every process and removes every namespace with the lab's prefix (also ones a
// crashed lab did not record).
func (l *Lab) Down() error {
	var errs []error
	for _, n := range l.Nodes {
		if n.Dockerd != 0 {
			if err := l.StopDocker(context.Background(), n); err != nil {
				errs = append(errs, err)
			}
		}
		if n.Agent != 0 {
			_ = signalWait(n.Agent, syscall.SIGKILL)
		}
	}
	_ = l.StopEtcd()
	if err := l.stopKube(); err != nil {
		errs = append(errs, err)
	}
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		if l.Prefix != "" && strings.HasPrefix(e.Name(), l.Prefix) {
			if err := (&netns.NS{Name: e.Name(), Path: "/run/netns/" + e.Name()}).Close(); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// startDetached starts cmd in its own session with output to logPath, so it outlives the
// starting process (the lab keeps running after `netagent lab up` returns).
func startDetached(cmd *exec.Cmd, logPath string) (int, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	pid := cmd.Process.Pid
	go func() { _ = cmd.Wait() }() // reap it if it exits while we run
	return pid, nil
}

func killWait(pid int) error { return signalWait(pid, syscall.SIGKILL) }

func signalWait(pid int, sig syscall.Signal) error { return signalWaitFor(pid, sig, 10*time.Second) }

func signalWaitFor(pid int, sig syscall.Signal, timeout time.Duration) error {
	if pid <= 0 {
		return nil
	}
	if err := syscall.Kill(pid, sig); err != nil {
		if errors.Is(err, syscall.ESRCH) {
			return nil
		}
		return err
	}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if syscall.Kill(pid, 0) != nil || zombie(pid) {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("pid %d did not exit", pid)
}

func zombie(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	f := strings.Fields(string(b))
	return len(f) > 2 && f[2] == "Z"
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

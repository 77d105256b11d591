// Package k8s_test runs netagent as the network of a real Kubernetes cluster (kube-apiserver,
// controller-manager, scheduler, and per node containerd, kubelet and kube-proxy, built by
// scripts/k8s-build.sh) in network namespaces, installed the way the README says: the
// image imported, `kubectl apply -k manifests/kube`.
package k8s_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/lab/k8s"
	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

// kubeBin finds the Kubernetes binaries: NETAGENT_K8S_BIN, or the build script's cache.
// Without them the test skips, and fails when CI is set (scripts/test.sh builds them).
func kubeBin(t *testing.T) string {
	dir := os.Getenv("NETAGENT_K8S_BIN")
	if dir == "" {
		dir = "/var/cache/netagent/kubernetes/v1.34.4/bin"
	}
	if _, err := os.Stat(filepath.Join(dir, ".complete")); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("Kubernetes binaries missing in %s (scripts/k8s-build.sh builds them): %v", dir, err)
		}
		t.Skipf("Kubernetes binaries missing in %s (run scripts/k8s-build.sh): %v", dir, err)
	}
	return dir
}

type lab struct {
	t        *testing.T
	dir      string
	agentBin string
	sw       *netns.NS
	ext      *netns.NS
	nodes    []*k8s.Node
	c        *k8s.Cluster
	dual     bool
}

// newLab builds the underlay (a switch, n nodes on 192.0.2.11.., an outside host on
// 192.0.2.254) and the cluster on it.
func newLab(t *testing.T, n int) *lab { return newLabWith(t, n, false) }

// Dual-stack clusters: the underlay has 2001:db8:1::/64 too, and the cluster these ranges.
const (
	clusterCIDRDual = "10.244.0.0/16,fd00:10:244::/56"
	serviceCIDRDual = "10.96.0.0/16,fd00:10:96::/112"
)

// newLabWith is newLab, dual stack if dual: the underlay, the nodes' --node-ip, the
// controller-manager's podCIDRs and the service range in both families.
func newLabWith(t *testing.T, n int, dual bool) *lab {
	netns.RequireRoot(t)
	bin := kubeBin(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	l := &lab{t: t, sw: netns.New(t, "k8sw"), ext: netns.New(t, "k8ext"), dual: dual}
	l.sw.MustRun(t, "ip", "link", "add", "br0", "type", "bridge")
	l.sw.MustRun(t, "ip", "link", "set", "br0", "up")
	l.attach("ext", l.ext, "192.0.2.254/24")
	if dual {
		l.ext.MustRun(t, "ip", "addr", "add", "2001:db8:1::254/64", "dev", "eth0", "nodad")
	}
	l.dir = t.TempDir()
	dir := l.dir
	for i := range n {
		l.nodes = append(l.nodes, l.newNode(i+1))
	}
	agent := testbin.Build(t, "./cmd/netagent", "netagent")
	l.agentBin = agent
	cni := testbin.Build(t, "./cmd/cni-plugin", "netagent-cni")
	etcd := testbin.Build(t, "./cmd/netagent-etcd", "netagent-etcd")
	loopback := testbin.Build(t, "github.com/containernetworking/plugins/plugins/main/loopback", "loopback")
	img, err := k8s.BuildNetagentImage(ctx, filepath.Join(testbin.Root(), "scripts/image-rootfs.sh"), agent, cni, dir)
	if err != nil {
		t.Fatal(err)
	}
	opt := k8s.Options{
		Dir: dir, KubeBin: bin, Etcd: etcd, Loopback: loopback, NetagentImage: img,
		Prefix: netns.Prefix + fmt.Sprint(os.Getpid()) + "-",
		Log:    func(f string, a ...any) { t.Logf(f, a...) },
	}
	if dual {
		opt.ClusterCIDR, opt.ServiceCIDR = clusterCIDRDual, serviceCIDRDual
	}
	c, err := k8s.Up(ctx, opt, l.nodes)
	// Cleanups run last-in first-out: the cluster goes before its namespaces.
	t.Cleanup(func() {
		if c == nil {
			return
		}
		if t.Failed() {
			for _, n := range l.nodes {
				for _, f := range []string{"node.log", "kubelet.log", "containerd.log"} {
					t.Logf("%s %s:\n%s", n.Name, f, k8s.TailFile(filepath.Join(n.Dir, f), 15))
				}
			}
		}
		if err := c.Down(); err != nil {
			t.Errorf("cluster down: %v", err)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	l.c = c
	return l
}

// attach plugs a namespace into the underlay switch as eth0 with addr.
func (l *lab) attach(port string, ns *netns.NS, addr string) {
	t := l.t
	if err := netns.Veth(l.sw, port, ns, "eth0"); err != nil {
		t.Fatal(err)
	}
	l.sw.MustRun(t, "ip", "link", "set", port, "master", "br0")
	if err := ns.AddrAdd("eth0", addr); err != nil {
		t.Fatal(err)
	}
}

// newNode makes node i's namespace on the underlay (192.0.2.10+i); the cluster starts
// its daemons.
func (l *lab) newNode(i int) *k8s.Node {
	ns := netns.New(l.t, fmt.Sprintf("k8n%d", i))
	ip := netip.AddrFrom4([4]byte{192, 0, 2, byte(10 + i)})
	l.attach(fmt.Sprintf("n%d", i), ns, ip.String()+"/24")
	// The outside host is the underlay's gateway (kube-proxy wants a default route).
	ns.MustRun(l.t, "ip", "route", "add", "default", "via", "192.0.2.254")
	n := &k8s.Node{Name: fmt.Sprintf("node%d", i), NS: ns.Name, IP: ip, Dir: filepath.Join(l.dir, "nodes", fmt.Sprintf("node%d", i))}
	if l.dual {
		n.IP6 = netip.MustParseAddr(fmt.Sprintf("2001:db8:1::%d", 10+i))
		ns.MustRun(l.t, "ip", "addr", "add", n.IP6.String()+"/64", "dev", "eth0", "nodad")
		ns.MustRun(l.t, "ip", "-6", "route", "add", "default", "via", "2001:db8:1::254")
	}
	return n
}

func (l *lab) kubectl(args ...string) string {
	l.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := l.c.Kubectl(ctx, args...)
	if err != nil {
		l.t.Fatal(err)
	}
	return out
}

func (l *lab) eventually(what string, timeout time.Duration, ok func() (bool, string)) {
	l.t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		var done bool
		if done, last = ok(); done {
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
	l.t.Fatalf("%s: not within %s; last: %s", what, timeout, last)
}

type podInfo struct {
	Name, IP, Node string
}

// waitReady waits for the netagent DaemonSet's current version to be ready on every node
// and every node to be Ready.
func (l *lab) waitReady() {
	l.eventually("DaemonSet rolled out", 3*time.Minute, func() (bool, string) {
		out := l.kubectl("-n", "netagent", "get", "ds", "netagent", "-o", "jsonpath={.status.updatedNumberScheduled}/{.status.numberReady}/{.status.desiredNumberScheduled}")
		return out == fmt.Sprintf("%d/%d/%d", len(l.nodes), len(l.nodes), len(l.nodes)), out
	})
	l.eventually("nodes Ready", time.Minute, func() (bool, string) {
		out := l.kubectl("get", "nodes", "-o", `jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{" "}{end}`)
		return strings.Count(out, "True") == len(l.nodes), out
	})
}

// startWeb applies the web workload (a pod per node, hostPort 18080) and returns its pods
// once one is ready on every node.
func (l *lab) startWeb() []podInfo {
	applyYAML(l.t, l, k8s.WebManifest(len(l.nodes), 18080))
	return l.waitWebPods(l.t, len(l.nodes))
}

func (l *lab) webPods() []podInfo {
	var list struct {
		Items []struct {
			Metadata struct {
				Name              string
				DeletionTimestamp *string
			}
			Spec   struct{ NodeName string }
			Status struct {
				PodIP      string
				Phase      string
				Conditions []struct{ Type, Status string }
			}
		}
	}
	if err := json.Unmarshal([]byte(l.kubectl("get", "pods", "-l", "app=web", "-o", "json")), &list); err != nil {
		l.t.Fatal(err)
	}
	var pods []podInfo
	for _, it := range list.Items {
		ready := false
		for _, c := range it.Status.Conditions {
			ready = ready || (c.Type == "Ready" && c.Status == "True")
		}
		if ready && it.Metadata.DeletionTimestamp == nil {
			pods = append(pods, podInfo{it.Metadata.Name, it.Status.PodIP, it.Spec.NodeName})
		}
	}
	return pods
}

// TestKubernetes is issue 13's items 1 and 2 on a real cluster: the DaemonSet from
// manifests/kube brings the nodes Ready, and pods made by the kubelet reach each other
// across nodes, the outside world (masqueraded), a ClusterIP, a NodePort and a hostPort.
func TestKubernetes(t *testing.T) {
	begin := time.Now()
	l := newLab(t, 3)
	start := time.Now()
	l.kubectl("apply", "-k", filepath.Join(testbin.Root(), "manifests/kube"))
	l.waitReady()
	t.Logf("DaemonSet applied -> every agent ready and every node Ready: %s", time.Since(start).Round(time.Millisecond))
	// Warm: the Kubernetes binaries cached; the netagent binaries and image built here.
	t.Logf("time to a Ready cluster (warm: namespaces, image, control plane, %d nodes, the DaemonSet): %s", len(l.nodes), time.Since(begin).Round(time.Millisecond))
	for _, n := range l.nodes {
		out := l.kubectl("get", "node", n.Name, "-o", "jsonpath={.spec.podCIDR} {.metadata.annotations.netagent\\.io/public-ip}")
		f := strings.Fields(out)
		if len(f) != 2 || f[1] != n.IP.String() {
			t.Errorf("node %s: podCIDR and netagent.io/public-ip = %q, want a podCIDR and %s", n.Name, out, n.IP)
		}
	}

	pods := l.startWeb()

	t.Run("pod matrix", func(t *testing.T) { l.checkMatrix(t, pods) })
	t.Run("ClusterIP", func(t *testing.T) {
		svc := l.kubectl("get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}")
		for _, a := range pods {
			out, err := l.c.Kubectl(context.Background(), "exec", a.Name, "--", "sh", "-c", "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 "+svc+" 80")
			if err != nil || !strings.Contains(out, "200 OK") {
				t.Errorf("%s -> ClusterIP %s:80 = %q, %v", a.Name, svc, out, err)
			}
		}
	})
	t.Run("NodePort and hostPort from outside", func(t *testing.T) {
		for _, n := range l.nodes {
			for _, port := range []string{"30080", "18080"} {
				out, err := l.ext.Run("sh", "-c", "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 3 "+n.IP.String()+" "+port)
				if err != nil || !strings.Contains(out, "200 OK") {
					t.Errorf("outside -> %s:%s = %q, %v", n.IP, port, out, err)
				}
			}
		}
	})
	// Issue 13 item 4: a DaemonSet image change rolls out node by node while pods on
	// different nodes ping each other every 10 ms and keep a TCP connection busy: nothing
	// may be lost.
	t.Run("upgrade under traffic", func(t *testing.T) {
		l.upgradeUnderTraffic(t, pods, "ghcr.io/netagent/netagent:0.1.1")
	})
	// Issue 13 item 2 for every backend: the ConfigMap's backend changed and the agents
	// restarted one by one (under traffic: a cluster moving between backends stays
	// connected), then every node runs the new backend and nothing of the old one is left.
	for _, backend := range []string{config.HostGW, config.Hybrid, config.VXLAN} {
		t.Run("backend "+backend, func(t *testing.T) {
			l.underTraffic(t, pods, "the move to "+backend, func() { l.setBackend(backend) })
			l.checkBackend(t, backend)
			l.checkMatrix(t, pods)
		})
	}
	// Issue 13 item 3 (back on vxlan, so FDB and neighbour entries are there to check).
	t.Run("node lifecycle", func(t *testing.T) { l.nodeLifecycle(t, pods) })
	pods = l.webPods() // the deleted node's pod was recreated
	// Issue 13 item 6.
	t.Run("metrics scraped", func(t *testing.T) { l.metricsScraped(t, pods) })
	t.Run("readiness gates the rollout", func(t *testing.T) { l.readinessGates(t) })
	// Issue 13 item 5: the same cluster moves to the etcd-mode overlay.
	t.Run("etcd-tls overlay", func(t *testing.T) { l.etcdTLS(t, pods) })
	t.Run("egress masqueraded", func(t *testing.T) {
		var ln net.Listener
		if err := l.ext.Do(func() (err error) { ln, err = net.Listen("tcp", "192.0.2.254:9999"); return err }); err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		nodeIP := map[string]string{}
		for _, n := range l.nodes {
			nodeIP[n.Name] = n.IP.String()
		}
		for _, a := range pods {
			got := make(chan string, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					got <- err.Error()
					return
				}
				got <- c.RemoteAddr().(*net.TCPAddr).IP.String()
				c.Close()
			}()
			if _, err := l.c.Kubectl(context.Background(), "exec", a.Name, "--", "sh", "-c", "echo hi | nc -w 2 192.0.2.254 9999"); err != nil {
				t.Errorf("%s -> outside: %v", a.Name, err)
			}
			select {
			case src := <-got:
				if src != nodeIP[a.Node] {
					t.Errorf("%s (%s) reached the outside host from %s, want its node's address %s", a.Name, a.IP, src, nodeIP[a.Node])
				}
			case <-time.After(5 * time.Second):
				t.Errorf("%s: the outside host saw no connection", a.Name)
			}
		}
	})

	// Issue 13 item 4: uninstall as manifests/cleanup says, and every node is clean.
	t.Run("uninstall with manifests/cleanup", func(t *testing.T) {
		// Pods keep their wiring (host ports included) until they go; drain them first.
		l.kubectl("delete", "deployment", "web", "--wait=true")
		l.eventually("web pods gone", time.Minute, func() (bool, string) {
			out := l.kubectl("get", "pods", "-l", "app=web", "-o", "name")
			return strings.TrimSpace(out) == "", out
		})
		l.kubectl("-n", "netagent", "delete", "daemonset", "netagent", "--wait=true")
		l.kubectl("apply", "-k", filepath.Join(testbin.Root(), "manifests/cleanup"))
		l.kubectl("-n", "netagent", "rollout", "status", "daemonset/netagent-cleanup", "--timeout=180s")
		for _, n := range l.nodes {
			ns, err := netns.Open(n.NS)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range []struct{ what, cmd, bad string }{
				{"routes of protocol 180", "ip route show proto 180", "."},
				{"a VXLAN device", "ip -d link show type vxlan", "netagent"},
				{"NETAGENT chains", "iptables-save", "NETAGENT"},
				{"netagent nftables tables", "nft list tables", "netagent"},
			} {
				out, err := ns.Run("sh", "-c", c.cmd)
				if err != nil {
					t.Errorf("%s: %s: %v", n.Name, c.cmd, err)
				}
				if strings.Contains(out, c.bad) {
					t.Errorf("%s still has %s after cleanup:\n%s", n.Name, c.what, out)
				}
			}
			for _, dir := range []string{"/etc/cni/net.d", "/opt/cni/bin"} {
				entries, _ := os.ReadDir(k8s.HostPath(n, dir))
				for _, e := range entries {
					if strings.Contains(e.Name(), "netagent") {
						t.Errorf("%s: %s/%s left after cleanup", n.Name, dir, e.Name())
					}
				}
			}
		}
		l.kubectl("delete", "-k", filepath.Join(testbin.Root(), "manifests/cleanup"), "--wait=true")
	})
}

func applyYAML(t *testing.T, l *lab, yaml string) {
	t.Helper()
	cmd := l.c.KubectlCmd(context.Background(), "apply", "-f", "-")
	cmd.Stdin = strings.NewReader(yaml)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("kubectl apply: %v: %s", err, out)
	}
}

// upgradeUnderTraffic tags the image as next on every node and rolls it out under traffic.
func (l *lab) upgradeUnderTraffic(t *testing.T, pods []podInfo, next string) {
	ctx := context.Background()
	for _, n := range l.nodes {
		if _, err := l.c.Ctr(ctx, n, "images", "tag", "--force", k8s.NetagentImageName, next); err != nil {
			t.Fatal(err)
		}
	}
	l.underTraffic(t, pods, "the rollout of "+next, func() {
		l.kubectl("-n", "netagent", "set", "image", "daemonset/netagent", "agent="+next, "install-cni="+next)
	})
}

// underTraffic runs change (which starts a rollout of the DaemonSet) and waits for the
// rollout while a 10 ms ping runs from each pod to the next one (on another node) and a TCP
// flow from the first pod to the second. Nothing may be lost: no ping, no TCP segment, and
// the TCP flow must not stall.
func (l *lab) underTraffic(t *testing.T, pods []podInfo, what string, change func()) {
	t.Helper()
	ctx := context.Background()
	mon := l.startMonitor(ctx, t.TempDir(), pods)
	defer func() {
		mon.stop()
		if t.Failed() {
			for _, f := range mon.files {
				b, _ := os.ReadFile(f)
				t.Logf("%s:\n%s", filepath.Base(f), b)
			}
			out, _ := l.c.Kubectl(ctx, "-n", "netagent", "logs", "-l", "app.kubernetes.io/name=netagent", "--prefix", "--tail=-1")
			t.Logf("agent logs:\n%s", out)
		}
	}()
	tcp, err := l.startTCPFlow(ctx, pods[0], pods[1])
	if err != nil {
		t.Fatal(err)
	}
	// Each pod pings the next one: it sends one flow's requests and its replies, and
	// answers one flow's requests. Its kernel's ICMP counters are the measure of loss:
	// busybox ping's own count also loses replies its socket had no room for (a 7 KB
	// receive buffer, which overflows when ping is off the CPU for some tens of ms on this
	// loaded machine; /proc/net/raw's drops show it).
	nsPath := map[string]string{}
	before := map[string]map[string]int64{}
	for _, p := range pods {
		ns, err := l.podNetns(ctx, p)
		if err != nil {
			t.Fatal(err)
		}
		nsPath[p.Name] = ns.Path
		if before[p.Name], err = icmpCounters(ctx, ns.Path); err != nil {
			t.Fatal(err)
		}
	}
	var flows []*pingFlow
	for i := range pods {
		flows = append(flows, l.startPing(ctx, pods[i], pods[(i+1)%len(pods)]))
	}
	time.Sleep(2 * time.Second)
	t0 := time.Now()
	change()
	l.kubectl("-n", "netagent", "rollout", "status", "daemonset/netagent", "--timeout=180s")
	t.Logf("%s: rolled out on %d nodes in %s", what, len(l.nodes), time.Since(t0).Round(time.Millisecond))
	l.logAgentTimes(t, t0)
	time.Sleep(2 * time.Second) // traffic goes on a little after the last agent is ready
	drops := map[string]string{}
	for _, p := range pods {
		drops[p.Name] = rawDrops(ctx, nsPath[p.Name])
	}
	results := map[*pingFlow]pingResult{}
	for _, f := range flows {
		r, err := f.Stop(ctx)
		if err != nil {
			t.Errorf("%s -> %s: %v", f.a.Node, f.b.Node, err)
		}
		results[f] = r
	}
	time.Sleep(time.Second) // the last replies arrive
	delta := map[string]map[string]int64{}
	for _, p := range pods {
		after, err := icmpCounters(ctx, nsPath[p.Name])
		if err != nil {
			t.Fatal(err)
		}
		delta[p.Name] = map[string]int64{}
		for k, v := range after {
			delta[p.Name][k] = v - before[p.Name][k]
		}
	}
	for _, f := range flows {
		sent, arrived, back := delta[f.a.Name]["OutEchos"], delta[f.b.Name]["InEchos"], delta[f.a.Name]["InEchoReps"]
		r := results[f]
		t.Logf("ping %s -> %s during %s: %d requests sent, %d arrived, %d replies back (kernel counters); busybox ping: %s, its socket's drops %s",
			f.a.Node, f.b.Node, what, sent, arrived, back, r, drops[f.a.Name])
		if sent < 1000 || arrived != sent || back != sent {
			t.Errorf("%s (%s) -> %s (%s): pings lost during %s: %d requests sent, %d arrived, %d replies back; busybox ping saw %s",
				f.a.Name, f.a.Node, f.b.Name, f.b.Node, what, sent, arrived, back, r.lostAt())
		}
	}
	tcpErr := tcp.Stop()
	toServer, toClient := tcp.lost()
	t.Logf("TCP %s -> %s during %s: %d counters sent, %d echoed, longest round trip %s (counter %d); segments sent/received: client %d/%d, server %d/%d; %d retransmissions, %d of them reported as duplicates%s",
		tcp.a.Node, tcp.b.Node, what, tcp.sent, tcp.echoed, tcp.maxRTT.Round(time.Microsecond), tcp.worst,
		tcp.clientEnd.out-tcp.clientBase.out, tcp.clientEnd.in-tcp.clientBase.in, tcp.serverEnd.out-tcp.serverBase.out, tcp.serverEnd.in-tcp.serverBase.in,
		tcp.retrans, tcp.dsacks, strings.Join(append([]string{""}, tcp.events...), "; not (yet) reported as a duplicate at "))
	// Loss is conservation, as for ping: every segment either socket sent (data,
	// retransmissions, ACKs) arrived at the other. Retransmissions alone are no sign of
	// loss: tail-loss probes fire while an echo is late (scheduling on the loaded machine,
	// a few hundred ms at worst; the log has the longest round trip), and the sender's
	// kernel does not count every duplicate the receiver reports. The stall bound, 1 s, is above the
	// scheduling noise and well below what a connection stuck behind a hole in the
	// dataplane (RTOs of 200 ms doubling per loss) or a reset shows.
	const stall = time.Second
	switch {
	case tcpErr != nil:
		t.Errorf("TCP flow %s -> %s broke during %s: %v", tcp.a.Node, tcp.b.Node, what, tcpErr)
	case toServer != 0 || toClient != 0:
		t.Errorf("TCP flow %s -> %s: segments lost during %s: %d on the way to the server, %d on the way back",
			tcp.a.Node, tcp.b.Node, what, toServer, toClient)
	case tcp.maxRTT > stall:
		t.Errorf("TCP flow %s -> %s stalled %s during %s (counter %d), more than %s", tcp.a.Node, tcp.b.Node, tcp.maxRTT, what, tcp.worst, stall)
	case tcp.sent < 1000:
		t.Errorf("TCP flow %s -> %s: only %d counters during %s", tcp.a.Node, tcp.b.Node, tcp.sent, what)
	}
}

// logAgentTimes logs when each agent pod of the rollout started and became ready.
func (l *lab) logAgentTimes(t *testing.T, since time.Time) {
	out := l.kubectl("-n", "netagent", "get", "pods", "-l", "app.kubernetes.io/name=netagent", "-o",
		`jsonpath={range .items[*]}{.spec.nodeName} {.status.startTime} {.status.conditions[?(@.type=="Ready")].lastTransitionTime}{"\n"}{end}`)
	t.Logf("agent pods (node, started, ready; the rollout began %s):\n%s", since.UTC().Format(time.TimeOnly), out)
}

// checkMatrix pings every pod from every pod.
func (l *lab) checkMatrix(t *testing.T, pods []podInfo) {
	t.Helper()
	for _, a := range pods {
		for _, b := range pods {
			if _, err := l.c.Kubectl(context.Background(), "exec", a.Name, "--", "ping", "-c1", "-W2", b.IP); err != nil {
				t.Errorf("%s (%s) -> %s (%s): %v", a.Name, a.Node, b.Name, b.Node, err)
			}
		}
	}
}

// setBackend writes backend into the ConfigMap and restarts the agents (a rolling
// restart: a running agent does not apply a backend change, see agent.Run).
func (l *lab) setBackend(backend string) {
	conf := fmt.Sprintf("{\n  \"network\": \"10.244.0.0/16\",\n  \"backend\": {\"type\": %q}\n}\n", backend)
	patch, _ := json.Marshal(map[string]any{"data": map[string]string{"net-conf.json": conf}})
	l.kubectl("-n", "netagent", "patch", "configmap", "netagent-config", "--type=merge", "-p", string(patch))
	l.kubectl("-n", "netagent", "rollout", "restart", "daemonset/netagent")
}

// checkBackend checks every node runs backend: its Node says so, its routes to the other
// nodes' podCIDRs go the backend's way (host-gw and hybrid: directly, every node is
// on-link here; vxlan: through the VXLAN device), and a VXLAN device and the VXLAN
// allow-list exist exactly when the backend uses VXLAN.
func (l *lab) checkBackend(t *testing.T, backend string) {
	t.Helper()
	cidr := map[string]string{}
	for _, n := range l.nodes {
		out := l.kubectl("get", "node", n.Name, "-o", "jsonpath={.spec.podCIDR} {.metadata.annotations.netagent\\.io/backend}")
		f := strings.Fields(out)
		if len(f) != 2 || f[1] != backend {
			t.Errorf("node %s: podCIDR and netagent.io/backend = %q, want backend %s", n.Name, out, backend)
			continue
		}
		cidr[n.Name] = f[0]
	}
	vxlanDev := plan.VXLANDevName(config.DefaultVNI)
	for _, n := range l.nodes {
		ns, err := netns.Open(n.NS)
		if err != nil {
			t.Fatal(err)
		}
		routes := ns.MustRun(t, "ip", "route", "show", "proto", "180")
		for _, p := range l.nodes {
			if p == n || cidr[p.Name] == "" {
				continue
			}
			want := fmt.Sprintf("%s via %s dev eth0", cidr[p.Name], p.IP)
			if backend == config.VXLAN {
				want = fmt.Sprintf("%s via %s dev %s onlink", cidr[p.Name], strings.TrimSuffix(cidr[p.Name], "/24"), vxlanDev)
			}
			if !strings.Contains(routes, want) {
				t.Errorf("%s (%s): no route %q:\n%s", n.Name, backend, want, routes)
			}
		}
		devs := ns.MustRun(t, "ip", "-o", "link", "show", "type", "vxlan")
		tables := ns.MustRun(t, "nft", "list", "tables")
		hasDev, hasGuard := strings.Contains(devs, vxlanDev+":"), strings.Contains(tables, "table ip netagent")
		if want := backend != config.HostGW; hasDev != want || hasGuard != want || strings.Count(devs, "\n") != map[bool]int{true: 1}[want] {
			t.Errorf("%s (%s): VXLAN devices\n%s\nnftables tables\n%s\nwant the VXLAN device and allow-list: %v", n.Name, backend, devs, tables, want)
		}
	}
}

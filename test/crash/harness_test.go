// Package crash_test kills the real netagent-cni binary (SIGKILL, the plugin process only,
// as a runtime whose timeout expired does) at random points of ADD and DEL inside a
// throw-away node namespace, recovers as a container runtime would (DEL after a failed
// ADD, or CNI GC with the surviving attachments) and checks that nothing leaks: addresses,
// host veths, pod interfaces, host-port rules, and that the address store stays readable.
package crash_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/vishvananda/netlink"

	"github.com/netagent/netagent/pkg/antispoof"
	"github.com/netagent/netagent/pkg/bridge"
	"github.com/netagent/netagent/pkg/hostport"
	"github.com/netagent/netagent/pkg/ipam"
	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

func TestMain(m *testing.M) {
	netns.Sweep()
	code := m.Run()
	testbin.Cleanup()
	os.Exit(code)
}

// run is the outcome of one plugin process.
type run struct {
	killed bool          // SIGKILL arrived while the process was still running
	took   time.Duration // from exec to exit
}

// killExec is libcni's plugin exec (invoke.Exec) with a trigger: when armed for a CNI
// command, it sends SIGKILL to that plugin process delay after the process started, if it
// is still running. Only the plugin process is killed, not its children (an
// iptables-restore it started runs on), exactly as exec.CommandContext does in a runtime.
type killExec struct {
	command string // CNI_COMMAND to kill; "" kills nothing
	delay   time.Duration
	last    map[string]run // the latest run of each CNI command
}

func (e *killExec) ExecPlugin(_ context.Context, path string, stdin []byte, env []string) ([]byte, error) {
	cmd := exec.Command(path)
	cmd.Env, cmd.Stdin = env, bytes.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	start := time.Now()
	command := ""
	for _, kv := range env {
		if c, ok := strings.CutPrefix(kv, "CNI_COMMAND="); ok {
			command = c
		}
	}
	var timer *time.Timer
	if e.command != "" && e.command == command {
		// os.Process.Signal is safe against a concurrent Wait and never hits a reused pid.
		timer = time.AfterFunc(e.delay, func() { _ = cmd.Process.Signal(syscall.SIGKILL) })
	}
	err := cmd.Wait()
	r := run{took: time.Since(start)}
	if timer != nil {
		timer.Stop()
	}
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
		r.killed = true
	}
	if e.last == nil {
		e.last = map[string]run{}
	}
	e.last[command] = r
	if r.killed {
		return nil, fmt.Errorf("%s %s: killed (SIGKILL) after %s", filepath.Base(path), command, r.took)
	}
	if err != nil {
		var ce types.Error
		if json.Unmarshal(stdout.Bytes(), &ce) == nil && ce.Msg != "" {
			return nil, &ce
		}
		return nil, fmt.Errorf("%s %s: %v: %s%s", filepath.Base(path), command, err, stdout.Bytes(), stderr.Bytes())
	}
	return stdout.Bytes(), nil
}

func (e *killExec) FindInPath(plugin string, paths []string) (string, error) {
	return invoke.FindInPath(plugin, paths)
}

func (e *killExec) Decode(b []byte) (version.PluginInfo, error) {
	return (&version.PluginDecoder{}).Decode(b)
}

const (
	podSubnet  = "10.244.1.0/24"
	gateway    = "10.244.1.1"
	podSubnet6 = "fd00:244:1::/64" // dual-stack nodes only
	gateway6   = "fd00:244:1::1"
	netName    = "netagent"
)

// node is a node namespace whose runtime is libcni with the kill trigger.
type node struct {
	t       *testing.T
	ns      *netns.NS
	binDir  string
	dataDir string
	exec    *killExec
	cni     *libcni.CNIConfig
	list    *libcni.NetworkConfigList
	pods    map[*netns.NS]bool // pod namespaces not yet removed
	dual    bool               // the network is dual stack (podSubnet and podSubnet6)
}

func newNode(t *testing.T) *node { return newNodeFamily(t, false) }

// newNodeFamily is newNode for an IPv4-only or (dual) a dual-stack network.
func newNodeFamily(t *testing.T, dual bool) *node {
	t.Helper()
	netns.RequireRoot(t)
	plugin := testbin.Build(t, "./cmd/cni-plugin", "netagent-cni")
	n := &node{t: t, ns: netns.New(t, "node"), binDir: filepath.Dir(plugin), dataDir: t.TempDir(), exec: &killExec{}, pods: map[*netns.NS]bool{}, dual: dual}
	t.Cleanup(func() { // before the node namespace goes
		for ns := range n.pods {
			if err := ns.Close(); err != nil {
				t.Error(err)
			}
		}
	})
	n.cni = libcni.NewCNIConfigWithCacheDir([]string{n.binDir}, filepath.Join(n.dataDir, "cache"), n.exec)
	conf := map[string]any{
		"type": "netagent-cni", "bridge": "cni0", "subnet": podSubnet,
		"dataDir": filepath.Join(n.dataDir, "ipam"), "capabilities": map[string]bool{"portMappings": true},
	}
	if dual {
		conf["ipv6Subnet"] = podSubnet6
	}
	b, _ := json.Marshal(map[string]any{"cniVersion": "1.1.0", "name": netName, "plugins": []any{conf}})
	l, err := libcni.ConfListFromBytes(b)
	if err != nil {
		t.Fatal(err)
	}
	n.list = l
	return n
}

// pod is one attachment: a pod namespace, its container ID and host ports.
type pod struct {
	id   string
	ns   *netns.NS
	port int        // host port published (tcp -> 80), 0: none
	ip   netip.Addr // from a successful ADD
	ip6  netip.Addr // from a successful ADD on a dual-stack node
}

// addrs are the pod's addresses, IPv4 first.
func (p *pod) addrs() []netip.Addr {
	if p.ip6.IsValid() {
		return []netip.Addr{p.ip, p.ip6}
	}
	return []netip.Addr{p.ip}
}

func (n *node) newPod(id string, port int) *pod {
	n.t.Helper()
	ns, err := netns.Create("pod")
	if err != nil {
		n.t.Fatal(err)
	}
	n.pods[ns] = true
	return &pod{id: id, ns: ns, port: port}
}

// remove removes a pod's namespace (the runtime's sandbox teardown).
func (n *node) remove(p *pod) {
	n.t.Helper()
	if err := p.ns.Close(); err != nil {
		n.t.Error(err)
	}
	delete(n.pods, p.ns)
}

func (p *pod) rt() *libcni.RuntimeConf {
	rt := &libcni.RuntimeConf{ContainerID: p.id, NetNS: p.ns.Path, IfName: "eth0"}
	if p.port != 0 {
		rt.CapabilityArgs = map[string]any{"portMappings": []any{
			map[string]any{"hostPort": p.port, "containerPort": 80, "protocol": "tcp"},
		}}
	}
	return rt
}

func (p *pod) key() ipam.Key { return ipam.Key{ContainerID: p.id, IfName: "eth0"} }
func (p *pod) veth() string  { return bridge.HostVethName(p.id, "eth0") }
func (p *pod) tag() string   { return hostport.Tag(p.id, "eth0") }

// add runs ADD through libcni; the exec's trigger decides whether it is killed.
func (n *node) add(p *pod) (run, error) {
	var res types.Result
	err := n.ns.Do(func() error {
		var err error
		res, err = n.cni.AddNetworkList(context.Background(), n.list, p.rt())
		return err
	})
	r := n.exec.last["ADD"]
	if err != nil {
		return r, err
	}
	cr, err := current.NewResultFromResult(res)
	if err != nil {
		return r, err
	}
	if want := 1 + btoi(n.dual); len(cr.IPs) != want {
		return r, fmt.Errorf("ADD %s: %d IPs in the result, want %d", p.id, len(cr.IPs), want)
	}
	p.ip, _ = netip.AddrFromSlice(cr.IPs[0].Address.IP.To4())
	if n.dual {
		p.ip6, _ = netip.AddrFromSlice(cr.IPs[1].Address.IP)
	}
	return r, nil
}

func (n *node) del(p *pod) (run, error) {
	err := n.ns.Do(func() error { return n.cni.DelNetworkList(context.Background(), n.list, p.rt()) })
	return n.exec.last["DEL"], err
}

// mustAdd is an ordinary ADD (no kill).
func (n *node) mustAdd(p *pod) time.Duration {
	n.t.Helper()
	n.exec.command = ""
	r, err := n.add(p)
	if err != nil {
		n.t.Fatalf("ADD %s: %v", p.id, err)
	}
	return r.took
}

// delRetry is the runtime's DEL, retried until it succeeds (three attempts here). failed
// describes the attempts that failed; err is the last error when none succeeded.
func (n *node) delRetry(p *pod) (failed []string, err error) {
	n.exec.command = ""
	for range 3 {
		if _, err = n.del(p); err == nil {
			return failed, nil
		}
		failed = append(failed, fmt.Sprintf("DEL failed, the runtime has to retry it: %v", err))
	}
	return failed, err
}

// gc runs CNI GC through libcni with an empty cache directory, so the plugin's own GC has
// to find every stale attachment (libcni would otherwise first DEL the ones it cached).
func (n *node) gc(valid []*pod) error {
	n.exec.command = ""
	var atts []types.GCAttachment
	for _, p := range valid {
		atts = append(atts, types.GCAttachment{ContainerID: p.id, IfName: "eth0"})
	}
	c := libcni.NewCNIConfigWithCacheDir([]string{n.binDir}, n.t.TempDir(), n.exec)
	return n.ns.Do(func() error {
		return c.GCNetworkList(context.Background(), n.list, &libcni.GCArgs{ValidAttachments: atts})
	})
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// records reads the plugin's address store; an error means it is unreadable.
func (n *node) records() (map[ipam.Key]ipam.Record, []string, error) {
	s, err := ipam.Open(filepath.Join(n.dataDir, "ipam", netName))
	if err != nil {
		return nil, nil, err
	}
	recs, err := s.Records()
	if err != nil {
		return nil, nil, err
	}
	out := map[ipam.Key]ipam.Record{}
	byIP := map[netip.Addr]ipam.Key{}
	var dups []string
	for _, r := range recs {
		for _, ip := range r.Addrs() {
			if k, ok := byIP[ip]; ok {
				dups = append(dups, fmt.Sprintf("%s recorded for both %s and %s", ip, k, r.Key))
			}
			byIP[ip] = r.Key
		}
		out[r.Key] = r
	}
	return out, dups, nil
}

// hostVeths lists the node's host-side pod veths.
func (n *node) hostVeths() []string {
	n.t.Helper()
	h, err := n.ns.Handle()
	if err != nil {
		n.t.Fatal(err)
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		n.t.Fatal(err)
	}
	var out []string
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, bridge.HostVethPrefix) && l.Type() == "veth" {
			out = append(out, l.Attrs().Name)
		}
	}
	sort.Strings(out)
	return out
}

// hostPorts is what iptables-save shows of the plugin's host ports in the node.
type hostPorts struct {
	tags   map[string]int // rules per attachment tag
	chains []string       // NETAGENT-HOSTPORTS / NETAGENT-HP-POSTROUTING when they exist
	jumps  int            // rules anywhere that jump to those chains
	other  int            // rules inside those chains without a tag (the masquerade)
	dups   []string       // rule lines that appear more than once
}

func (n *node) hostPorts() hostPorts { return n.hostPortsIn("iptables-save") }

// hostPortsIn is hostPorts from save, iptables-save or ip6tables-save.
func (n *node) hostPortsIn(save string) hostPorts {
	n.t.Helper()
	out := n.ns.MustRun(n.t, save, "-t", "nat")
	hp := hostPorts{tags: map[string]int{}}
	seen := map[string]int{}
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		switch {
		case len(f) > 0 && (f[0] == ":"+hostport.Chain || f[0] == ":"+hostport.PostChain):
			hp.chains = append(hp.chains, f[0][1:])
		case len(f) > 1 && f[0] == "-A":
			seen[l]++
			if seen[l] == 2 {
				hp.dups = append(hp.dups, l)
			}
			if f[1] != hostport.Chain && f[1] != hostport.PostChain {
				if slices.Contains(f, hostport.Chain) || slices.Contains(f, hostport.PostChain) {
					hp.jumps++
				}
				continue
			}
			if i := strings.Index(l, "netagent-hp:"); i >= 0 {
				hp.tags[strings.Trim(strings.Fields(l[i:])[0], `"`)]++
			} else {
				hp.other++
			}
		}
	}
	return hp
}

// antispoofEntries lists the node's anti-spoofing set (empty when it is not installed).
func (n *node) antispoofEntries() (map[string]bool, error) {
	out := map[string]bool{}
	err := n.ns.Do(func() error {
		es, err := antispoof.List(context.Background())
		if errors.Is(err, antispoof.ErrNotInstalled) {
			return nil
		}
		for _, e := range es {
			out[e.String()] = true
		}
		return err
	})
	return out, err
}

// links lists a pod namespace's interfaces other than lo, with their IPv4 and global IPv6
// addresses.
func links(ns *netns.NS) (names []string, addrs []netip.Addr, err error) {
	h, err := ns.Handle()
	if err != nil {
		return nil, nil, err
	}
	defer h.Close()
	ls, err := h.LinkList()
	if err != nil {
		return nil, nil, err
	}
	for _, l := range ls {
		if l.Attrs().Name == "lo" {
			continue
		}
		names = append(names, l.Attrs().Name)
		as, err := h.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return nil, nil, err
		}
		for _, a := range as {
			if ip, ok := netip.AddrFromSlice(a.IP); ok && !ip.IsLinkLocalUnicast() {
				addrs = append(addrs, ip.Unmap())
			}
		}
	}
	return names, addrs, nil
}

// hasDefaultRoutes reports whether the pod has its default routes via the gateways.
func (n *node) hasDefaultRoutes(ns *netns.NS) bool {
	out, err := ns.Run("ip", "-4", "route", "show", "default")
	if err != nil || !strings.Contains(out, "via "+gateway) {
		return false
	}
	if n.dual {
		out, err = ns.Run("ip", "-6", "route", "show", "default")
		return err == nil && strings.Contains(out, "via "+gateway6)
	}
	return true
}

// waitNoProcesses waits until no process is left in the node namespace: a killed plugin's
// children (iptables-restore, iptables) run on and may still change the rules.
func (n *node) waitNoProcesses(d time.Duration) []string {
	deadline := time.Now().Add(d)
	for {
		out, _ := exec.Command("ip", "netns", "pids", n.ns.Name).Output()
		pids := strings.Fields(string(out))
		if len(pids) == 0 || time.Now().After(deadline) {
			var desc []string
			for _, p := range pids {
				b, _ := os.ReadFile("/proc/" + p + "/cmdline")
				desc = append(desc, p+" "+strings.ReplaceAll(string(b), "\x00", " "))
			}
			return desc
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

// fetch connects from inside ns to addr and returns what the server says (1 s timeout:
// everything is on one bridge, and a dead path should not stall the test).
func fetch(ns *netns.NS, addr string) (string, error) {
	var conn net.Conn
	if err := ns.Do(func() error {
		var err error
		network := "tcp4"
		if strings.HasPrefix(addr, "[") {
			network = "tcp6"
		}
		conn, err = net.DialTimeout(network, addr, time.Second)
		return err
	}); err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	b, err := io.ReadAll(conn)
	return string(b), err
}

// uniform draws a delay uniformly from [0, max).
func uniform(r *rand.Rand, max time.Duration) time.Duration {
	return time.Duration(r.Int64N(int64(max)))
}

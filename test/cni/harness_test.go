// Package cni_test drives the built netagent-cni binary through libcni, the library
// container runtimes use, from inside throw-away "node" namespaces.
package cni_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

func TestMain(m *testing.M) {
	netns.Sweep()
	code := m.Run()
	testbin.Cleanup()
	os.Exit(code)
}

// node is a node namespace with a CNI setup: plugin binary, data dir, libcni.
type node struct {
	t       *testing.T
	ns      *netns.NS
	binDir  string
	plugin  string
	dataDir string
	cni     *libcni.CNIConfig
}

func newNode(t *testing.T) *node {
	t.Helper()
	netns.RequireRoot(t)
	plugin := testbin.Build(t, "./cmd/cni-plugin", "netagent-cni")
	n := &node{
		t:       t,
		ns:      netns.New(t, "node"),
		binDir:  filepath.Dir(plugin),
		plugin:  plugin,
		dataDir: t.TempDir(),
	}
	n.cni = libcni.NewCNIConfigWithCacheDir([]string{n.binDir}, filepath.Join(n.dataDir, "cache"),
		// An explicit exec: libcni creates its default one lazily, racily under parallel use.
		&invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}, PluginDecoder: version.PluginDecoder{}})
	return n
}

// conf is the plugin section; list wraps it in a conflist of version v.
type conf map[string]any

func (n *node) list(v string, c conf) *libcni.NetworkConfigList {
	n.t.Helper()
	p := conf{"type": "netagent-cni", "dataDir": filepath.Join(n.dataDir, "ipam"), "capabilities": map[string]bool{"portMappings": true}}
	for k, val := range c {
		p[k] = val
	}
	b, err := json.Marshal(map[string]any{"cniVersion": v, "name": "netagent", "plugins": []any{p}})
	if err != nil {
		n.t.Fatal(err)
	}
	l, err := libcni.ConfListFromBytes(b)
	if err != nil {
		n.t.Fatalf("conflist %s: %v", b, err)
	}
	return l
}

type pod struct {
	ns *netns.NS
	rt *libcni.RuntimeConf
}

func (n *node) newPod(id string, ports ...map[string]any) *pod {
	n.t.Helper()
	p := netns.New(n.t, "pod")
	rt := &libcni.RuntimeConf{ContainerID: id, NetNS: p.Path, IfName: "eth0"}
	if len(ports) > 0 {
		pm := make([]any, len(ports))
		for i := range ports {
			pm[i] = ports[i]
		}
		rt.CapabilityArgs = map[string]any{"portMappings": pm}
	}
	return &pod{ns: p, rt: rt}
}

func (n *node) add(l *libcni.NetworkConfigList, p *pod) (*current.Result, error) {
	var res types.Result
	err := n.ns.Do(func() error {
		var err error
		res, err = n.cni.AddNetworkList(context.Background(), l, p.rt)
		return err
	})
	if err != nil {
		return nil, err
	}
	return current.NewResultFromResult(res)
}

func (n *node) mustAdd(l *libcni.NetworkConfigList, p *pod) *current.Result {
	n.t.Helper()
	r, err := n.add(l, p)
	if err != nil {
		n.t.Fatalf("ADD %s: %v", p.rt.ContainerID, err)
	}
	return r
}

func (n *node) del(l *libcni.NetworkConfigList, p *pod) error {
	return n.ns.Do(func() error { return n.cni.DelNetworkList(context.Background(), l, p.rt) })
}

func (n *node) check(l *libcni.NetworkConfigList, p *pod) error {
	return n.ns.Do(func() error { return n.cni.CheckNetworkList(context.Background(), l, p.rt) })
}

// exec runs the plugin binary directly (for inputs libcni would refuse to send) inside the
// node namespace and returns its stdout and exit error.
func (n *node) exec(env map[string]string, stdin string) ([]byte, error) {
	cmd := n.ns.Command(context.Background(), n.plugin)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.Stdin = strings.NewReader(stdin)
	var out strings.Builder
	cmd.Stdout = &out
	err := cmd.Run()
	return []byte(out.String()), err
}

// cniErr is an error object as printed by the plugin.
type cniErr struct {
	CNIVersion string `json:"cniVersion"`
	Code       uint   `json:"code"`
	Msg        string `json:"msg"`
	Details    string `json:"details"`
}

func podIP(t *testing.T, r *current.Result) string {
	t.Helper()
	if len(r.IPs) != 1 {
		t.Fatalf("result has %d IPs, want 1: %v", len(r.IPs), r)
	}
	return r.IPs[0].Address.IP.String()
}

// veths lists veth interfaces in the node namespace, except the test's own underlay link.
func (n *node) veths() []string {
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
		if l.Type() == "veth" && l.Attrs().Name != "eth0" && !strings.HasPrefix(l.Attrs().Name, "notabridge") {
			out = append(out, l.Attrs().Name)
		}
	}
	return out
}

// allocations reads the plugin's address store and returns the allocated IPs.
func (n *node) allocations() []string {
	n.t.Helper()
	var out []string
	for _, r := range n.records() {
		out = append(out, r.IP.String())
	}
	return out
}

// ruleCount counts iptables rules (all tables) and user chains in the node namespace.
func (n *node) ruleCount() int {
	n.t.Helper()
	out := n.ns.MustRun(n.t, "iptables-save")
	c := 0
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "-A ") || (strings.HasPrefix(l, ":") && !isBuiltin(l)) {
			c++
		}
	}
	return c
}

func isBuiltin(chainLine string) bool {
	name := strings.Fields(strings.TrimPrefix(chainLine, ":"))[0]
	switch name {
	case "PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING":
		return true
	}
	return false
}

func ping(ns *netns.NS, ip string) error {
	_, err := ns.Run("ping", "-c", "1", "-W", "2", "-q", ip)
	return err
}

// underlay gives the node an "eth0" towards an outside host namespace: node 192.0.2.10,
// host 192.0.2.20, and a route back to the pod subnet on the host.
func (n *node) underlay(podSubnet string) *netns.NS {
	n.t.Helper()
	ext := netns.New(n.t, "ext")
	if err := netns.Veth(n.ns, "eth0", ext, "eth0"); err != nil {
		n.t.Fatal(err)
	}
	if err := n.ns.AddrAdd("eth0", "192.0.2.10/24"); err != nil {
		n.t.Fatal(err)
	}
	if err := ext.AddrAdd("eth0", "192.0.2.20/24"); err != nil {
		n.t.Fatal(err)
	}
	ext.MustRun(n.t, "ip", "route", "add", podSubnet, "via", "192.0.2.10")
	return ext
}

func waitFor(d time.Duration, f func() bool) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if f() {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return f()
}

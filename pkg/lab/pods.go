package lab

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/netagent/netagent/pkg/lab/netns"
)

// cni returns libcni and the node's conflist as the agent wrote it.
func (l *Lab) cni(n *Node) (*libcni.CNIConfig, *libcni.NetworkConfigList, error) {
	list, err := libcni.LoadNetworkConf(filepath.Join(n.Dir, "net.d"), "netagent")
	if err != nil {
		return nil, nil, fmt.Errorf("%s: conflist: %w", n.Name, err)
	}
	return libcni.NewCNIConfigWithCacheDir([]string{l.Opt.CNIBinDir}, filepath.Join(n.Dir, "cni-cache"),
		// An explicit exec: libcni creates its default one lazily, racily under parallel use.
		&invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}, PluginDecoder: version.PluginDecoder{}}), list, nil
}

// AddPod creates a pod namespace on n and wires it through netagent-cni, as a runtime
// would (libcni, the agent's conflist).
func (l *Lab) AddPod(ctx context.Context, n *Node, name string) (*Pod, error) {
	return l.AddPodPorts(ctx, n, name)
}

// PortMapping is a pod's hostPort: traffic to the node's port Host goes to the pod's Pod.
type PortMapping struct {
	Host, Pod int
	Protocol  string // tcp or udp
}

// AddPodPorts is AddPod with hostPorts (the runtime's portMappings capability).
func (l *Lab) AddPodPorts(ctx context.Context, n *Node, name string, ports ...PortMapping) (*Pod, error) {
	ns, err := l.newNS(name)
	if err != nil {
		return nil, err
	}
	c, list, err := l.cni(n)
	if err != nil {
		return nil, err
	}
	var res *current.Result
	err = l.NodeNS(n).Do(func() error {
		rt := &libcni.RuntimeConf{ContainerID: name, NetNS: ns.Path, IfName: "eth0"}
		if len(ports) > 0 {
			var pm []any
			for _, p := range ports {
				pm = append(pm, map[string]any{"hostPort": p.Host, "containerPort": p.Pod, "protocol": p.Protocol})
			}
			rt.CapabilityArgs = map[string]any{"portMappings": pm}
		}
		r, err := c.AddNetworkList(ctx, list, rt)
		if err != nil {
			return err
		}
		res, err = current.NewResultFromResult(r)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("wire %s on %s: %w", name, n.Name, err)
	}
	p := &Pod{Name: name, NS: ns.Name, Node: n.Name}
	for _, c := range res.IPs {
		ip, _ := netip.AddrFromSlice(c.Address.IP)
		switch ip = ip.Unmap(); {
		case ip.Is4() && !p.IP.IsValid():
			p.IP = ip
		case ip.Is6() && !p.IP6.IsValid():
			p.IP6 = ip
		}
	}
	n.Pods = append(n.Pods, p)
	return p, nil
}

// DelPod unwires and removes a pod.
func (l *Lab) DelPod(ctx context.Context, n *Node, p *Pod) error {
	c, list, err := l.cni(n)
	if err != nil {
		return err
	}
	err = l.NodeNS(n).Do(func() error {
		return c.DelNetworkList(ctx, list, &libcni.RuntimeConf{ContainerID: p.Name, NetNS: "/run/netns/" + p.NS, IfName: "eth0"})
	})
	if err != nil {
		return err
	}
	for i, q := range n.Pods {
		if q == p {
			n.Pods = append(n.Pods[:i], n.Pods[i+1:]...)
			break
		}
	}
	return l.PodNS(p).Close()
}

// Pods lists every pod, by node then name.
func (l *Lab) Pods() []*Pod {
	var out []*Pod
	for _, n := range l.Nodes {
		out = append(out, n.Pods...)
	}
	return out
}

// Cell is one measurement of the matrix.
type Cell struct {
	From, To string
	OK       bool
}

// Matrix pings from every pod to every other pod and to the outside host, 8 at a time.
func (l *Lab) Matrix(ctx context.Context) [][]Cell {
	pods := l.Pods()
	ping := func(p *Pod, ip string) error { return Ping(l.PodNS(p), ip) }
	if l.K8s != nil {
		// Pods made by the kubelets: listed through the API, pinged through kubectl exec.
		pods, _ = l.kubePods(ctx)
		ping = func(p *Pod, ip string) error {
			_, err := l.K8s.Kubectl(ctx, "exec", p.Name, "--", "ping", "-c", "1", "-W", "2", "-q", ip)
			return err
		}
	}
	// Each family the lab has: IPv6 targets are named with a "/v6" suffix.
	targets := make([]struct{ name, ip string }, 0, 2*len(pods)+2)
	add := func(name string, a netip.Addr, v6 bool) {
		if !a.IsValid() {
			return
		}
		if v6 {
			name += "/v6"
		}
		targets = append(targets, struct{ name, ip string }{name, a.String()})
	}
	for _, p := range pods {
		add(p.Name, p.IP, false)
	}
	if l.IPFamily != "ipv6" {
		add("outside", l.Ext, false)
	}
	for _, p := range pods {
		add(p.Name, p.IP6, true)
	}
	add("outside", l.Ext6, true)
	m := make([][]Cell, len(pods))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for i, p := range pods {
		m[i] = make([]Cell, len(targets))
		for j, t := range targets {
			m[i][j] = Cell{From: p.Name, To: t.name}
			wg.Add(1)
			go func() {
				defer wg.Done()
				sem <- struct{}{}
				defer func() { <-sem }()
				m[i][j].OK = ping(p, t.ip) == nil
			}()
		}
	}
	wg.Wait()
	return m
}

// Ping sends one echo request from ns to ip and waits up to 2 s for the reply.
func Ping(ns *netns.NS, ip string) error {
	args := []string{"-c", "1", "-W", "2", "-q", ip}
	if strings.Contains(ip, ":") {
		args = append([]string{"-6"}, args...)
	}
	_, err := ns.Run("ping", args...)
	return err
}

// FormatMatrix renders a matrix as a table.
func FormatMatrix(m [][]Cell) string {
	if len(m) == 0 {
		return "(no pods)\n"
	}
	var b strings.Builder
	w := 10
	for _, row := range m {
		w = max(w, len(row[0].From)+2)
	}
	for _, c := range m[0] { // targets may be longer ("/v6")
		w = max(w, len(c.To)+2)
	}
	fmt.Fprintf(&b, "%-*s", w, "from\\to")
	for _, c := range m[0] {
		fmt.Fprintf(&b, "%-*s", w, c.To)
	}
	b.WriteString("\n")
	for _, row := range m {
		fmt.Fprintf(&b, "%-*s", w, row[0].From)
		for _, c := range row {
			mark := "ok"
			switch {
			case c.From == c.To:
				mark = "-"
			case !c.OK:
				mark = "FAIL"
			}
			fmt.Fprintf(&b, "%-*s", w, mark)
		}
		b.WriteString("\n")
	}
	return b.String()
}

// Failures lists the failed cells (a pod to itself is not measured).
func Failures(m [][]Cell) []string {
	var out []string
	for _, row := range m {
		for _, c := range row {
			if !c.OK && c.From != c.To {
				out = append(out, c.From+" -> "+c.To)
			}
		}
	}
	sort.Strings(out)
	return out
}

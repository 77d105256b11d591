// Package doctor checks a node for what usually breaks a container network, in the current
// network namespace, and says for each finding what is wrong and how to fix it. It only
// reads: nothing here changes the node.
package doctor

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	bridgepkg "github.com/netagent/netagent/pkg/bridge"
	"github.com/netagent/netagent/pkg/nat"
	"github.com/netagent/netagent/pkg/nldump"
	"github.com/netagent/netagent/pkg/subnetfile"
)

// Severity of a finding.
type Severity string

const (
	OK      Severity = "ok"
	Warn    Severity = "warn"
	Problem Severity = "PROBLEM"
)

// Finding is one check's verdict.
type Finding struct {
	Check    string
	Severity Severity
	What     string
	Fix      string
}

// Options say where things are.
type Options struct {
	SubnetFile string
	CNIConfDir string
	CNIBinDir  string
	Bridge     string
	Underlay   string // "" = the default route's interface
	// RouteMode is a Docker host (netagent route-mode): no CNI files; the bridge is
	// Docker's; netagent's FORWARD jump sits below Docker's.
	RouteMode bool
	// Status is the agent's /status as JSON (nil when the agent did not answer).
	Status []byte
}

// Run runs every check.
func Run(o Options) []Finding {
	var out []Finding
	add := func(f Finding) { out = append(out, f) }
	fix := "sysctl -w net.ipv4.ip_forward=1 (netagent run sets it at start)"
	if o.RouteMode {
		fix = "start dockerd (it turns forwarding on, with FORWARD policy DROP), or sysctl -w net.ipv4.ip_forward=1"
	}
	add(sysctl("ip_forward", "/proc/sys/net/ipv4/ip_forward", "1",
		"net.ipv4.ip_forward is %s: this node does not forward pod traffic", fix))
	h, err := netlink.NewHandle()
	if err != nil {
		add(Finding{"netlink", Problem, err.Error(), "run as root"})
		return out
	}
	defer h.Close()
	underlay := o.Underlay
	if underlay == "" {
		if rs, err := h.RouteGet(netip.MustParseAddr("192.0.2.0").AsSlice()); err == nil && len(rs) > 0 {
			if l, err := h.LinkByIndex(rs[0].LinkIndex); err == nil {
				underlay = l.Attrs().Name
			}
		}
	}
	for _, dev := range []string{"all", underlay} {
		if dev == "" {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc/sys/net/ipv4/conf", dev, "rp_filter"))
		if err == nil && strings.TrimSpace(string(b)) == "1" {
			add(Finding{"rp_filter", Warn, fmt.Sprintf("rp_filter is strict (1) on %s: replies that come back another way (hybrid, asymmetric routing) are dropped", dev),
				fmt.Sprintf("sysctl -w net.ipv4.conf.%s.rp_filter=2", dev)})
		}
	}
	out = append(out, firewall(o.RouteMode)...)
	info, ierr := subnetfile.Read(o.SubnetFile)
	switch {
	case ierr != nil:
		add(Finding{"subnet file", Problem, fmt.Sprintf("%s: %v", o.SubnetFile, ierr), "start netagent run on this node; it writes the file once it holds a lease"})
	default:
		add(Finding{"subnet file", OK, fmt.Sprintf("%s: subnet %s, MTU %d", o.SubnetFile, info.Subnet, info.MTU), ""})
	}
	if !o.RouteMode {
		found, subnet6 := conflist(o)
		out = append(out, found...)
		if subnet6.IsValid() {
			out = append(out, ipv6(h, o.Underlay, underlay, o.RouteMode)...)
		}
	}
	if ierr == nil {
		out = append(out, mtus(h, o.Bridge, underlay, info)...)
	}
	out = append(out, peers(o.Status)...)
	return out
}

func sysctl(check, path, want, what, fix string) Finding {
	b, err := os.ReadFile(path)
	if err != nil {
		return Finding{check, Warn, fmt.Sprintf("cannot read %s: %v", path, err), ""}
	}
	v := strings.TrimSpace(string(b))
	if v != want {
		return Finding{check, Problem, fmt.Sprintf(what, v), fix}
	}
	return Finding{check, OK, fmt.Sprintf("%s = %s", filepath.Base(path), v), ""}
}

func firewall(routeMode bool) []Finding {
	var out []Finding
	ver, err := exec.Command("iptables", "--version").Output()
	if err != nil {
		return []Finding{{"iptables", Problem, "iptables is not installed", "apt-get install iptables"}}
	}
	mode := "legacy"
	if strings.Contains(string(ver), "nf_tables") {
		mode = "nf_tables"
	}
	other := "iptables-legacy-save"
	if mode == "legacy" {
		other = "iptables-nft-save"
	}
	if b, err := exec.Command(other).Output(); err == nil && strings.Contains(string(b), "\n-A ") {
		out = append(out, Finding{"iptables backend", Problem,
			fmt.Sprintf("iptables here is %s, but %s also holds rules: rules are split across two firewalls and one of them is ignored by the tools you look with", mode, strings.TrimSuffix(other, "-save")),
			"use one variant on the node (update-alternatives --set iptables ...) and move the other's rules over"})
	} else {
		out = append(out, Finding{"iptables backend", OK, "iptables " + mode + " only", ""})
	}
	return append(out, forward("iptables", routeMode))
}

// forward checks the FORWARD chain of one family's firewall (tool is iptables or
// ip6tables): with policy DROP, pod traffic between nodes passes only through netagent's
// accept chain, which must be hooked in where the agent puts it.
func forward(tool string, routeMode bool) Finding {
	check, traffic := "FORWARD", "pod traffic"
	if tool == "ip6tables" {
		check, traffic = "IPv6 FORWARD", "pod IPv6 traffic"
	}
	fwd, err := exec.Command(tool, "-S", "FORWARD").Output()
	if err != nil {
		return Finding{check, Warn, "cannot read the FORWARD chain: " + err.Error(), ""}
	}
	lines := strings.Split(strings.TrimSpace(string(fwd)), "\n")
	policy := strings.TrimPrefix(lines[0], "-P FORWARD ")
	ours := -1
	var others []string
	for i, l := range lines[1:] {
		if strings.Contains(l, "-j "+nat.FwdChain) {
			if ours < 0 {
				ours = i
			}
			continue
		}
		others = append(others, strings.TrimPrefix(l, "-A FORWARD "))
	}
	at := nat.ForwardSlot(others, routeMode)
	where := "first"
	if routeMode {
		where = "right below Docker's DOCKER-USER and isolation jumps"
	}
	switch {
	case ours < 0 && policy == "DROP":
		return Finding{check, Problem, fmt.Sprintf("%s policy is DROP and netagent's accept chain is not hooked in: %s between nodes is dropped", check, traffic), "start netagent (it inserts -j " + nat.FwdChain + " " + where + ")"}
	case ours < 0:
		return Finding{check, Warn, fmt.Sprintf("netagent's accept chain is not hooked into %s (policy ACCEPT, so traffic passes for now)", check), "start netagent"}
	case ours != at:
		return Finding{check, Problem, fmt.Sprintf("netagent's accept rule is rule %d in %s, not %s (rule %d): rules above it may drop %s, or it may bypass them", ours+1, check, where, at+1, traffic), "restart netagent (it moves its jump back within a second)"}
	default:
		return Finding{check, OK, "policy " + policy + ", netagent's accept chain " + where, ""}
	}
}

// CNIConfig is what the CNI config a runtime uses says about netagent.
type CNIConfig struct {
	Path  string   // the file: the first .conflist or .conf in the directory
	Types []string // its plugins' types, in order
	// Netagent: one of them is netagent-cni; IPv6Subnet is that one's ipv6Subnet as
	// written ("" on an IPv4-only network).
	Netagent   bool
	IPv6Subnet string
}

// ErrNoCNIConfig means the directory holds no CNI config file.
var ErrNoCNIConfig = errors.New("no CNI config")

// ReadCNIConfig reads the file a runtime uses from dir: the first .conflist or .conf in
// lexical order.
func ReadCNIConfig(dir string) (CNIConfig, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return CNIConfig{}, err
	}
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".conflist") && !strings.HasSuffix(e.Name(), ".conf") {
			continue
		}
		c := CNIConfig{Path: filepath.Join(dir, e.Name())}
		b, err := os.ReadFile(c.Path)
		if err != nil {
			return c, err
		}
		type plugin struct {
			Type       string `json:"type"`
			IPv6Subnet string `json:"ipv6Subnet"`
		}
		var cl struct {
			Plugins []plugin `json:"plugins"`
			plugin           // a .conf is one plugin
		}
		if err := json.Unmarshal(b, &cl); err != nil {
			return c, fmt.Errorf("%s is not valid JSON: %w", c.Path, err)
		}
		for _, p := range append(cl.Plugins, cl.plugin) {
			if p.Type == "" {
				continue
			}
			c.Types = append(c.Types, p.Type)
			if p.Type == "netagent-cni" && !c.Netagent {
				c.Netagent, c.IPv6Subnet = true, p.IPv6Subnet
			}
		}
		return c, nil
	}
	return CNIConfig{}, fmt.Errorf("%w in %s", ErrNoCNIConfig, dir)
}

// conflist checks that the runtime's CNI config calls our plugin, and returns the IPv6
// subnet it gives the plugin (invalid when the network is IPv4-only).
func conflist(o Options) ([]Finding, netip.Prefix) {
	var none netip.Prefix
	if o.CNIConfDir == "" {
		return nil, none
	}
	c, err := ReadCNIConfig(o.CNIConfDir)
	switch {
	case errors.Is(err, ErrNoCNIConfig):
		return []Finding{{"CNI config", Problem, err.Error(), "netagent run writes one once it holds a lease and has reconciled"}}, none
	case err != nil && c.Path == "":
		return []Finding{{"CNI config", Problem, err.Error(), "netagent run writes it once ready; check --cni-conf-dir"}}, none
	case err != nil:
		return []Finding{{"CNI config", Problem, err.Error(), "remove it; netagent run rewrites its own"}}, none
	case !c.Netagent:
		return []Finding{{"CNI config", Problem, fmt.Sprintf("the runtime uses %s (first in %s), which does not call netagent-cni (%v)", filepath.Base(c.Path), o.CNIConfDir, c.Types), "remove or rename the other network's config"}}, none
	}
	var out []Finding
	subnet6, err := netip.ParsePrefix(c.IPv6Subnet)
	switch {
	case c.IPv6Subnet == "":
		out = append(out, Finding{"CNI config", OK, c.Path + " calls netagent-cni", ""})
	case err != nil || !subnet6.Addr().Is6():
		out = append(out, Finding{"CNI config", Problem, fmt.Sprintf("%s: ipv6Subnet %q is not an IPv6 prefix: the plugin refuses every pod", c.Path, c.IPv6Subnet), "netagent run rewrites its own config; remove the file if it is not netagent's"})
		subnet6 = none
	default:
		out = append(out, Finding{"CNI config", OK, fmt.Sprintf("%s calls netagent-cni, IPv6 subnet %s", c.Path, subnet6), ""})
	}
	if o.CNIBinDir != "" {
		if _, err := os.Stat(filepath.Join(o.CNIBinDir, "netagent-cni")); err != nil {
			out = append(out, Finding{"CNI binary", Problem, fmt.Sprintf("netagent-cni is not in %s", o.CNIBinDir), "install it there (the DaemonSet's init container does)"})
		}
	}
	return out, subnet6
}

// ipv6 checks what pod IPv6 traffic needs of a node: forwarding, router advertisements
// still accepted on the uplink while forwarding, and a FORWARD chain that lets it through.
// iface is the --iface flag, underlay the IPv4 uplink found otherwise.
func ipv6(h *netlink.Handle, iface, underlay string, routeMode bool) []Finding {
	out := []Finding{sysctl("IPv6 forwarding", "/proc/sys/net/ipv6/conf/all/forwarding", "1",
		"net.ipv6.conf.all.forwarding is %s: this node does not forward pod IPv6 traffic",
		"sysctl -w net.ipv6.conf.all.forwarding=1 (after accept_ra=2 on the uplink, or the uplink's RA-learned default route is dropped)")}
	dev := iface
	if dev == "" {
		dev = underlay
		if rs, err := h.RouteGet(netip.MustParseAddr("2001:db8::").AsSlice()); err == nil && len(rs) > 0 {
			if l, err := h.LinkByIndex(rs[0].LinkIndex); err == nil {
				dev = l.Attrs().Name
			}
		}
	}
	if dev != "" {
		out = append(out, acceptRA(h, dev))
	}
	return append(out, forward("ip6tables", routeMode))
}

// acceptRA checks that the uplink dev keeps learning its IPv6 default route from router
// advertisements on a forwarding node. The kernel ignores RAs on a forwarding interface
// unless accept_ra is 2, and switching forwarding on drops the default routes RAs taught
// on interfaces where it is not 2; a node with accept_ra 1 thus loses its IPv6 default
// route as soon as it forwards, unless that route is configured statically.
func acceptRA(h *netlink.Handle, dev string) Finding {
	path := filepath.Join("/proc/sys/net/ipv6/conf", dev, "accept_ra")
	b, err := os.ReadFile(path)
	if err != nil {
		return Finding{"accept_ra", Warn, fmt.Sprintf("cannot read %s: %v", path, err), ""}
	}
	switch v := strings.TrimSpace(string(b)); {
	case v == "2":
		return Finding{"accept_ra", OK, fmt.Sprintf("accept_ra = 2 on %s: router advertisements still count while forwarding", dev), ""}
	case v == "0":
		return Finding{"accept_ra", OK, fmt.Sprintf("accept_ra = 0 on %s: IPv6 is configured without router advertisements", dev), ""}
	case staticDefault6(h):
		return Finding{"accept_ra", OK, fmt.Sprintf("accept_ra = %s on %s, but the IPv6 default route is static: router advertisements are not needed", v, dev), ""}
	default:
		return Finding{"accept_ra", Problem,
			fmt.Sprintf("accept_ra is %s on %s: with IPv6 forwarding on, the kernel ignores router advertisements unless accept_ra is 2 (and drops the default routes they taught when forwarding is switched on), so this node loses its IPv6 default route", v, dev),
			fmt.Sprintf("sysctl -w net.ipv6.conf.%s.accept_ra=2 (the route comes back with the next router advertisement)", dev)}
	}
}

// staticDefault6 reports whether the main table has an IPv6 default route that did not
// come from a router advertisement.
func staticDefault6(h *netlink.Handle) bool {
	rs, err := nldump.Retry(func() ([]netlink.Route, error) { return h.RouteList(nil, netlink.FAMILY_V6) })
	if err != nil {
		return false
	}
	for _, r := range rs {
		if r.Dst != nil {
			if ones, _ := r.Dst.Mask.Size(); ones != 0 {
				continue
			}
		}
		if r.Protocol != unix.RTPROT_RA && r.Type == unix.RTN_UNICAST {
			return true
		}
	}
	return false
}

func mtus(h *netlink.Handle, bridge, underlay string, info subnetfile.Info) []Finding {
	var out []Finding
	if underlay != "" {
		if l, err := h.LinkByName(underlay); err == nil && info.MTU > l.Attrs().MTU {
			out = append(out, Finding{"MTU", Problem, fmt.Sprintf("pod MTU %d is larger than the underlay's (%s: %d): large packets are dropped", info.MTU, underlay, l.Attrs().MTU), "set mtu in the network config (netagent config set --mtu) or fix the underlay"})
		}
	}
	links, err := nldump.Retry(h.LinkList)
	if err != nil {
		return out
	}
	var br netlink.Link
	for _, l := range links {
		if l.Attrs().Name == bridge {
			br = l
		}
	}
	if br != nil && br.Attrs().MTU < info.MTU {
		// Packets routed into the bridge are cut to its MTU: full-size ones with DF set
		// (pings of the pod MTU, PMTU-discovering TCP) are dropped.
		out = append(out, Finding{"MTU", Problem, fmt.Sprintf("bridge %s has MTU %d, lower than the pod MTU %d: full-size packets to pods are dropped", bridge, br.Attrs().MTU, info.MTU),
			fmt.Sprintf("ip link set %s mtu %d", bridge, info.MTU)})
	}
	bad := 0
	for _, l := range links {
		// A bridged pod's host veth is on the bridge; a routed pod's has no master.
		onBridge := br != nil && l.Attrs().MasterIndex == br.Attrs().Index
		routed := l.Attrs().MasterIndex == 0 && strings.HasPrefix(l.Attrs().Name, bridgepkg.HostVethPrefix)
		if (onBridge || routed) && l.Type() == "veth" && l.Attrs().MTU != info.MTU {
			bad++
		}
		if v, ok := l.(*netlink.Vxlan); ok && underlay != "" {
			if u, err := h.LinkByName(underlay); err == nil && v.Attrs().MTU > u.Attrs().MTU-50 {
				out = append(out, Finding{"MTU", Problem, fmt.Sprintf("VXLAN device %s has MTU %d, more than the underlay's %d minus 50", v.Attrs().Name, v.Attrs().MTU, u.Attrs().MTU), "restart netagent run"})
			}
		}
	}
	switch {
	case bad > 0:
		out = append(out, Finding{"MTU", Warn, fmt.Sprintf("%d pods' host veths (on %s, or routed) have an MTU other than the subnet file's %d (pods created before an MTU change)", bad, bridge, info.MTU), "recreate those pods"})
	case len(out) == 0:
		out = append(out, Finding{"MTU", OK, fmt.Sprintf("pod MTU %d consistent", info.MTU), ""})
	}
	return out
}

func peers(status []byte) []Finding {
	if status == nil {
		return []Finding{{"agent", Warn, "the agent did not answer (is netagent run running here, with --listen?)", ""}}
	}
	var st struct {
		Ready bool `json:"ready"`
		Peers []struct {
			Node, Mode, Reason string
			Route              bool
			FDB, Neigh, WG     *bool
		} `json:"peers"`
		WireGuard *struct {
			Device, Implementation, Reason string
		} `json:"wireguard"`
	}
	if err := json.Unmarshal(status, &st); err != nil {
		return []Finding{{"agent", Warn, "unreadable status: " + err.Error(), ""}}
	}
	var out []Finding
	if g := st.WireGuard; g != nil {
		out = append(out, Finding{"wireguard", OK, fmt.Sprintf("device %s: %s WireGuard, because: %s", g.Device, g.Implementation, g.Reason), ""})
	}
	missing := 0
	for _, p := range st.Peers {
		switch {
		case p.Mode == "unreachable":
			out = append(out, Finding{"peer " + p.Node, Problem, "unreachable: " + p.Reason, ""})
		case !p.Route || (p.FDB != nil && !*p.FDB) || (p.Neigh != nil && !*p.Neigh) || (p.WG != nil && !*p.WG):
			missing++
			out = append(out, Finding{"peer " + p.Node, Problem, "route, FDB, neighbour entry or WireGuard peer missing", "the agent repairs this within a second; if it stays, see its log"})
		}
	}
	if missing == 0 {
		out = append(out, Finding{"peers", OK, fmt.Sprintf("%d peers programmed (ready: %v)", len(st.Peers), st.Ready), ""})
	}
	return out
}

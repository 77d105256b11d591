package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/netagent/netagent/pkg/antispoof"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/vishvananda/netlink"

	"github.com/netagent/netagent/pkg/ipam"
	"github.com/netagent/netagent/test/bench/barework"
	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

const podIf = "eth0"

// Each chain has its own bridge and subnet (on its own node namespace, so they could share
// them, but distinct ones make a stray packet or a leak easy to attribute).
const (
	oursBridge, oursSubnet     = "cni0", "10.244.0.0/22"
	refBridge, refSubnet       = "cni1", "10.245.0.0/22"
	bareBridge, bareSubnet     = "cni2", "10.246.0.0/22"
	floorBridge, floorSubnet   = "cni3", "10.247.0.0/22"
	ours4Bridge, ours4Subnet   = "cni4", "10.248.0.0/22" // dual-stack runs: ours, IPv4 only
	floor4Bridge, floor4Subnet = "cni5", "10.249.0.0/22" // dual-stack runs: the floor, IPv4 only

	// The IPv6 subnets of a dual-stack run.
	oursSubnet6  = "fd00:244::/64"
	refSubnet6   = "fd00:245::/64"
	bareSubnet6  = "fd00:246::/64"
	floorSubnet6 = "fd00:247::/64"
)

// prefixes parses the non-empty subnets.
func prefixes(subnets ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range subnets {
		if s != "" {
			out = append(out, netip.MustParsePrefix(s))
		}
	}
	return out
}

// v6Field is `,"key":"value"` for a value (an IPv6 subnet, a podInterface), and nothing for "".
func v6Field(key, subnet6 string) string {
	if subnet6 == "" {
		return ""
	}
	return fmt.Sprintf(",%q:%q", key, subnet6)
}

// floorConf is the floor plugin's network (test/bench/floorcni): the bridge is made by
// the bench, the address comes from CNI_ARGS. subnet6 (optional) makes it dual stack.
func floorConf(bridge, subnet, subnet6 string) []byte {
	return fmt.Appendf(nil, `{"cniVersion":"1.0.0","name":"floor","plugins":[`+
		`{"type":"netagent-bench-floor","bridge":%q,"subnet":%q%s,"capabilities":{"portMappings":true}}]}`,
		bridge, subnet, v6Field("ipv6Subnet", subnet6))
}

// oursConf is our plugin's network, its store below tmp/label; subnet6 (optional) makes it
// dual stack, podIface (optional) sets its podInterface.
func oursConf(tmp, label, bridge, subnet, subnet6, podIface string) []byte {
	return fmt.Appendf(nil, `{"cniVersion":"1.0.0","name":"netagent","plugins":[`+
		`{"type":"netagent-cni","bridge":%q,"subnet":%q%s%s,"dataDir":%s,"capabilities":{"portMappings":true}}]}`,
		bridge, subnet, v6Field("ipv6Subnet", subnet6), v6Field("podInterface", podIface), jsonString(filepath.Join(tmp, label)))
}

// refConf is the reference chain; with subnet6, host-local hands out an address from each
// of two ranges (IPv4 and IPv6), the reference plugins' way of dual stack.
func refConf(tmp string, ipMasq bool, subnet6 string) []byte {
	ranges := fmt.Sprintf(`"subnet":%q`, refSubnet)
	if subnet6 != "" {
		ranges = fmt.Sprintf(`"ranges":[[{"subnet":%q}],[{"subnet":%q}]]`, refSubnet, subnet6)
	}
	return fmt.Appendf(nil, `{"cniVersion":"1.0.0","name":"ref","plugins":[`+
		`{"type":"bridge","bridge":%q,"isGateway":true,"ipMasq":%t,"ipam":{"type":"host-local",%s,"dataDir":%s}},`+
		`{"type":"portmap","capabilities":{"portMappings":true}}]}`,
		refBridge, ipMasq, ranges, jsonString(filepath.Join(tmp, "ref")))
}

func jsonString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// containerID is a fresh 64-hex-digit ID, the shape runtimes use.
func containerID() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// buildBinaries builds our plugin and the reference chain into one directory (testbin's),
// which serves as the CNI bin dir.
// The reference plugins and loopback are built from containernetworking/plugins at
// refVersion (in the throw-away module file, so go.mod is not changed).
func buildBinaries(tmp, refVersion string) (string, error) {
	if _, err := testbin.BuildErr("./cmd/cni-plugin", "netagent-cni"); err != nil {
		return "", fmt.Errorf("build our plugin: %w", err)
	}
	restore, err := refModfile(tmp)
	if err != nil {
		return "", err
	}
	defer restore()
	get := exec.Command("go", "get", "github.com/containernetworking/plugins@"+refVersion)
	get.Dir = testbin.Root()
	if out, err := get.CombinedOutput(); err != nil {
		return "", fmt.Errorf("reference plugins %s: %w\n%s", refVersion, err, out)
	}
	if _, err := testbin.BuildErr("./test/bench/floorcni", "netagent-bench-floor"); err != nil {
		return "", fmt.Errorf("build the floor plugin: %w", err)
	}
	for _, p := range []struct{ pkg, name string }{
		{"github.com/containernetworking/plugins/plugins/main/bridge", "bridge"},
		{"github.com/containernetworking/plugins/plugins/ipam/host-local", "host-local"},
		{"github.com/containernetworking/plugins/plugins/meta/portmap", "portmap"},
		{"github.com/containernetworking/plugins/plugins/main/loopback", "loopback"},
	} {
		if _, err := testbin.BuildErr(p.pkg, p.name); err != nil {
			return "", fmt.Errorf("build reference plugin %s: %w", p.name, err)
		}
	}
	return testbin.Dir(), nil
}

// refModfile points the go command (through GOFLAGS, which testbin's builds inherit) at a
// copy of go.mod and go.sum that it may extend: the reference plugins import modules that
// the repository's go.sum does not list, since netagent itself never imports them. Versions
// are still the ones go.mod selects. restore puts GOFLAGS back.
func refModfile(tmp string) (restore func(), err error) {
	dir := filepath.Join(tmp, "modfile")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	root := testbin.Root()
	for src, dst := range map[string]string{"go.mod": "ref.mod", "go.sum": "ref.sum"} {
		b, err := os.ReadFile(filepath.Join(root, src))
		if err != nil {
			return nil, err
		}
		if err := os.WriteFile(filepath.Join(dir, dst), b, 0o644); err != nil {
			return nil, err
		}
	}
	// Keep GOFLAGS from the go env file too (setting the variable would hide it).
	cmd := exec.Command("go", "env", "GOFLAGS")
	cmd.Dir = root
	cur, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("go env GOFLAGS: %w", err)
	}
	old, had := os.LookupEnv("GOFLAGS")
	flags := strings.TrimSpace(string(cur) + " -mod=mod -modfile=" + filepath.Join(dir, "ref.mod"))
	if err := os.Setenv("GOFLAGS", flags); err != nil {
		return nil, err
	}
	return func() {
		if had {
			_ = os.Setenv("GOFLAGS", old)
		} else {
			_ = os.Unsetenv("GOFLAGS")
		}
	}, nil
}

func cleanupBinaries() { testbin.Cleanup() }

// loConf is the loopback network containerd's CRI (go-cni) sets up in every pod besides
// the configured one.
const loConf = `{"cniVersion":"0.3.1","name":"cni-loopback","plugins":[{"type":"loopback"}]}`

// cniRunner drives one conflist through libcni, as a runtime does. With lo set it does
// what containerd's CRI does for a pod (go-cni): ADD of the loopback network concurrently
// with the pod network's, DEL of both one after the other, and the portMappings capability
// always passed (an empty list for a pod that publishes none).
type cniRunner struct {
	label   string
	ns      *netns.NS
	cni     *libcni.CNIConfig
	list    *libcni.NetworkConfigList
	lo      *libcni.NetworkConfigList
	conf    []byte
	timeout time.Duration

	// leak checks
	cacheDir string
	records  func() (int, error) // IPAM allocations still recorded
	iptables bool                // look for CNI-* chains in the node's nat table
	idxArg   bool                // pass the pod's index as CNI_ARGS IDX (the floor plugin's address)
}

func (b *bench) newCNIRunner(label, binDir string, conf []byte) (*cniRunner, error) {
	list, err := libcni.NetworkConfFromBytes(conf)
	if err != nil {
		return nil, fmt.Errorf("%s conflist: %w", label, err)
	}
	node, err := b.newNS("node-" + label)
	if err != nil {
		return nil, err
	}
	// A cache dir of our own: libcni writes a result file per attachment (as it does under
	// /var/lib/cni for a runtime), and the host's must not collect ours. The exec is given
	// explicitly because libcni creates its default lazily, which races in parallel use.
	cacheDir := filepath.Join(b.tmp, "cache-"+label)
	ex := &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}, PluginDecoder: version.PluginDecoder{}}
	r := &cniRunner{
		label:    label,
		ns:       node,
		cni:      libcni.NewCNIConfigWithCacheDir([]string{binDir}, cacheDir, ex),
		list:     list,
		conf:     conf,
		timeout:  b.opt.timeout,
		cacheDir: cacheDir,
	}
	if b.opt.pod {
		if r.lo, err = libcni.NetworkConfFromBytes([]byte(loConf)); err != nil {
			return nil, err
		}
	}
	return r, nil
}

func (r *cniRunner) name() string    { return r.label }
func (r *cniRunner) node() *netns.NS { return r.ns }

func (r *cniRunner) rt(p pod) *libcni.RuntimeConf {
	rt := &libcni.RuntimeConf{ContainerID: p.id, NetNS: p.ns.Path, IfName: podIf}
	if r.idxArg {
		rt.Args = [][2]string{{"IDX", strconv.Itoa(p.idx)}}
	}
	if r.lo != nil {
		rt.CapabilityArgs = map[string]any{"portMappings": []any{}}
	}
	return rt
}

func (r *cniRunner) loRT(p pod) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{ContainerID: p.id, NetNS: p.ns.Path, IfName: "lo"}
}

func (r *cniRunner) add(ctx context.Context, p pod) error {
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	loDone := make(chan error, 1)
	if r.lo != nil {
		// On a thread of its own inside the node namespace: a plugin process inherits the
		// namespace of the thread that starts it.
		go func() {
			loDone <- r.ns.Do(func() error {
				_, err := r.cni.AddNetworkList(ctx, r.lo, r.loRT(p))
				return err
			})
		}()
	} else {
		loDone <- nil
	}
	_, err := r.cni.AddNetworkList(ctx, r.list, r.rt(p))
	if lerr := <-loDone; lerr != nil {
		err = errors.Join(err, fmt.Errorf("loopback: %w", lerr))
	}
	if err != nil {
		return fmt.Errorf("%s: ADD container %s netns %s: %w\nconflist: %s", r.label, p.id, p.ns.Path, err, r.conf)
	}
	return nil
}

func (r *cniRunner) del(ctx context.Context, p pod) error {
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	if r.lo != nil {
		if err := r.cni.DelNetworkList(ctx, r.lo, r.loRT(p)); err != nil {
			return fmt.Errorf("%s: DEL loopback of container %s: %w", r.label, p.id, err)
		}
	}
	if err := r.cni.DelNetworkList(ctx, r.list, r.rt(p)); err != nil {
		return fmt.Errorf("%s: DEL container %s netns %s: %w\nconflist: %s", r.label, p.id, p.ns.Path, err, r.conf)
	}
	return nil
}

func (r *cniRunner) leaks() ([]string, error) {
	out, err := nodeVeths(r.ns)
	if err != nil {
		return nil, err
	}
	if r.records != nil {
		n, err := r.records()
		if err != nil {
			return nil, err
		}
		if n > 0 {
			out = append(out, fmt.Sprintf("%d IPAM allocations still recorded", n))
		}
	}
	var spoof []antispoof.Entry
	if err := r.ns.Do(func() (err error) { spoof, err = antispoof.List(context.Background()); return err }); err != nil && !errors.Is(err, antispoof.ErrNotInstalled) {
		return nil, err
	}
	if len(spoof) > 0 {
		out = append(out, fmt.Sprintf("%d anti-spoofing entries left", len(spoof)))
	}
	var chains []string // routed pods' anti-spoofing chains
	if err := r.ns.Do(func() (err error) { chains, err = antispoof.RoutedChains(context.Background()); return err }); err != nil {
		return nil, err
	}
	if len(chains) > 0 {
		out = append(out, fmt.Sprintf("%d routed pods' anti-spoofing chains left", len(chains)))
	}
	entries, err := os.ReadDir(filepath.Join(r.cacheDir, "results"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	if len(entries) > 0 {
		out = append(out, fmt.Sprintf("%d libcni cache entries left", len(entries)))
	}
	if r.iptables {
		for _, save := range []string{"iptables-save", "ip6tables-save"} {
			nat, err := r.ns.Run(save, "-t", "nat")
			if err != nil {
				return nil, err
			}
			var n int
			for _, l := range strings.Split(nat, "\n") {
				if strings.Contains(l, "CNI-") {
					n++
				}
			}
			if n > 0 {
				out = append(out, fmt.Sprintf("%d nat table lines mentioning CNI- chains (%s)", n, save))
			}
		}
	}
	return out, nil
}

// nodeVeths describes the veths left in a node namespace (every one is a pod's host end).
func nodeVeths(node *netns.NS) ([]string, error) {
	h, err := node.Handle()
	if err != nil {
		return nil, err
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links in %s: %w", node.Name, err)
	}
	var names []string
	for _, l := range links {
		if _, ok := l.(*netlink.Veth); ok {
			names = append(names, l.Attrs().Name)
		}
	}
	n := len(names)
	if n == 0 {
		return nil, nil
	}
	if n > 5 {
		names = append(names[:5], "...")
	}
	return []string{fmt.Sprintf("%d veths left on the node (%s)", n, strings.Join(names, " "))}, nil
}

// oursRecords counts the allocations in our IPAM store (dataDir/NETWORK).
func oursRecords(dir string) (int, error) {
	if !ipam.IsStore(dir) {
		return 0, nil
	}
	s, err := ipam.Open(dir)
	if err != nil {
		return 0, err
	}
	recs, err := s.Records()
	return len(recs), err
}

// hostLocalRecords counts host-local's allocations: one file per address, named by it.
func hostLocalRecords(dir string) (int, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	var n int
	for _, e := range entries {
		if _, err := netip.ParseAddr(e.Name()); err == nil {
			n++
		}
	}
	return n, nil
}

// bareRunner does the kernel work of a pod attachment (barework) directly through netlink
// from this process: no exec, no JSON, no IPAM, no lock. It is the floor under any plugin.
type bareRunner struct {
	ns      *netns.NS
	bridge  string
	subnets []netip.Prefix // one per family
}

func (b *bench) newBareRunner(subnets []netip.Prefix) (*bareRunner, error) {
	node, err := b.newNS("node-bare")
	if err != nil {
		return nil, err
	}
	r := &bareRunner{ns: node, bridge: bareBridge, subnets: subnets}
	if err := setupBridge(node, r.bridge, r.subnets...); err != nil {
		return nil, fmt.Errorf("bare: %w", err)
	}
	return r, nil
}

// setupBridge creates a pod bridge in node for the chains whose plugin does not.
func setupBridge(node *netns.NS, bridge string, subnets ...netip.Prefix) error {
	h, err := node.Handle()
	if err != nil {
		return err
	}
	defer h.Close()
	return barework.Setup(h, bridge, subnets...)
}

func (r *bareRunner) name() string    { return "bare" }
func (r *bareRunner) node() *netns.NS { return r.ns }

func (r *bareRunner) hostVeth(p pod) string { return fmt.Sprintf("bv%d", p.idx) }

// add runs on a thread inside the node namespace, so a plain netlink handle is in it.
func (r *bareRunner) add(_ context.Context, p pod) error {
	var addrs []netip.Prefix
	for _, s := range r.subnets {
		a, err := barework.Addr(s, p.idx)
		if err != nil {
			return err
		}
		addrs = append(addrs, a)
	}
	if _, err := barework.Attach(p.ns.Path, r.bridge, r.hostVeth(p), podIf, addrs...); err != nil {
		return fmt.Errorf("bare: %w", err)
	}
	return nil
}

func (r *bareRunner) del(_ context.Context, p pod) error {
	if err := barework.Detach(r.hostVeth(p)); err != nil {
		return fmt.Errorf("bare: %w", err)
	}
	return nil
}

func (r *bareRunner) leaks() ([]string, error) { return nodeVeths(r.ns) }

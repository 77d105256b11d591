package cni_test

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/netagent/netagent/test/testbin"
)

// TestVersionMatrix runs every cniVersion the plugin's VERSION answer lists, with the
// built-in IPAM and with a delegated host-local, through ADD, CHECK (0.4.0 and later), GC
// (1.1.0) and DEL, and an ADD that fails after the address was taken; it checks each result
// and that no veth, record, host-local lease or anti-spoofing entry is left.
func TestVersionMatrix(t *testing.T) {
	probe := newNode(t)
	testbin.Build(t, "github.com/containernetworking/plugins/plugins/ipam/host-local", "host-local")
	info, err := probe.cni.GetVersionInfo(t.Context(), "netagent-cni")
	if err != nil {
		t.Fatal(err)
	}
	versions := info.SupportedVersions()
	if len(versions) == 0 {
		t.Fatal("the plugin's VERSION answer lists no versions")
	}
	for i, v := range versions {
		for _, delegated := range []bool{false, true} {
			name := v + "/built-in"
			if delegated {
				name = v + "/host-local"
			}
			t.Run(name, func(t *testing.T) {
				subnet := netip.MustParsePrefix(fmt.Sprintf("10.245.%d.0/24", 2*i+btoi(delegated)))
				versionCase(t, v, subnet, delegated)
			})
		}
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

func versionCase(t *testing.T, v string, subnet netip.Prefix, delegated bool) {
	n := newNode(t)
	hlDir := filepath.Join(n.dataDir, "host-local")
	c := conf{"subnet": subnet.String()}
	if delegated {
		c = conf{"ipam": map[string]any{"type": "host-local", "subnet": subnet.String(), "dataDir": hlDir}}
	}
	l := n.list(v, c)
	gw := subnet.Addr().Next()
	// hostLeases lists the addresses host-local holds (its files named by address).
	hostLeases := func() []string {
		ents, _ := os.ReadDir(filepath.Join(hlDir, "netagent"))
		var out []string
		for _, e := range ents {
			if _, err := netip.ParseAddr(e.Name()); err == nil {
				out = append(out, e.Name())
			}
		}
		return out
	}

	a, b := n.newPod("a"+v), n.newPod("b"+v)
	var ips []string
	for _, p := range []*pod{a, b} {
		var raw types.Result
		if err := n.ns.Do(func() error {
			var err error
			raw, err = n.cni.AddNetworkList(t.Context(), l, p.rt)
			return err
		}); err != nil {
			t.Fatalf("ADD %s: %v", p.rt.ContainerID, err)
		}
		if raw.Version() != v {
			t.Errorf("ADD result version = %s, want %s", raw.Version(), v)
		}
		r, err := current.NewResultFromResult(raw)
		if err != nil {
			t.Fatal(err)
		}
		ip := netip.MustParseAddr(podIP(t, r))
		if !subnet.Contains(ip) || ip == gw {
			t.Errorf("ADD gave %s, want a pod address in %s", ip, subnet)
		}
		if g, _ := netip.AddrFromSlice(r.IPs[0].Gateway); g.Unmap() != gw {
			t.Errorf("ADD result gateway = %v, want %s", r.IPs[0].Gateway, gw)
		}
		ips = append(ips, ip.String())
	}
	if err := ping(a.ns, gw.String()); err != nil {
		t.Errorf("ping gateway from a: %v", err)
	}
	if err := ping(a.ns, ips[1]); err != nil {
		t.Errorf("ping b from a: %v", err)
	}
	if delegated && !sameSet(hostLeases(), ips) {
		t.Errorf("host-local leases = %v, want %v", hostLeases(), ips)
	}

	if ok, _ := version.GreaterThanOrEqualTo(v, "0.4.0"); ok {
		if err := n.check(l, a); err != nil {
			t.Errorf("CHECK: %v", err)
		}
	}

	// b goes by GC where the version has it (through a libcni without b in its cache, so
	// only the plugin's own GC can release it), else by DEL.
	if ok, _ := version.GreaterThanOrEqualTo(v, "1.1.0"); ok {
		fresh := libcni.NewCNIConfigWithCacheDir([]string{n.binDir}, t.TempDir(),
			&invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}, PluginDecoder: version.PluginDecoder{}})
		if err := n.ns.Do(func() error {
			return fresh.GCNetworkList(t.Context(), l, &libcni.GCArgs{ValidAttachments: []types.GCAttachment{{ContainerID: a.rt.ContainerID, IfName: "eth0"}}})
		}); err != nil {
			t.Fatalf("GC: %v", err)
		}
		if got := n.allocations(); !sameSet(got, ips[:1]) {
			t.Errorf("records after GC = %v, want only a's %s", got, ips[0])
		}
		if delegated && !sameSet(hostLeases(), ips[:1]) {
			t.Errorf("host-local leases after GC = %v, want only a's %s", hostLeases(), ips[0])
		}
		if err := n.check(l, a); err != nil {
			t.Errorf("CHECK of the kept pod after GC: %v", err)
		}
	}
	for _, p := range []*pod{b, a, a} { // the second DEL of a must succeed too
		if err := n.del(l, p); err != nil {
			t.Fatalf("DEL %s: %v", p.rt.ContainerID, err)
		}
	}

	// An ADD that fails after the address was taken (the pod already has an eth0) gives
	// the address back, to host-local too.
	taken := n.newPod("taken" + v)
	taken.ns.MustRun(t, "ip", "link", "add", "eth0", "type", "bridge")
	if _, err := n.add(l, taken); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Errorf("ADD into a pod with an eth0 = %v, want 'already exists'", err)
	}

	if got := n.veths(); len(got) != 0 {
		t.Errorf("veths left: %v", got)
	}
	if got := n.allocations(); len(got) != 0 {
		t.Errorf("records left: %v", got)
	}
	if got := hostLeases(); len(got) != 0 {
		t.Errorf("host-local leases left: %v", got)
	}
	if got := entryVeths(t, n); len(got) != 0 {
		t.Errorf("anti-spoofing entries left: %v", got)
	}
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

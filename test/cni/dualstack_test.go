package cni_test

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/netagent/netagent/pkg/antispoof"
	"github.com/netagent/netagent/pkg/bridge"
	"github.com/netagent/netagent/pkg/ipam"
	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

// podIPs returns a result's IPv4 and IPv6 address ("" for a family it lacks), failing on
// anything but one address per family.
func podIPs(t *testing.T, r *current.Result) (v4, v6 string) {
	t.Helper()
	for _, ip := range r.IPs {
		a, _ := netip.AddrFromSlice(ip.Address.IP)
		dst := &v4
		if !a.Unmap().Is4() {
			dst = &v6
		}
		if *dst != "" {
			t.Fatalf("result has two addresses of a family: %v", r.IPs)
		}
		*dst = a.Unmap().String()
	}
	return v4, v6
}

func ping6(ns *netns.NS, ip string) error {
	_, err := ns.Run("ping", "-6", "-c", "1", "-W", "2", "-q", ip)
	return err
}

// records reads the plugin's store.
func (n *node) records() []ipam.Record {
	n.t.Helper()
	s, err := ipam.Open(filepath.Join(n.dataDir, "ipam", "netagent"))
	if err != nil {
		n.t.Fatal(err)
	}
	recs, err := s.Records()
	if err != nil {
		n.t.Fatal(err)
	}
	return recs
}

// entries lists the anti-spoofing entries in the node namespace, sorted.
func (n *node) entries() []string {
	n.t.Helper()
	var out []string
	if err := n.ns.Do(func() error {
		es, err := antispoof.List(context.Background())
		if err == antispoof.ErrNotInstalled {
			return nil
		}
		for _, e := range es {
			out = append(out, e.String())
		}
		return err
	}); err != nil {
		n.t.Fatal(err)
	}
	slices.Sort(out)
	return out
}

// ruleCount6 counts ip6tables rules and user chains in the node namespace.
func (n *node) ruleCount6() int {
	n.t.Helper()
	c := 0
	for _, l := range strings.Split(n.ns.MustRun(n.t, "ip6tables-save"), "\n") {
		if strings.HasPrefix(l, "-A ") || (strings.HasPrefix(l, ":") && !isBuiltin(l)) {
			c++
		}
	}
	return c
}

// TestDualStack: ADD gives a pod one address per family, with both default routes, in the
// result of every CNI version; the pods reach each other and the gateway over IPv6 the
// moment ADD returns (no address is tentative); the host veth has no IPv6 address; CHECK
// covers both families and notices a missing IPv6 address or route; DEL leaves nothing.
func TestDualStack(t *testing.T) {
	n := newNode(t)
	const sub4, sub6, gw4, gw6 = "10.244.21.0/24", "fd00:244:21::/64", "10.244.21.1", "fd00:244:21::1"
	for _, v := range []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			l := n.list(v, conf{"subnet": sub4, "ipv6Subnet": sub6})
			a, b := n.newPod("dual-a-"+v), n.newPod("dual-b-"+v)
			ra := n.mustAdd(l, a)
			a4, a6 := podIPs(t, ra)
			rb := n.mustAdd(l, b)
			b4, b6 := podIPs(t, rb)
			// First thing after ADD: IPv6 between the pods and to the gateway.
			for _, c := range []struct {
				from *netns.NS
				to   string
			}{{a.ns, b6}, {b.ns, a6}, {a.ns, gw6}, {n.ns, b6}} {
				if err := ping6(c.from, c.to); err != nil {
					t.Errorf("ping -6 %s right after ADD: %v", c.to, err)
				}
			}
			if err := ping(a.ns, b4); err != nil {
				t.Errorf("ping %s: %v", b4, err)
			}
			if !netip.MustParsePrefix(sub4).Contains(netip.MustParseAddr(a4)) || !netip.MustParsePrefix(sub6).Contains(netip.MustParseAddr(a6)) {
				t.Errorf("addresses %s, %s are outside %s, %s", a4, a6, sub4, sub6)
			}
			var routes []string
			for _, r := range ra.Routes {
				routes = append(routes, r.Dst.String()+" via "+r.GW.String())
			}
			if want := []string{"0.0.0.0/0 via " + gw4, "::/0 via " + gw6}; !slices.Equal(routes, want) {
				t.Errorf("result routes %v, want %v", routes, want)
			}
			for _, ip := range ra.IPs {
				if ip.Gateway.String() != map[bool]string{true: gw4, false: gw6}[ip.Address.IP.To4() != nil] {
					t.Errorf("result IP %s has gateway %s", ip.Address.String(), ip.Gateway)
				}
			}
			if out := a.ns.MustRun(t, "ip", "-6", "addr", "show", "dev", "eth0"); strings.Contains(out, "tentative") || !strings.Contains(out, a6+"/64") ||
				!strings.Contains(out, bridge.LinkLocal(bridge.PodMAC(netip.MustParseAddr(a4))).String()) {
				t.Errorf("pod IPv6 addresses:\n%s", out)
			}
			if out := a.ns.MustRun(t, "ip", "-6", "route", "show", "default"); !strings.Contains(out, "via "+gw6+" dev eth0") {
				t.Errorf("pod IPv6 default route: %q", out)
			}
			veth := bridge.HostVethName(a.rt.ContainerID, "eth0")
			if out := n.ns.MustRun(t, "ip", "-6", "addr", "show", "dev", veth); strings.TrimSpace(out) != "" {
				t.Errorf("host veth %s has IPv6 addresses:\n%s", veth, out)
			}
			// The gateway skips DAD (the bridge's own link-local address does not: it is not
			// needed for pod traffic, and only the first ADD on a node sees it tentative).
			if out := n.ns.MustRun(t, "ip", "-6", "addr", "show", "dev", "cni0", "scope", "global"); !strings.Contains(out, gw6+"/64") || strings.Contains(out, "tentative") {
				t.Errorf("bridge IPv6 addresses:\n%s", out)
			}
			for _, p := range []*pod{a, b} {
				if err := n.check(l, p); err != nil && v != "0.3.1" { // CHECK came with 0.4.0
					t.Errorf("CHECK %s: %v", p.rt.ContainerID, err)
				}
			}
			if got := len(n.entries()); got != 6 {
				t.Errorf("anti-spoofing entries: %v, want 3 per pod", n.entries())
			}
			// Drift in the IPv6 half is seen.
			a.ns.MustRun(t, "ip", "-6", "route", "del", "default")
			if err := n.check(l, a); v != "0.3.1" && (err == nil || !strings.Contains(err.Error(), gw6)) {
				t.Errorf("CHECK without the IPv6 default route = %v, want an error naming %s", err, gw6)
			}
			a.ns.MustRun(t, "ip", "addr", "del", a6+"/64", "dev", "eth0")
			if err := n.check(l, a); v != "0.3.1" && (err == nil || !strings.Contains(err.Error(), a6)) {
				t.Errorf("CHECK without the IPv6 address = %v, want an error naming %s", err, a6)
			}
			for _, p := range []*pod{a, b} {
				if err := n.del(l, p); err != nil {
					t.Fatal(err)
				}
			}
			if v := n.veths(); len(v) != 0 {
				t.Errorf("veths after DEL: %v", v)
			}
			if r := n.records(); len(r) != 0 {
				t.Errorf("store after DEL: %v", r)
			}
			if e := n.entries(); len(e) != 0 {
				t.Errorf("anti-spoofing entries after DEL: %v", e)
			}
		})
	}
	// The bridge keeps its gateways (as for IPv4); nothing of the pods is left on the node.
	if out := n.ns.MustRun(t, "ip", "-6", "route", "show"); strings.Contains(out, "fd00:244:21::") && !strings.Contains(out, sub6+" dev cni0") {
		t.Errorf("node IPv6 routes:\n%s", out)
	}
	if out := n.ns.MustRun(t, "ip", "-6", "neigh", "show", "nud", "permanent", "dev", "cni0"); strings.TrimSpace(out) != "" {
		t.Errorf("permanent IPv6 neighbours on the bridge:\n%s", out)
	}
}

// TestIPv6Only: a conflist with only ipv6Subnet (no subnetFile) wires IPv6 alone, without
// waiting for an agent's subnet file, and the pods talk over it.
func TestIPv6Only(t *testing.T) {
	n := newNode(t)
	l := n.list("1.0.0", conf{"ipv6Subnet": "2001:db8:24::/112", "subnetFileWait": "0s"})
	a, b := n.newPod("v6-a"), n.newPod("v6-b")
	ra, rb := n.mustAdd(l, a), n.mustAdd(l, b)
	a4, a6 := podIPs(t, ra)
	b4, b6 := podIPs(t, rb)
	if a4 != "" || b4 != "" || a6 != "2001:db8:24::2" || b6 != "2001:db8:24::3" {
		t.Fatalf("addresses %q %q, %q %q; want IPv6 only, ::2 and ::3", a4, a6, b4, b6)
	}
	if len(ra.Routes) != 1 || ra.Routes[0].Dst.String() != "::/0" || ra.Routes[0].GW.String() != "2001:db8:24::1" {
		t.Errorf("routes %v, want ::/0 via 2001:db8:24::1", ra.Routes)
	}
	for _, c := range []struct {
		from *netns.NS
		to   string
	}{{a.ns, b6}, {b.ns, a6}, {a.ns, "2001:db8:24::1"}} {
		if err := ping6(c.from, c.to); err != nil {
			t.Errorf("ping -6 %s: %v", c.to, err)
		}
	}
	if out := a.ns.MustRun(t, "ip", "-4", "addr", "show", "dev", "eth0"); strings.TrimSpace(out) != "" {
		t.Errorf("IPv6-only pod has IPv4:\n%s", out)
	}
	if err := n.check(l, a); err != nil {
		t.Errorf("CHECK: %v", err)
	}
	for _, p := range []*pod{a, b} {
		if err := n.del(l, p); err != nil {
			t.Fatal(err)
		}
	}
	if v, r, e := n.veths(), n.records(), n.entries(); len(v)+len(r)+len(e) != 0 {
		t.Errorf("after DEL: veths %v, records %v, entries %v", v, r, e)
	}
}

// TestDualStackGC: GC releases both addresses of a collected attachment, its anti-spoofing
// entries and its host ports in both families.
func TestDualStackGC(t *testing.T) {
	n := newNode(t)
	n.underlay("10.244.25.0/24")
	l := n.list("1.1.0", conf{"subnet": "10.244.25.0/24", "ipv6Subnet": "fd00:244:25::/64"})
	rules4, rules6 := n.ruleCount(), n.ruleCount6()
	keep := n.newPod("keep", map[string]any{"hostPort": 9001, "containerPort": 80, "protocol": "tcp"})
	gone := n.newPod("gone", map[string]any{"hostPort": 9002, "containerPort": 80, "protocol": "tcp"})
	_, keep6 := podIPs(t, n.mustAdd(l, keep))
	n.mustAdd(l, gone)
	if save := n.ns.MustRun(t, "ip6tables-save", "-t", "nat"); !strings.Contains(save, "netagent-hp:gone:eth0") {
		t.Fatalf("no IPv6 host-port rules for gone:\n%s", save)
	}
	if err := n.ns.Do(func() error {
		return n.cni.GCNetworkList(t.Context(), l, &libcni.GCArgs{ValidAttachments: []types.GCAttachment{{ContainerID: keep.rt.ContainerID, IfName: "eth0"}}})
	}); err != nil {
		t.Fatalf("GC: %v", err)
	}
	recs := n.records()
	if len(recs) != 1 || recs[0].ContainerID != "keep" || recs[0].V6().String() != keep6 {
		t.Errorf("store after GC: %+v, want keep's record with %s", recs, keep6)
	}
	if e := n.entries(); len(e) != 3 || !strings.Contains(strings.Join(e, " "), keep6) {
		t.Errorf("anti-spoofing entries after GC: %v, want keep's three", e)
	}
	for _, cmd := range []string{"iptables-save", "ip6tables-save"} {
		if save := n.ns.MustRun(t, cmd, "-t", "nat"); strings.Contains(save, "gone") || !strings.Contains(save, "keep") {
			t.Errorf("%s after GC:\n%s", cmd, save)
		}
	}
	if err := n.check(l, keep); err != nil {
		t.Errorf("CHECK of the kept pod: %v", err)
	}
	for _, p := range []*pod{gone, keep} {
		if err := n.del(l, p); err != nil {
			t.Fatal(err)
		}
	}
	if r4, r6 := n.ruleCount(), n.ruleCount6(); r4 != rules4 || r6 != rules6 {
		t.Errorf("rules after DEL: %d/%d, before %d/%d:\n%s", r4, r6, rules4, rules6, n.ns.MustRun(t, "ip6tables-save"))
	}
	if v, r, e := n.veths(), n.records(), n.entries(); len(v)+len(r)+len(e) != 0 {
		t.Errorf("after DEL: veths %v, records %v, entries %v", v, r, e)
	}
}

// TestHostPortIPv6: a dual-stack pod's hostPort answers over IPv6 from outside, from the
// node, from a neighbour pod and from itself (hairpin), and over IPv4 as before; DEL
// removes the ip6tables rules. Bridged pods and routed ones (podInterface routed).
func TestHostPortIPv6(t *testing.T) {
	for _, podIface := range []string{"", "routed"} {
		t.Run("pods "+cmp.Or(podIface, "bridged"), func(t *testing.T) { hostPortIPv6(t, podIface) })
	}
}

func hostPortIPv6(t *testing.T, podIface string) {
	n := newNode(t)
	ext := n.underlay("10.244.23.0/24")
	n.ns.MustRun(t, "ip", "addr", "add", "2001:db8:23::10/64", "dev", "eth0", "nodad")
	ext.MustRun(t, "ip", "addr", "add", "2001:db8:23::20/64", "dev", "eth0", "nodad")
	ext.MustRun(t, "ip", "route", "add", "fd00:244:23::/64", "via", "2001:db8:23::10")
	c := conf{"subnet": "10.244.23.0/24", "ipv6Subnet": "fd00:244:23::/64"}
	if podIface != "" {
		c["podInterface"] = podIface
	}
	l := n.list("1.0.0", c)
	rules6 := n.ruleCount6()
	web := n.newPod("web", map[string]any{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"})
	other := n.newPod("other")
	n.mustAdd(l, web)
	n.mustAdd(l, other)
	web.ns.Serve6(t, 80, func(string) string { return "web6" })
	web.ns.Serve(t, 80, func(string) string { return "web4" })
	for _, c := range []struct {
		name string
		from *netns.NS
	}{{"outside host", ext}, {"node itself", n.ns}, {"a neighbour pod", other.ns}, {"the pod itself (hairpin)", web.ns}} {
		if got, err := c.from.Fetch6("[2001:db8:23::10]:8080"); err != nil || got != "web6" {
			t.Errorf("IPv6 host port from %s = %q, %v", c.name, got, err)
		}
		if got, err := c.from.Fetch("192.0.2.10:8080"); err != nil || got != "web4" {
			t.Errorf("IPv4 host port from %s = %q, %v", c.name, got, err)
		}
	}
	if err := n.check(l, web); err != nil {
		t.Errorf("CHECK: %v", err)
	}
	if err := n.del(l, web); err != nil {
		t.Fatal(err)
	}
	if _, err := ext.Fetch6("[2001:db8:23::10]:8080"); err == nil {
		t.Error("IPv6 host port still answers after DEL")
	}
	if err := n.del(l, other); err != nil {
		t.Fatal(err)
	}
	if got := n.ruleCount6(); got != rules6 {
		t.Errorf("ip6tables rules after DEL: %d, before %d:\n%s", got, rules6, n.ns.MustRun(t, "ip6tables-save"))
	}
}

// TestDualStackBadConfig: IPv6 config errors come back as CNI errors naming the field.
func TestDualStackBadConfig(t *testing.T) {
	n := newNode(t)
	pod := n.newPod("bad")
	for _, c := range []struct{ conf, want string }{
		{`"ipv6Subnet":"10.244.0.0/24"`, "invalid ipv6Subnet: 10.244.0.0/24 is not an IPv6 prefix"},
		{`"ipv6Subnet":"fd00::/127"`, "invalid ipv6Subnet: prefix length /127 is out of range"},
		{`"ipv6Subnet":"fd00::/32"`, "invalid ipv6Subnet: prefix length /32 is out of range"},
		{`"ipv6Subnet":"fd00::5/64"`, "invalid ipv6Subnet: fd00::5/64 has host bits set"},
		{`"subnet":"fd00::/64"`, "invalid subnet: fd00::/64: only IPv4"},
		{`"ipv6Subnet":"fd00::/64","ipv6Gateway":"fd01::1"`, "invalid IPv6 address range"},
		{`"ipv6Subnet":"fd00::/64","ipv6Gateway":"10.0.0.1"`, "invalid ipv6Gateway"},
	} {
		stdin := `{"cniVersion":"1.0.0","name":"netagent","type":"netagent-cni","dataDir":"` + filepath.Join(n.dataDir, "ipam") + `",` + c.conf + `}`
		out, err := n.exec(map[string]string{"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "bad", "CNI_NETNS": pod.ns.Path, "CNI_IFNAME": "eth0", "CNI_PATH": n.binDir}, stdin)
		var e cniErr
		if err == nil || json.Unmarshal(out, &e) != nil || e.Code != types.ErrInvalidNetworkConfig || !strings.Contains(e.Msg+": "+e.Details, c.want) {
			t.Errorf("ADD with %s = %s (%v), want code 7 mentioning %q", c.conf, out, err, c.want)
		}
	}
	if v, r := n.veths(), n.records(); len(v)+len(r) != 0 {
		t.Errorf("rejected ADDs left veths %v, records %v", v, r)
	}
}

// ndKind is the neighbour discovery message sendND forges.
type ndKind int

const (
	ndAdvert    ndKind = iota // unsolicited advertisement (override set) to all nodes
	ndSolicit                 // solicitation for target, sent to target
	ndAdvertHBH               // ndAdvert behind a hop-by-hop options header
)

// sendND sends from ns, three times, a forged neighbour discovery message of kind from src
// for target with mac in its one link-layer address option. Python's raw ICMPv6 socket: the
// kernel fills in the checksum.
func sendND(t *testing.T, ns *netns.NS, kind ndKind, src, target, mac string) {
	t.Helper()
	const script = `
import socket, struct, sys
src, target, mac, kind = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
idx = socket.if_nametoindex("eth0")
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
s.bind((src, 0, 0, idx))
if kind == 2:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_HOPOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))  # PadN
if kind == 1:
    m = struct.pack("!BBHI", 135, 0, 0, 0) + socket.inet_pton(socket.AF_INET6, target) + bytes([1, 1])
    dst = target
else:
    m = struct.pack("!BBHI", 136, 0, 0, 0x20000000) + socket.inet_pton(socket.AF_INET6, target) + bytes([2, 1])
    dst = "ff02::1"
m += bytes.fromhex(mac.replace(":", ""))
for _ in range(3):
    s.sendto(m, (dst, 0, 0, idx))
`
	ns.MustRun(t, "python3", "-c", script, src, target, mac, strconv.Itoa(int(kind)))
}

// neighMAC is the MAC ns has for ip on dev ("" when none).
func neighMAC(t *testing.T, ns *netns.NS, ip, dev string) string {
	t.Helper()
	f := strings.Fields(ns.MustRun(t, "ip", "-6", "neigh", "show", ip, "dev", dev))
	for i := range f {
		if f[i] == "lladdr" && i+1 < len(f) {
			return f[i+1]
		}
	}
	return ""
}

// TestAntiSpoofingIPv6: pods of a dual-stack network cannot send from another pod's IPv6
// address, nor make a neighbour (node or pod) send another pod's traffic to them with a
// forged neighbour advertisement (a foreign target, or their own address with a foreign
// link-layer address). Each attack is first shown to work without the rule set, so the
// test can see it; legitimate IPv6 keeps working throughout.
func TestAntiSpoofingIPv6(t *testing.T) {
	n := newNode(t)
	l := n.list("1.1.0", conf{"subnet": "10.244.22.0/24", "ipv6Subnet": "fd00:244:22::/64"})
	a, b, c := n.newPod("spoof6-a"), n.newPod("spoof6-b"), n.newPod("spoof6-c")
	a4, a6 := podIPs(t, n.mustAdd(l, a))
	b4, b6 := podIPs(t, n.mustAdd(l, b))
	_, c6 := podIPs(t, n.mustAdd(l, c))
	const gw6, nobody6 = "fd00:244:22::1", "fd00:244:22::99"
	macA := bridge.PodMAC(netip.MustParseAddr(a4)).String()
	macB := bridge.PodMAC(netip.MustParseAddr(b4)).String()
	everyoneTalks := func(t *testing.T) {
		t.Helper()
		for _, p := range []struct {
			from *netns.NS
			to   string
		}{{a.ns, c6}, {a.ns, gw6}, {a.ns, b6}, {b.ns, c6}, {c.ns, a6}, {n.ns, a6}} {
			if err := ping6(p.from, p.to); err != nil {
				t.Errorf("legitimate IPv6: %v", err)
			}
		}
	}
	heal := func(t *testing.T) {
		for _, ns := range []*netns.NS{n.ns, a.ns, b.ns, c.ns} {
			ns.MustRun(t, "ip", "-6", "neigh", "flush", "all")
		}
	}
	everyoneTalks(t)

	spoofPing := func(src, dst string, victim *netns.NS) func(t *testing.T) bool {
		return func(t *testing.T) bool {
			before := seen6(t, victim, src)
			a.ns.MustRun(t, "ip", "addr", "add", src+"/128", "dev", "eth0", "nodad")
			defer a.ns.MustRun(t, "ip", "addr", "del", src+"/128", "dev", "eth0")
			_, _ = a.ns.Run("ping", "-6", "-c", "1", "-W", "1", "-q", "-I", src, dst)
			return seen6(t, victim, src) > before
		}
	}
	// poisoned: after a forged NA, does victim send traffic for ip to mac?
	// forged sends a forged NA (or NS) and reports whether victim now has mac for ip.
	forged := func(kind ndKind, src, target, mac, ip, wantMAC string, victim *netns.NS, dev string) func(t *testing.T) bool {
		return func(t *testing.T) bool {
			heal(t)
			if err := ping6(victim, ip); err != nil { // an entry to override
				t.Fatal(err)
			}
			if got := neighMAC(t, victim, ip, dev); got != wantMAC {
				t.Fatalf("before the attack %s is at %q, want %s", ip, got, wantMAC)
			}
			sendND(t, a.ns, kind, src, target, mac)
			poisoned := neighMAC(t, victim, ip, dev) == mac
			heal(t)
			return poisoned
		}
	}
	attacks := []attack{
		{"IPv6 from pod B's address to pod C", spoofPing(b6, c6, c.ns)},
		{"IPv6 from pod B's address to the gateway", spoofPing(b6, gw6, n.ns)},
		{"IPv6 from an unallocated address to pod C", spoofPing(nobody6, c6, c.ns)},
		{"NA for pod B's address to the node", forged(ndAdvert, a6, b6, macA, b6, macB, n.ns, "cni0")},
		{"NA for pod B's address to pod C", forged(ndAdvert, a6, b6, macA, b6, macB, c.ns, "eth0")},
		{"NA for pod B's address behind a hop-by-hop header", forged(ndAdvertHBH, a6, b6, macA, b6, macB, c.ns, "eth0")},
		{"NA for pod A's own address with pod B's MAC", forged(ndAdvert, a6, a6, macB, a6, macA, c.ns, "eth0")},
		{"NS from pod A's own address with pod B's MAC", forged(ndSolicit, a6, c6, macB, a6, macA, c.ns, "eth0")},
	}
	attackPhases(t, n, attacks, everyoneTalks, heal, 9) // 3 entries a pod: IPv4, IPv6, link-local
	if cs := counters(t, n); cs.SpoofedIPv6.Packets == 0 || cs.SpoofedNDP.Packets == 0 {
		t.Errorf("counters %+v: want spoofed IPv6 and NDP drops", cs)
	}
	if t.Failed() {
		t.Log(n.ns.MustRun(t, "nft", "list", "table", "bridge", antispoof.Table))
	}
	for _, p := range []*pod{a, b, c} {
		if err := n.del(l, p); err != nil {
			t.Fatal(err)
		}
	}
	if e := n.entries(); len(e) != 0 {
		t.Errorf("entries after DEL: %v", e)
	}
}

// TestDelegatedIPAMDualStack: a delegated IPAM plugin's IPv4 and IPv6 addresses (host-local
// with a range per family) are both wired, checked and released.
func TestDelegatedIPAMDualStack(t *testing.T) {
	n := newNode(t)
	testbin.Build(t, "github.com/containernetworking/plugins/plugins/ipam/host-local", "host-local")
	hlDir := filepath.Join(n.dataDir, "host-local")
	l := n.list("1.0.0", conf{"ipam": map[string]any{"type": "host-local", "dataDir": hlDir, "ranges": []any{
		[]any{map[string]any{"subnet": "10.244.26.0/24"}},
		[]any{map[string]any{"subnet": "fd00:244:26::/64"}},
	}}})
	a, b := n.newPod("deleg-a"), n.newPod("deleg-b")
	_, a6 := podIPs(t, n.mustAdd(l, a))
	b4, b6 := podIPs(t, n.mustAdd(l, b))
	if !strings.HasPrefix(a6, "fd00:244:26::") || !strings.HasPrefix(b4, "10.244.26.") {
		t.Fatalf("pods got %s, %s; want host-local's", a6, b4)
	}
	for _, ip := range []string{b6, "fd00:244:26::1"} {
		if err := ping6(a.ns, ip); err != nil {
			t.Errorf("ping -6 %s: %v", ip, err)
		}
	}
	if err := n.check(l, a); err != nil {
		t.Errorf("CHECK: %v", err)
	}
	if recs := n.records(); len(recs) != 2 || !recs[0].IP6.IsValid() {
		t.Errorf("records %+v, want both pods with both addresses", recs)
	}
	for _, p := range []*pod{a, b} {
		if err := n.del(l, p); err != nil {
			t.Fatal(err)
		}
	}
	for _, ip := range []string{a6, b4, b6} {
		if _, err := os.Stat(filepath.Join(hlDir, "netagent", ip)); !os.IsNotExist(err) {
			t.Errorf("host-local still holds %s after DEL (err %v)", ip, err)
		}
	}
	if v, r, e := n.veths(), n.records(), n.entries(); len(v)+len(r)+len(e) != 0 {
		t.Errorf("after DEL: veths %v, records %v, entries %v", v, r, e)
	}
}

// TestDualStackPodWithIPv6Disabled: a pod namespace where the runtime left IPv6 disabled
// for new interfaces (net.ipv6.conf.default.disable_ipv6=1) still gets a working IPv6
// address on its interface.
func TestDualStackPodWithIPv6Disabled(t *testing.T) {
	n := newNode(t)
	l := n.list("1.0.0", conf{"subnet": "10.244.27.0/24", "ipv6Subnet": "fd00:244:27::/64"})
	a, b := n.newPod("nov6-a"), n.newPod("nov6-b")
	for _, p := range []*pod{a, b} {
		p.ns.MustRun(t, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1", "net.ipv6.conf.all.disable_ipv6=1")
	}
	_, a6 := podIPs(t, n.mustAdd(l, a))
	_, b6 := podIPs(t, n.mustAdd(l, b))
	if err := ping6(a.ns, b6); err != nil {
		t.Errorf("ping -6 %s: %v", b6, err)
	}
	if err := ping6(b.ns, a6); err != nil {
		t.Errorf("ping -6 %s: %v", a6, err)
	}
	if err := ping6(b.ns, "fd00:244:27::1"); err != nil {
		t.Errorf("ping -6 the gateway: %v", err)
	}
	if err := n.check(l, a); err != nil {
		t.Errorf("CHECK: %v", err)
	}
	for _, p := range []*pod{a, b} {
		if err := n.del(l, p); err != nil {
			t.Fatal(err)
		}
	}
}

// TestDualStackAddIsAtomic: a dual-stack ADD that fails at a step only IPv6 has leaves
// nothing of either family behind (no address in the store, veth, pod interface,
// anti-spoofing entry or host-port rule), and the pods before it keep theirs.
func TestDualStackAddIsAtomic(t *testing.T) {
	n := newNode(t)
	// leftovers describes what the node holds beyond want pods' worth.
	leftovers := func(t *testing.T, want int) {
		t.Helper()
		recs := n.records()
		for _, r := range recs {
			if !r.IP.Is4() || !r.IP6.Is6() {
				t.Errorf("record %+v lacks a family", r)
			}
		}
		if len(recs) != want {
			t.Errorf("store records %d, want %d: %+v", len(recs), want, recs)
		}
		if v := n.veths(); len(v) != want {
			t.Errorf("veths %v, want %d", v, want)
		}
		if e := n.entries(); len(e) != 3*want {
			t.Errorf("anti-spoofing entries %v, want 3 per pod (%d)", e, 3*want)
		}
	}
	noInterface := func(t *testing.T, p *netns.NS) {
		t.Helper()
		if out := p.MustRun(t, "ip", "-o", "link", "show"); strings.Contains(out, "eth0") {
			t.Errorf("pod interface left behind: %s", out)
		}
	}

	t.Run("IPv6 pool exhausted, IPv4 not", func(t *testing.T) {
		l := n.list("1.0.0", conf{"subnet": "10.244.28.0/24", "ipv6Subnet": "fd00:244:28::/126"})
		var live []*pod
		var failed *pod
		for i := range 4 { // a /126 holds 2 pod addresses at most
			p := n.newPod("small6-" + strconv.Itoa(i))
			_, err := n.add(l, p)
			if err == nil {
				live = append(live, p)
				continue
			}
			var e *types.Error
			if !errors.As(err, &e) || e.Code != types.ErrTryAgainLater || !strings.Contains(e.Msg, "exhausted") {
				t.Fatalf("ADD %d = %v, want code 11 'address pool exhausted'", i, err)
			}
			failed = p
			break
		}
		if failed == nil || len(live) == 0 {
			t.Fatalf("%d ADDs succeeded on a /126 and none failed", len(live))
		}
		leftovers(t, len(live))
		noInterface(t, failed.ns)
		for _, p := range live {
			if err := n.del(l, p); err != nil {
				t.Fatal(err)
			}
		}
		leftovers(t, 0)
	})

	t.Run("ip6tables missing, iptables there", func(t *testing.T) {
		bin := t.TempDir()
		for _, name := range []string{"iptables", "iptables-save", "iptables-restore"} {
			path, err := exec.LookPath(name)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(path, filepath.Join(bin, name)); err != nil {
				t.Fatal(err)
			}
		}
		p := netns.New(t, "pod")
		stdin := `{"cniVersion":"1.0.0","name":"netagent","type":"netagent-cni","subnet":"10.244.29.0/24","ipv6Subnet":"fd00:244:29::/64",` +
			`"dataDir":` + strconv.Quote(filepath.Join(n.dataDir, "ipam")) + `,"runtimeConfig":{"portMappings":[{"hostPort":8089,"containerPort":80,"protocol":"tcp"}]}}`
		cmd := n.ns.Command(t.Context(), n.plugin)
		cmd.Env = []string{"PATH=" + bin, "CNI_COMMAND=ADD", "CNI_CONTAINERID=noip6t", "CNI_NETNS=" + p.Path, "CNI_IFNAME=eth0", "CNI_PATH=" + n.binDir}
		cmd.Stdin = strings.NewReader(stdin)
		out, err := cmd.Output()
		if err == nil || !strings.Contains(string(out), "ip6tables") {
			t.Fatalf("ADD without ip6tables = %v, %s; want an ip6tables error", err, out)
		}
		leftovers(t, 0)
		noInterface(t, p)
		if nat := n.ns.MustRun(t, "iptables-save", "-t", "nat"); strings.Contains(nat, "8089") {
			t.Errorf("IPv4 host-port rule left behind:\n%s", nat)
		}
	})
}

// TestBridgeLinkLocalAtOnce: when the first ADD returns, the bridge's IPv6 link-local
// address is there and usable (not in duplicate address detection, which the bridge's
// first carrier would start): the node solicits pods' addresses from it for the packets it
// forwards, and sent no solicitation while it was tentative (TestIPv6FirstPingAcrossNodes
// in test/cluster).
func TestBridgeLinkLocalAtOnce(t *testing.T) {
	for _, c := range []struct {
		name string
		conf conf
	}{
		{"ipv6", conf{"ipv6Subnet": "2001:db8:25::/112", "subnetFileWait": "0s"}},
		{"dual", conf{"subnet": "10.244.25.0/24", "ipv6Subnet": "fd00:244:25::/64"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			n := newNode(t)
			n.mustAdd(n.list("1.0.0", c.conf), n.newPod("ll-"+c.name))
			out := n.ns.MustRun(t, "ip", "-6", "addr", "show", "dev", "cni0") // the default bridge
			if !strings.Contains(out, "inet6 fe80::") || strings.Contains(out, "tentative") {
				t.Errorf("bridge after the first ADD: want a link-local address, none tentative:\n%s", out)
			}
		})
	}
}

package cni_test

import (
	"context"
	"errors"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/netagent/netagent/pkg/antispoof"
	"github.com/netagent/netagent/pkg/bridge"
	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

// TestRouted drives the plugin with podInterface "routed" for IPv4, IPv6 and dual stack:
// ADD wires pods without a bridge (host-length addresses, link-local gateways, the node's
// host routes, the gateway addresses on lo and an unreachable route for the subnet) and
// reports that in its result;
// pods reach each other and the node at once; a pod cannot send from another address
// (each attack first shown to get through with the pod's chain gone) nor answer neighbour
// discovery for another pod's address; the agent's sync puts a removed chain back; CHECK
// notices a missing host route, gateway neighbour or chain; GC and DEL leave nothing.
func TestRouted(t *testing.T) {
	for _, tc := range []struct {
		name string
		conf conf
		v4   bool
		v6   bool
	}{
		{"ipv4", conf{"subnet": "10.244.31.0/24"}, true, false},
		{"ipv6", conf{"ipv6Subnet": "fd00:244:31::/64"}, false, true},
		{"dual", conf{"subnet": "10.244.31.0/24", "ipv6Subnet": "fd00:244:31::/64"}, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) { routed(t, tc.conf, tc.v4, tc.v6) })
	}
}

type routedPod struct {
	*pod
	v4, v6 string
	veth   string
}

func routed(t *testing.T, c conf, v4, v6 bool) {
	n := newNode(t)
	// The node's own address: it sources what the node sends to its pods (routed pods
	// have no gateway address on the node).
	n.underlay("10.244.31.0/24")
	c["podInterface"] = "routed"
	l := n.list("1.1.0", c)
	var pods []*routedPod
	for _, id := range []string{"routed-a", "routed-b", "routed-c"} {
		p := &routedPod{pod: n.newPod(id), veth: bridge.HostVethName(id, "eth0")}
		res := n.mustAdd(l, p.pod)
		checkRoutedResult(t, res, p.veth)
		p.v4, p.v6 = podIPs(t, res)
		pods = append(pods, p)
	}
	a, b, cc := pods[0], pods[1], pods[2]
	if _, err := n.ns.Run("ip", "link", "show", "cni0"); err == nil {
		t.Error("a routed network created the bridge cni0")
	}
	unreach := n.ns.MustRun(t, "ip", "-d", "route", "show", "type", "unreachable")
	unreach += n.ns.MustRun(t, "ip", "-6", "-d", "route", "show", "type", "unreachable")
	for _, want := range []struct {
		on     bool
		subnet string
	}{{v4, "10.244.31.0/24"}, {v6, "fd00:244:31::/64"}} {
		if want.on && !strings.Contains(unreach, want.subnet) {
			t.Errorf("no unreachable route for %s:\n%s", want.subnet, unreach)
		}
	}

	lo := n.ns.MustRun(t, "ip", "addr", "show", "dev", "lo")
	for _, want := range []struct {
		on   bool
		addr string
	}{{v4, "10.244.31.1/32"}, {v6, "fd00:244:31::1/128"}} {
		if want.on != strings.Contains(lo, " "+want.addr+" ") {
			t.Errorf("lo carries the gateway %s: %t, want %t:\n%s", want.addr, !want.on, want.on, lo)
		}
	}

	everyoneTalks := func(t *testing.T) {
		t.Helper()
		for _, p := range []struct {
			from *netns.NS
			to   *routedPod
		}{{a.ns, b}, {a.ns, cc}, {b.ns, cc}, {cc.ns, a}, {n.ns, a}} {
			if v4 {
				if err := ping(p.from, p.to.v4); err != nil {
					t.Errorf("legitimate IPv4: %v", err)
				}
			}
			if v6 {
				if err := ping6(p.from, p.to.v6); err != nil {
					t.Errorf("legitimate IPv6: %v", err)
				}
			}
		}
	}
	everyoneTalks(t)
	for _, p := range pods {
		if err := n.check(l, p.pod); err != nil {
			t.Fatalf("CHECK %s: %v", p.rt.ContainerID, err)
		}
	}

	spoof := func(src, dst string, victim *netns.NS) func(t *testing.T) bool {
		return func(t *testing.T) bool {
			six := strings.Contains(src, ":")
			count := seen
			bits, ping := "/32", []string{"-c", "1", "-W", "1", "-q", "-I", src, dst}
			if six {
				count, bits, ping = seen6, "/128", append([]string{"-6"}, ping...)
			}
			before := count(t, victim, src)
			args := []string{"addr", "add", src + bits, "dev", "eth0"}
			if six {
				args = append(args, "nodad")
			}
			a.ns.MustRun(t, "ip", args...)
			defer a.ns.MustRun(t, "ip", "addr", "del", src+bits, "dev", "eth0")
			_, _ = a.ns.Run("ping", ping...)
			return count(t, victim, src) > before
		}
	}
	var attacks []attack
	if v4 {
		attacks = append(attacks,
			attack{"IPv4 from pod B's address to pod C", spoof(b.v4, cc.v4, cc.ns)},
			attack{"IPv4 from an unallocated address to pod C", spoof("10.244.31.200", cc.v4, cc.ns)},
			attack{"IPv4 from outside the subnet to pod C", spoof("198.51.100.7", cc.v4, cc.ns)})
	}
	if v6 {
		attacks = append(attacks,
			attack{"IPv6 from pod B's address to pod C", spoof(b.v6, cc.v6, cc.ns)},
			attack{"IPv6 from an unallocated address to pod C", spoof("fd00:244:31::99", cc.v6, cc.ns)})
	}
	t.Run("unprotected", func(t *testing.T) {
		n.ns.MustRun(t, "nft", "delete", "chain", "netdev", antispoof.RoutedTable, a.veth)
		if err := n.check(l, a.pod); err == nil || !strings.Contains(err.Error(), "anti-spoofing chain") {
			t.Errorf("CHECK with pod A's chain gone = %v, want it named", err)
		}
		for _, at := range attacks {
			t.Run(at.name, func(t *testing.T) {
				if !at.run(t) {
					t.Error("the attack did not get through even without protection: this test cannot see it")
				}
			})
		}
	})
	t.Run("repaired by the agent's sync", func(t *testing.T) {
		st := syncDataDir(t, n, n.dataDir+"/ipam")
		if st.Chains != 1 {
			t.Errorf("SyncDataDir after a chain was removed = %+v, want 1 chain written", st)
		}
		if st := syncDataDir(t, n, n.dataDir+"/ipam"); st.Chains != 0 || st.Added != 0 {
			t.Errorf("a second SyncDataDir = %+v, want nothing to do", st)
		}
		if err := n.check(l, a.pod); err != nil {
			t.Errorf("CHECK after the repair: %v", err)
		}
	})
	t.Run("protected", func(t *testing.T) {
		for _, at := range attacks {
			t.Run(at.name, func(t *testing.T) {
				before := dropped(t, n)
				if at.run(t) {
					t.Error("the attack got through")
				}
				if after := dropped(t, n); after <= before {
					t.Errorf("spoofed drops went from %d to %d, want more", before, after)
				}
			})
		}
		if !v6 {
			return
		}
		// A neighbour advertisement for pod B's address cannot take B's traffic: the node's
		// entry for B is permanent on B's veth; the chain drops it anyway, and counts it.
		t.Run("NA for pod B's address", func(t *testing.T) {
			before := counters(t, n).SpoofedNDP.Packets
			macA := bridge.PodMAC(netip.MustParseAddr(firstOf(a))).String()
			lla := bridge.LinkLocal(bridge.PodMAC(netip.MustParseAddr(firstOf(a)))).Addr().String()
			sendND(t, a.ns, ndAdvert, lla, b.v6, macA)
			sendND(t, a.ns, ndAdvert, a.v6, b.v6, macA)
			if got := counters(t, n).SpoofedNDP.Packets; got < before+6 {
				t.Errorf("spoofed NDP drops went from %d to %d, want 6 more", before, got)
			}
			if got := neighMAC(t, n.ns, b.v6, b.veth); got != bridge.PodMAC(netip.MustParseAddr(firstOf(b))).String() {
				t.Errorf("the node's entry for pod B is %q", got)
			}
			if err := ping6(cc.ns, b.v6); err != nil {
				t.Error(err)
			}
		})
	})
	everyoneTalks(t)

	t.Run("CHECK notices drift", func(t *testing.T) {
		first := firstOf(a)
		hostRoute := first + "/32"
		fam := "-4"
		if strings.Contains(first, ":") {
			hostRoute, fam = first+"/128", "-6"
		}
		gw := "169.254.1.1"
		if !v4 {
			gw = "fe80::1"
		}
		for _, d := range []struct {
			name, want   string
			break_, heal func()
		}{
			{"host route", "no route to " + hostRoute,
				func() { n.ns.MustRun(t, "ip", fam, "route", "del", hostRoute, "dev", a.veth) },
				func() {
					args := []string{fam, "route", "add", hostRoute, "dev", a.veth, "proto", "181"}
					if fam == "-4" {
						args = append(args, "scope", "link")
					}
					n.ns.MustRun(t, "ip", args...)
				}},
			{"gateway neighbour", "neighbour",
				func() { a.ns.MustRun(t, "ip", "neigh", "del", gw, "dev", "eth0") },
				func() {
					a.ns.MustRun(t, "ip", "neigh", "replace", gw, "lladdr", bridge.HostMAC(netip.MustParseAddr(first)).String(), "dev", "eth0", "nud", "permanent")
				}},
			{"a rule of the chain", "anti-spoofing chain",
				func() {
					out := n.ns.MustRun(t, "nft", "-a", "list", "chain", "netdev", antispoof.RoutedTable, a.veth)
					i := strings.LastIndex(out, "# handle ")
					n.ns.MustRun(t, "nft", "delete", "rule", "netdev", antispoof.RoutedTable, a.veth, "handle", strings.Fields(out[i+9:])[0])
				},
				func() { syncDataDir(t, n, n.dataDir+"/ipam") }},
		} {
			d.break_()
			if err := n.check(l, a.pod); err == nil || !strings.Contains(err.Error(), d.want) {
				t.Errorf("CHECK with the %s broken = %v, want an error about %q", d.name, err, d.want)
			}
			d.heal()
			if err := n.check(l, a.pod); err != nil {
				t.Errorf("CHECK with the %s healed: %v", d.name, err)
			}
		}
	})

	t.Run("GC and DEL", func(t *testing.T) {
		err := n.ns.Do(func() error {
			return n.cni.GCNetworkList(t.Context(), l, &libcni.GCArgs{ValidAttachments: []types.GCAttachment{{ContainerID: a.rt.ContainerID, IfName: "eth0"}}})
		})
		if err != nil {
			t.Fatalf("GC: %v", err)
		}
		if v := n.veths(); len(v) != 1 || v[0] != a.veth {
			t.Errorf("veths after GC = %v, want only %s", v, a.veth)
		}
		if ch := routedChains(t, n); len(ch) != 1 || ch[0] != a.veth {
			t.Errorf("chains after GC = %v, want only %s", ch, a.veth)
		}
		if err := n.check(l, a.pod); err != nil {
			t.Errorf("CHECK of the kept pod after GC: %v", err)
		}
		for _, p := range pods {
			if err := n.del(l, p.pod); err != nil {
				t.Fatal(err)
			}
		}
		if v := n.veths(); len(v) != 0 {
			t.Errorf("veths after DEL: %v", v)
		}
		if ch := routedChains(t, n); len(ch) != 0 {
			t.Errorf("chains after DEL: %v", ch)
		}
		if r := n.records(); len(r) != 0 {
			t.Errorf("records after DEL: %v", r)
		}
		if e := n.entries(); len(e) != 0 {
			t.Errorf("bridge anti-spoofing entries of routed pods: %v", e)
		}
		routes := n.ns.MustRun(t, "ip", "route") + n.ns.MustRun(t, "ip", "-6", "route")
		if strings.Contains(routes, "dev na") {
			t.Errorf("routes to pods after DEL:\n%s", routes)
		}
	})
}

func firstOf(p *routedPod) string {
	if p.v4 != "" {
		return p.v4
	}
	return p.v6
}

// checkRoutedResult: a routed pod's result names the host veth and the pod interface (no
// bridge), and host-length addresses via the link-local gateways.
func checkRoutedResult(t *testing.T, r *current.Result, veth string) {
	t.Helper()
	if len(r.Interfaces) != 2 || r.Interfaces[0].Name != veth || r.Interfaces[1].Name != "eth0" || r.Interfaces[1].Sandbox == "" {
		t.Errorf("interfaces = %+v, want the host veth %s and the pod's eth0", r.Interfaces, veth)
	}
	for _, ip := range r.IPs {
		ones, bits := ip.Address.Mask.Size()
		gw := "169.254.1.1"
		if bits == 128 {
			gw = "fe80::1"
		}
		if ones != bits || ip.Gateway.String() != gw || ip.Interface == nil || *ip.Interface != 1 {
			t.Errorf("IP %s gateway %s interface %v: want a host prefix via %s on interface 1", ip.Address.String(), ip.Gateway, ip.Interface, gw)
		}
	}
	if len(r.Routes) != len(r.IPs) {
		t.Errorf("routes = %v, want a default route per family", r.Routes)
	}
}

func routedChains(t *testing.T, n *node) []string {
	t.Helper()
	var out []string
	if err := n.ns.Do(func() error {
		var err error
		out, err = antispoof.RoutedChains(context.Background())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestRoutedBadConfig: podInterface errors name the field.
func TestRoutedBadConfig(t *testing.T) {
	n := newNode(t)
	p := n.newPod("bad-routed")
	for _, c := range []struct {
		conf conf
		want string
	}{
		{conf{"subnet": "10.244.34.0/24", "podInterface": "ipvlan"}, `invalid podInterface: "ipvlan" is not bridge or routed`},
		{conf{"subnet": "10.244.34.0/24", "podInterface": "routed", "isDefaultGateway": false}, "invalid isDefaultGateway"},
	} {
		_, err := n.add(n.list("1.1.0", c.conf), p)
		var e *types.Error
		if !errors.As(err, &e) || e.Code != types.ErrInvalidNetworkConfig || !strings.Contains(e.Msg, c.want) {
			t.Errorf("ADD with %v = %v, want code 7 naming %q", c.conf, err, c.want)
		}
	}
	if v := n.veths(); len(v) != 0 {
		t.Errorf("veths after refused ADDs: %v", v)
	}
}

// TestRoutedDelegatedIPAM: routed pods with a delegated IPAM plugin. host-local's subnet
// and gateway give the node its gateway address and unreachable route as our own store
// does; a static /32 without a gateway gives it neither (its "gateway" would be merely the
// next address, maybe another pod's), and the pod still works, checks and goes.
func TestRoutedDelegatedIPAM(t *testing.T) {
	n := newNode(t)
	n.underlay("10.244.36.0/24")
	testbin.Build(t, "github.com/containernetworking/plugins/plugins/ipam/host-local", "host-local")
	testbin.Build(t, "github.com/containernetworking/plugins/plugins/ipam/static", "static")
	for _, c := range []struct {
		name       string
		ipam       map[string]any
		ip         string
		gwOnLo     string // the gateway address lo must carry ("" for none)
		notOnLo    string // an address lo must not carry
		unreachSub string
	}{
		{"host-local", map[string]any{"type": "host-local", "subnet": "10.244.36.0/24", "dataDir": filepath.Join(n.dataDir, "host-local")},
			"", "10.244.36.1/32", "", "10.244.36.0/24"},
		{"static /32", map[string]any{"type": "static", "addresses": []any{map[string]any{"address": "10.244.37.7/32"}}},
			"10.244.37.7", "", "10.244.37.8/32", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := n.list("1.0.0", conf{"podInterface": "routed", "ipam": c.ipam})
			p := n.newPod("routed-" + strings.NewReplacer(" ", "-", "/", "").Replace(c.name))
			ip := podIP(t, n.mustAdd(l, p))
			if c.ip != "" && ip != c.ip {
				t.Errorf("pod got %s, want %s", ip, c.ip)
			}
			lo := n.ns.MustRun(t, "ip", "-4", "addr", "show", "dev", "lo")
			if c.gwOnLo != "" && !strings.Contains(lo, " "+c.gwOnLo+" ") {
				t.Errorf("lo lacks the gateway %s:\n%s", c.gwOnLo, lo)
			}
			if c.notOnLo != "" && strings.Contains(lo, " "+c.notOnLo+" ") {
				t.Errorf("lo took %s, the address after the pod's /32:\n%s", c.notOnLo, lo)
			}
			unreach := n.ns.MustRun(t, "ip", "route", "show", "type", "unreachable")
			if c.unreachSub != "" && !strings.Contains(unreach, c.unreachSub) {
				t.Errorf("no unreachable route for %s:\n%s", c.unreachSub, unreach)
			}
			if err := ping(n.ns, ip); err != nil {
				t.Errorf("node -> pod: %v", err)
			}
			if err := n.check(l, p); err != nil {
				t.Errorf("CHECK: %v", err)
			}
			if err := n.del(l, p); err != nil {
				t.Fatal(err)
			}
			if v := n.veths(); len(v) != 0 {
				t.Errorf("veths after DEL: %v", v)
			}
		})
	}
}

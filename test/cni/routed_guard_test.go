package cni_test

import (
	"strings"
	"testing"

	"github.com/netagent/netagent/pkg/antispoof"
	"github.com/netagent/netagent/pkg/bridge"
)

// spoofFrom reports whether an IPv4 ping from pod a with source src (added to a's eth0
// for the ping) reaches victim's own stack.
func spoofFrom(t *testing.T, a, victim *pod, src, dst string) bool {
	t.Helper()
	before := seen(t, victim.ns, src)
	a.ns.MustRun(t, "ip", "addr", "add", src+"/32", "dev", "eth0")
	defer a.ns.MustRun(t, "ip", "addr", "del", src+"/32", "dev", "eth0")
	_, _ = a.ns.Run("ping", "-c", "1", "-W", "1", "-q", "-I", src, dst)
	return seen(t, victim.ns, src) > before
}

// TestRoutedDormantTable: a dormant netdev table unhooks every routed pod's chain at once
// (as a dormant bridge table does the bridged pods', which the bridge table's checks
// catch): CHECK must report it and the agent's sync must wake the table.
func TestRoutedDormantTable(t *testing.T) {
	n := newNode(t)
	n.underlay("10.244.35.0/24")
	l := n.list("1.1.0", conf{"subnet": "10.244.35.0/24", "podInterface": "routed"})
	a, b := n.newPod("dormant-a"), n.newPod("dormant-b")
	n.mustAdd(l, a)
	vb := podIP(t, n.mustAdd(l, b))
	const src = "10.244.35.200"
	if spoofFrom(t, a, b, src, vb) {
		t.Fatal("a spoofed packet got through with the table intact")
	}
	n.ns.MustRun(t, "nft", "add", "table", "netdev", antispoof.RoutedTable, "{ flags dormant; }")
	if !spoofFrom(t, a, b, src, vb) {
		t.Fatal("the spoofed packet did not get through with the table dormant: this test cannot see it")
	}
	if err := n.check(l, a); err == nil {
		t.Error("CHECK passed with the routed pods' table dormant")
	}
	syncDataDir(t, n, n.dataDir+"/ipam")
	if out := n.ns.MustRun(t, "nft", "list", "table", "netdev", antispoof.RoutedTable); strings.Contains(out, "dormant") {
		t.Errorf("the table is still dormant after the agent's sync:\n%s", out)
	}
	if spoofFrom(t, a, b, src, vb) {
		t.Error("the spoofed packet got through after the agent's sync")
	}
	if err := n.check(l, a); err != nil {
		t.Errorf("CHECK after the sync: %v", err)
	}
}

// TestRoutedSyncReplacedChain: a pod's chain replaced by one of the same name that the
// kernel cannot turn into ours by an update (a regular chain, or a base chain at another
// priority) must still be repaired by the agent's sync, and must not stop the repair of
// another pod's chain (one transaction for all).
func TestRoutedSyncReplacedChain(t *testing.T) {
	for _, tc := range []struct{ name, spec string }{
		{"regular chain", ""},
		{"another priority", "{ type filter hook ingress device %s priority 10; policy accept; }"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNode(t)
			n.underlay("10.244.36.0/24")
			l := n.list("1.1.0", conf{"subnet": "10.244.36.0/24", "podInterface": "routed"})
			a, b, c := n.newPod("replaced-a"), n.newPod("replaced-b"), n.newPod("replaced-c")
			n.mustAdd(l, a)
			vb := podIP(t, n.mustAdd(l, b))
			n.mustAdd(l, c)
			va, vc := bridge.HostVethName("replaced-a", "eth0"), bridge.HostVethName("replaced-c", "eth0")
			const src = "10.244.36.200"
			n.ns.MustRun(t, "nft", "delete", "chain", "netdev", antispoof.RoutedTable, va)
			args := []string{"add", "chain", "netdev", antispoof.RoutedTable, va}
			if tc.spec != "" {
				args = append(args, strings.ReplaceAll(tc.spec, "%s", va))
			}
			n.ns.MustRun(t, "nft", args...)
			n.ns.MustRun(t, "nft", "delete", "chain", "netdev", antispoof.RoutedTable, vc)
			if !spoofFrom(t, a, b, src, vb) {
				t.Fatal("the spoofed packet did not get through with pod A's chain replaced: this test cannot see it")
			}
			if err := n.check(l, a); err == nil {
				t.Error("CHECK passed with pod A's chain replaced")
			}
			var errSync error
			_ = n.ns.Do(func() error {
				_, errSync = antispoof.SyncDataDir(t.Context(), n.dataDir+"/ipam")
				return nil
			})
			if errSync != nil {
				t.Errorf("the agent's sync: %v", errSync)
			}
			if spoofFrom(t, a, b, src, vb) {
				t.Error("the spoofed packet got through after the agent's sync")
			}
			for _, p := range []*pod{a, c} {
				if err := n.check(l, p); err != nil {
					t.Errorf("CHECK %s after the sync: %v", p.rt.ContainerID, err)
				}
			}
		})
	}
}

// TestRoutedCheckNode: CHECK of a routed pod notices what the node lost of its routed
// subnets (as a bridged pod's CHECK notices the bridge's gateway address): the gateway
// addresses on lo and the subnets' unreachable routes.
func TestRoutedCheckNode(t *testing.T) {
	n := newNode(t)
	n.underlay("10.244.38.0/24")
	l := n.list("1.1.0", conf{"subnet": "10.244.38.0/24", "ipv6Subnet": "fd00:244:38::/64", "podInterface": "routed"})
	a := n.newPod("node-a")
	n.mustAdd(l, a)
	if err := n.check(l, a); err != nil {
		t.Fatalf("CHECK: %v", err)
	}
	for _, d := range []struct {
		name, want   string
		break_, heal []string
	}{
		{"IPv4 gateway on lo", "10.244.38.1/32",
			[]string{"addr", "del", "10.244.38.1/32", "dev", "lo"},
			[]string{"addr", "add", "10.244.38.1/32", "dev", "lo"}},
		{"IPv6 gateway on lo", "fd00:244:38::1/128",
			[]string{"addr", "del", "fd00:244:38::1/128", "dev", "lo"},
			[]string{"addr", "add", "fd00:244:38::1/128", "dev", "lo", "nodad"}},
		{"IPv4 unreachable route", "10.244.38.0/24",
			[]string{"route", "del", "unreachable", "10.244.38.0/24", "metric", "4294967280"},
			[]string{"route", "add", "unreachable", "10.244.38.0/24", "metric", "4294967280", "proto", "181"}},
		{"IPv6 unreachable route", "fd00:244:38::/64",
			[]string{"-6", "route", "del", "unreachable", "fd00:244:38::/64", "metric", "4294967280"},
			[]string{"-6", "route", "add", "unreachable", "fd00:244:38::/64", "metric", "4294967280", "proto", "181"}},
	} {
		n.ns.MustRun(t, "ip", d.break_...)
		if err := n.check(l, a); err == nil || !strings.Contains(err.Error(), d.want) {
			t.Errorf("CHECK with the %s gone = %v, want an error naming %s", d.name, err, d.want)
		}
		n.ns.MustRun(t, "ip", d.heal...)
		if err := n.check(l, a); err != nil {
			t.Errorf("CHECK with the %s back: %v", d.name, err)
		}
	}
}

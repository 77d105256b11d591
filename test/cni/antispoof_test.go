package cni_test

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/netagent/netagent/pkg/antispoof"
	"github.com/netagent/netagent/pkg/bridge"
	"github.com/netagent/netagent/test/netns"
)

// TestAntiSpoofing drives the real plugin: three pods on one node bridge; pod A tries to send
// with other sources and must reach nobody, while its own traffic and everyone else's keeps
// working. Each attack is first shown to work with the protection gone (so the test can see
// an attack succeed), then to fail with it. The pod lifecycle (CHECK, DEL, GC) and the
// agent's repair (SyncDataDir after `nft flush ruleset`) follow.
func TestAntiSpoofing(t *testing.T) {
	n := newNode(t)
	l := n.list("1.1.0", conf{"subnet": "10.244.11.0/24"})
	a, b, c := n.newPod("spoof-a"), n.newPod("spoof-b"), n.newPod("spoof-c")
	ipA, ipB, ipC := podIP(t, n.mustAdd(l, a)), podIP(t, n.mustAdd(l, b)), podIP(t, n.mustAdd(l, c))
	const gw, nobody = "10.244.11.1", "10.244.11.200"
	vethA := bridge.HostVethName(a.rt.ContainerID, "eth0")
	macA := bridge.PodMAC(netip.MustParseAddr(ipA)).String()
	dataDir := filepath.Join(n.dataDir, "ipam")

	everyoneTalks := func(t *testing.T) {
		t.Helper()
		for _, p := range []struct {
			from *netns.NS
			to   string
		}{{a.ns, ipC}, {a.ns, gw}, {a.ns, ipB}, {b.ns, ipC}, {c.ns, ipA}, {n.ns, ipA}} {
			if err := ping(p.from, p.to); err != nil {
				t.Errorf("legitimate traffic: %v", err)
			}
		}
	}
	everyoneTalks(t)
	for _, p := range []*pod{a, b, c} {
		if err := n.check(l, p); err != nil {
			t.Fatalf("CHECK %s: %v", p.rt.ContainerID, err)
		}
	}

	spoofPing := func(src, dst string, victim *netns.NS) func(t *testing.T) bool {
		return func(t *testing.T) bool {
			before := seen(t, victim, src)
			a.ns.MustRun(t, "ip", "addr", "add", src+"/32", "dev", "eth0")
			defer a.ns.MustRun(t, "ip", "addr", "del", src+"/32", "dev", "eth0")
			_ = ping2(a.ns, "-I", src, dst) // the reply goes to src, not to A: only the victim's counter tells
			return seen(t, victim, src) > before
		}
	}
	attacks := []attack{
		{"IPv4 from pod B's address to pod C", spoofPing(ipB, ipC, c.ns)},
		{"IPv4 from pod B's address to the gateway", spoofPing(ipB, gw, n.ns)},
		{"IPv4 from an unallocated address to pod C", spoofPing(nobody, ipC, c.ns)},
		{"gratuitous ARP for pod B's address", func(t *testing.T) bool {
			// The node knows B's MAC; a gratuitous ARP from A claiming B's address would
			// make it send B's traffic to A.
			n.ns.MustRun(t, "ip", "neigh", "flush", "dev", "cni0")
			if err := ping(n.ns, ipB); err != nil {
				t.Fatal(err)
			}
			a.ns.MustRun(t, "ip", "addr", "add", ipB+"/32", "dev", "eth0")
			defer a.ns.MustRun(t, "ip", "addr", "del", ipB+"/32", "dev", "eth0")
			_, _ = a.ns.Run("busybox", "arping", "-U", "-c", "2", "-w", "1", "-I", "eth0", "-s", ipB, ipB)
			neigh := n.ns.MustRun(t, "ip", "neigh", "show", ipB, "dev", "cni0")
			poisoned := strings.Contains(neigh, macA)
			n.ns.MustRun(t, "ip", "neigh", "flush", "dev", "cni0") // heal it for what follows
			return poisoned
		}},
		{"pod A with another MAC", func(t *testing.T) bool {
			before := seen(t, n.ns, ipA)
			a.ns.MustRun(t, "ip", "link", "set", "eth0", "address", "0a:58:de:ad:be:ef")
			defer a.ns.MustRun(t, "ip", "link", "set", "eth0", "address", macA)
			n.ns.MustRun(t, "ip", "neigh", "flush", "dev", "cni0")
			a.ns.MustRun(t, "ip", "neigh", "flush", "dev", "eth0")
			_ = ping(a.ns, gw)
			return seen(t, n.ns, ipA) > before
		}},
	}
	attackPhases(t, n, attacks, everyoneTalks, func(t *testing.T) {
		// The attacks worked: pod A answered ARP for B's address meanwhile, so neighbours
		// may still send B's traffic to A. Heal them.
		for _, ns := range []*netns.NS{n.ns, a.ns, b.ns, c.ns} {
			ns.MustRun(t, "ip", "neigh", "flush", "all")
		}
	}, 3)
	everyoneTalks(t)

	t.Run("an ADD after a flush ruleset installs it for every pod", func(t *testing.T) {
		n.ns.MustRun(t, "nft", "flush", "ruleset")
		d := n.newPod("spoof-d")
		ipD := podIP(t, n.mustAdd(l, d))
		if got, want := entryVeths(t, n), vethsOf(a, b, c, d); !slices.Equal(got, want) {
			t.Errorf("entries = %v, want %v", got, want)
		}
		everyoneTalks(t)
		if err := ping(d.ns, ipA); err != nil {
			t.Error(err)
		}
		if err := ping(a.ns, ipD); err != nil {
			t.Error(err)
		}
		if attacks[0].run(t) {
			t.Errorf("%s got through", attacks[0].name)
		}
		if err := n.del(l, d); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("IPv6 from a pod is dropped", func(t *testing.T) {
		before := counters(t, n).NotIPv4.Packets
		if _, err := a.ns.Run("ip", "-6", "addr", "add", "fd00::a/64", "dev", "eth0", "nodad"); err != nil {
			t.Skipf("no IPv6 here: %v", err)
		}
		_ = ping2(a.ns, "-6", "fd00::c")
		if after := counters(t, n).NotIPv4.Packets; after <= before {
			t.Errorf("not-ipv4 counter went from %d to %d", before, after)
		}
	})

	t.Run("CHECK reports a missing entry, the agent's sync restores it", func(t *testing.T) {
		n.ns.MustRun(t, "nft", "delete", "element", "bridge", "netagent", "pods",
			fmt.Sprintf(`{ "%s" . %s . %s }`, vethA, ipA, macA))
		if err := n.check(l, a); err == nil || !strings.Contains(err.Error(), "anti-spoofing entry") {
			t.Errorf("CHECK without the entry = %v, want it to name the missing anti-spoofing entry", err)
		}
		if err := ping(a.ns, gw); err == nil {
			t.Error("pod A still talks without its entry")
		}
		if st := syncDataDir(t, n, dataDir); st.Added != 1 || st.Repaired {
			t.Errorf("SyncDataDir = %+v, want 1 added", st)
		}
		if err := n.check(l, a); err != nil {
			t.Errorf("CHECK after sync: %v", err)
		}
		everyoneTalks(t)
	})

	t.Run("DEL removes the entry", func(t *testing.T) {
		for i := range 2 {
			if err := n.del(l, b); err != nil {
				t.Fatalf("DEL #%d: %v", i+1, err)
			}
		}
		if got, want := entryVeths(t, n), vethsOf(a, c); !slices.Equal(got, want) {
			t.Errorf("entries after DEL = %v, want %v", got, want)
		}
	})

	t.Run("GC removes entries of invalid attachments", func(t *testing.T) {
		n.ns.MustRun(t, "nft", "add", "element", "bridge", "netagent", "pods",
			`{ "na0000000dead" . 10.244.11.222 . 0a:58:0a:f4:0b:de }`) // a veth long gone
		if err := n.ns.Do(func() error {
			return n.cni.GCNetworkList(t.Context(), l, &libcni.GCArgs{ValidAttachments: []types.GCAttachment{{ContainerID: a.rt.ContainerID, IfName: "eth0"}}})
		}); err != nil {
			t.Fatalf("GC: %v", err)
		}
		if got, want := entryVeths(t, n), vethsOf(a); !slices.Equal(got, want) {
			t.Errorf("entries after GC = %v, want %v", got, want)
		}
		if err := n.check(l, a); err != nil {
			t.Errorf("CHECK of the kept pod: %v", err)
		}
		if err := ping(a.ns, gw); err != nil {
			t.Errorf("kept pod: %v", err)
		}
	})

	for _, p := range []*pod{a, b, c} {
		if err := n.del(l, p); err != nil {
			t.Errorf("DEL %s: %v", p.rt.ContainerID, err)
		}
	}
	if got := entryVeths(t, n); len(got) != 0 {
		t.Errorf("entries left after every DEL: %v", got)
	}
}

// attack is one spoofing attempt; run reports whether it got through to its victim.
type attack struct {
	name string
	run  func(t *testing.T) bool
}

// attackPhases runs the attacks on node n three times: with the rule set flushed (an
// admin's `nft flush ruleset`: each attack must get through, or the test cannot see it,
// while everyoneTalks keeps working; heal undoes what they did), after the agent's sync
// repaired it (with entries entries), and protected (each must fail, counted as a drop).
func attackPhases(t *testing.T, n *node, attacks []attack, everyoneTalks, heal func(t *testing.T), entries int) {
	t.Helper()
	t.Run("unprotected", func(t *testing.T) {
		n.ns.MustRun(t, "nft", "flush", "ruleset")
		everyoneTalks(t)
		for _, at := range attacks {
			t.Run(at.name, func(t *testing.T) {
				if !at.run(t) {
					t.Error("the attack did not get through even without protection: this test cannot see it")
				}
			})
		}
		heal(t)
	})
	t.Run("repaired by the agent's sync", func(t *testing.T) {
		st := syncDataDir(t, n, filepath.Join(n.dataDir, "ipam"))
		if !st.Repaired || st.Added != entries || st.Entries != entries {
			t.Errorf("SyncDataDir after flush ruleset = %+v, want repaired with %d added", st, entries)
		}
		everyoneTalks(t)
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
	})
	everyoneTalks(t)
}

// ping2 pings once with extra arguments.
func ping2(ns *netns.NS, args ...string) error {
	_, err := ns.Run("ping", append([]string{"-c", "1", "-W", "1", "-q"}, args...)...)
	return err
}

var probeCount = regexp.MustCompile(`ip6? saddr ([0-9a-f.:]+) counter packets (\d+)`)

// seen counts the IPv4 packets from src that reached ns's own stack, with a counter rule in
// a table of its own ("ip probe"), added on first use (and again after a flush ruleset).
func seen(t *testing.T, ns *netns.NS, src string) int { t.Helper(); return seenIn(t, ns, "ip", src) }

// seen6 is seen for IPv6 (table "ip6 probe").
func seen6(t *testing.T, ns *netns.NS, src string) int { t.Helper(); return seenIn(t, ns, "ip6", src) }

func seenIn(t *testing.T, ns *netns.NS, family, src string) int {
	t.Helper()
	ns.MustRun(t, "nft", "add table "+family+" probe; add chain "+family+" probe in { type filter hook input priority -300; }")
	counts := map[string]int{}
	for _, m := range probeCount.FindAllStringSubmatch(ns.MustRun(t, "nft", "list", "chain", family, "probe", "in"), -1) {
		counts[m[1]], _ = strconv.Atoi(m[2])
	}
	if _, ok := counts[src]; !ok {
		ns.MustRun(t, "nft", "add", "rule", family, "probe", "in", family, "saddr", src, "counter")
	}
	return counts[src]
}

func counters(t *testing.T, n *node) antispoof.Counts {
	t.Helper()
	var c antispoof.Counts
	if err := n.ns.Do(func() error {
		var err error
		c, err = antispoof.Counters(context.Background())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return c
}

func dropped(t *testing.T, n *node) uint64 {
	t.Helper()
	var p uint64
	if err := n.ns.Do(func() error {
		var err error
		p, _, err = antispoof.Dropped(context.Background())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return p
}

func syncDataDir(t *testing.T, n *node, dir string) antispoof.Stats {
	t.Helper()
	var st antispoof.Stats
	if err := n.ns.Do(func() error {
		var err error
		st, err = antispoof.SyncDataDir(context.Background(), dir)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return st
}

// entryVeths lists the host veths that have an entry in the node's set, sorted.
func entryVeths(t *testing.T, n *node) []string {
	t.Helper()
	var out []string
	if err := n.ns.Do(func() error {
		es, err := antispoof.List(context.Background())
		for _, e := range es {
			out = append(out, e.HostVeth)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	slices.Sort(out)
	return out
}

func vethsOf(pods ...*pod) []string {
	var out []string
	for _, p := range pods {
		out = append(out, bridge.HostVethName(p.rt.ContainerID, p.rt.IfName))
	}
	slices.Sort(out)
	return out
}

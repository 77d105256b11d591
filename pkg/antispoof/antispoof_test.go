package antispoof_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/netagent/netagent/pkg/antispoof"
	"github.com/netagent/netagent/pkg/bridge"
	"github.com/netagent/netagent/pkg/ipam"
	"github.com/netagent/netagent/test/netns"
	vns "github.com/vishvananda/netns"
)

func TestMain(m *testing.M) {
	netns.Sweep()
	os.Exit(m.Run())
}

var ctx = context.Background()

func entry(veth, ip string) antispoof.Entry {
	return antispoof.EntryFor(veth, netip.MustParseAddr(ip))
}

// in runs fn inside ns (on a locked thread) and fails the test on error.
func in(t *testing.T, ns *netns.NS, fn func() error) {
	t.Helper()
	if err := ns.Do(fn); err != nil {
		t.Fatal(err)
	}
}

// list returns the set's entries as sorted strings.
func list(t *testing.T, ns *netns.NS) []string {
	t.Helper()
	var out []string
	in(t, ns, func() error {
		es, err := antispoof.List(ctx)
		for _, e := range es {
			out = append(out, e.String())
		}
		return err
	})
	slices.Sort(out)
	return out
}

func strs(es ...antispoof.Entry) []string {
	var out []string
	for _, e := range es {
		out = append(out, e.String())
	}
	slices.Sort(out)
	return out
}

func TestAddDelete(t *testing.T) {
	netns.RequireRoot(t)
	ns := netns.New(t, "as")
	a, b, c := entry("na00000000001", "10.9.0.2"), entry("na00000000002", "10.9.0.3"), entry("na00000000003", "10.9.0.4")

	in(t, ns, func() error {
		if _, err := antispoof.List(ctx); err != antispoof.ErrNotInstalled {
			return fmt.Errorf("List before anything = %v, want ErrNotInstalled", err)
		}
		if _, _, err := antispoof.Dropped(ctx); err != antispoof.ErrNotInstalled {
			return fmt.Errorf("Dropped before anything = %v, want ErrNotInstalled", err)
		}
		// Deleting from nothing is fine (DEL before any ADD).
		if err := antispoof.Delete(ctx, a); err != nil {
			return fmt.Errorf("Delete with no table: %v", err)
		}
		if err := antispoof.DeleteVeth(ctx, a.HostVeth); err != nil {
			return fmt.Errorf("DeleteVeth with no table: %v", err)
		}
		// Add does not install: the caller installs with what it knows (the plugin: its store).
		if err := antispoof.Add(ctx, a); err != antispoof.ErrNotInstalled {
			return fmt.Errorf("Add with no table = %v, want ErrNotInstalled", err)
		}
		if err := antispoof.Install(ctx, []antispoof.Entry{a}); err != nil {
			return err
		}
		for _, e := range []antispoof.Entry{a, b} { // a again: a repeated ADD
			if err := antispoof.Add(ctx, e); err != nil {
				return err
			}
		}
		// Install again (a racing first ADD): keeps what is there, rules stay as they are.
		return antispoof.Install(ctx, []antispoof.Entry{c})
	})
	if got, want := list(t, ns), strs(a, b, c); !slices.Equal(got, want) {
		t.Fatalf("after Add: %v, want %v", got, want)
	}
	// nft, an independent decoder, reads back what was written.
	if got := ns.MustRun(t, "nft", "list", "chain", "bridge", antispoof.Table, antispoof.Chain); got != wantChain {
		t.Errorf("nft list chain:\n%s\nwant\n%s", got, wantChain)
	}
	if got := ns.MustRun(t, "nft", "list", "set", "bridge", antispoof.Table, antispoof.Set); !strings.Contains(got, "type ifname . ipv4_addr . ether_addr\n") {
		t.Errorf("nft list set:\n%s", got)
	}
	if got := ns.MustRun(t, "nft", "list", "counters", "table", "bridge", antispoof.Table); strings.Count(got, "packets 0 bytes 0") != 5 {
		t.Errorf("nft list counters:\n%s", got)
	}

	in(t, ns, func() error {
		if ok, err := antispoof.Has(ctx, a); err != nil || !ok {
			return fmt.Errorf("Has(a) = %v, %v, want true", ok, err)
		}
		if err := antispoof.Delete(ctx, a); err != nil {
			return err
		}
		if err := antispoof.Delete(ctx, a); err != nil { // a repeated DEL
			return fmt.Errorf("second Delete: %v", err)
		}
		if ok, err := antispoof.Has(ctx, a); err != nil || ok {
			return fmt.Errorf("Has(a) after Delete = %v, %v, want false", ok, err)
		}
		// One of two absent: the other still goes.
		if err := antispoof.Delete(ctx, a, b); err != nil {
			return fmt.Errorf("Delete(a, b): %v", err)
		}
		// An entry with another address on c's veth (as a DEL without a record finds it).
		c2 := entry(c.HostVeth, "10.9.0.99")
		if err := antispoof.Add(ctx, c2); err != nil {
			return err
		}
		return antispoof.DeleteVeth(ctx, c.HostVeth)
	})
	if got := list(t, ns); len(got) != 0 {
		t.Errorf("after deletes: %v, want none", got)
	}
	in(t, ns, func() error { return antispoof.Remove(ctx) })
	in(t, ns, func() error { return antispoof.Remove(ctx) })
	if out := ns.MustRun(t, "nft", "list", "ruleset"); strings.TrimSpace(out) != "" {
		t.Errorf("ruleset after Remove:\n%s", out)
	}
}

// wantChain is the chain as `nft list chain` prints it.
const wantChain = `table bridge netagent {
	chain prerouting {
		type filter hook prerouting priority filter; policy accept;
		iifname != "na*" accept comment "netagent antispoof v1: not from a pod"
		iifname . ip saddr . ether saddr @pods accept comment "netagent antispoof v1: IPv4 from the pod's own address and MAC"
		arp htype 1 arp ptype ip arp hlen 6 arp plen 4 iifname . arp saddr ip . ether saddr @pods iifname . arp saddr ip . arp saddr ether @pods accept comment "netagent antispoof v1: ARP from the pod's own address and MAC"
		ether type ip counter name "spoofed-ipv4" drop comment "netagent antispoof v1: spoofed IPv4"
		ether type arp counter name "spoofed-arp" drop comment "netagent antispoof v1: spoofed ARP"
		meta l4proto != ipv6-icmp iifname . ip6 saddr . ether saddr @pods6 accept comment "netagent antispoof v1: IPv6 other than ICMPv6 from the pod's own address and MAC"
		ip6 nexthdr ipv6-icmp @nh,320,8 0x88 ip6 length 24 iifname . ip6 saddr . ether saddr @pods6 iifname . @nh,384,128 . ether saddr @pods6 accept comment "netagent antispoof v1: NA for the pod's own address"
		ip6 nexthdr ipv6-icmp @nh,320,8 0x88 ip6 length 32 iifname . ip6 saddr . ether saddr @pods6 iifname . @nh,384,128 . ether saddr @pods6 @nh,512,16 0x201 iifname . @nh,384,128 . @nh,528,48 @pods6 accept comment "netagent antispoof v1: NA for the pod's own address and MAC"
		ip6 nexthdr ipv6-icmp @nh,320,8 0x87 ip6 length 24 iifname . ip6 saddr . ether saddr @pods6 accept comment "netagent antispoof v1: NS from the pod's own address"
		ip6 nexthdr ipv6-icmp @nh,320,8 0x87 ip6 length 32 iifname . ip6 saddr . ether saddr @pods6 @nh,512,16 0x101 iifname . ip6 saddr . @nh,528,48 @pods6 accept comment "netagent antispoof v1: NS from the pod's own address and MAC"
		ip6 nexthdr ipv6-icmp @nh,320,8 0x85 ip6 length 8 iifname . ip6 saddr . ether saddr @pods6 accept comment "netagent antispoof v1: RS from the pod's own address"
		ip6 nexthdr ipv6-icmp @nh,320,8 0x85 ip6 length 16 iifname . ip6 saddr . ether saddr @pods6 @nh,384,16 0x101 iifname . ip6 saddr . @nh,400,48 @pods6 accept comment "netagent antispoof v1: RS from the pod's own address and MAC"
		@nh,64,16 & 0xffc0 == 0xfe80 iifname . ip6 saddr . ether saddr != @pods6 counter name "not-ipv4" drop comment "netagent antispoof v1: IPv6 from a link-local source not the pod's"
		ip6 saddr :: counter name "not-ipv4" drop comment "netagent antispoof v1: IPv6 from the unspecified source"
		icmpv6 type 133-137 counter name "spoofed-ndp" drop comment "netagent antispoof v1: spoofed NDP"
		iifname . ip6 saddr . ether saddr @pods6 accept comment "netagent antispoof v1: IPv6 from the pod's own address and MAC"
		ether type ip6 counter name "spoofed-ipv6" drop comment "netagent antispoof v1: spoofed IPv6"
		counter name "not-ipv4" drop comment "netagent antispoof v1: neither IPv4, ARP nor IPv6"
	}
}
`

func TestBadEntries(t *testing.T) {
	netns.RequireRoot(t)
	ns := netns.New(t, "as") // rejected before any kernel call, but never risk the root namespace
	for _, e := range []antispoof.Entry{
		{HostVeth: "", IP: netip.MustParseAddr("10.0.0.1"), MAC: bridge.PodMAC(netip.MustParseAddr("10.0.0.1"))},
		{HostVeth: "name-is-16-long!", IP: netip.MustParseAddr("10.0.0.1"), MAC: bridge.PodMAC(netip.MustParseAddr("10.0.0.1"))},
		{HostVeth: "na1", IP: netip.MustParseAddr("::ffff:10.0.0.1"), MAC: bridge.PodMAC(netip.MustParseAddr("10.0.0.1"))},
		{HostVeth: "na1", IP: netip.MustParseAddr("fe80::1%eth0"), MAC: bridge.PodMAC(netip.MustParseAddr("10.0.0.1"))},
		{HostVeth: "na1"},
		{HostVeth: "na1", IP: netip.MustParseAddr("10.0.0.1"), MAC: net.HardwareAddr{1, 2, 3}},
	} {
		in(t, ns, func() error {
			if err := antispoof.Add(ctx, e); err == nil || !strings.Contains(err.Error(), "entry") {
				t.Errorf("Add(%v) = %v, want an error naming the entry", e, err)
			}
			return nil
		})
	}
	if out := ns.MustRun(t, "nft", "list", "ruleset"); strings.TrimSpace(out) != "" {
		t.Errorf("bad entries changed the ruleset:\n%s", out)
	}
}

// TestSync applies desired states in order, some after breaking the kernel state the way an
// admin or a crash could, and checks the set and what Sync reports.
func TestSync(t *testing.T) {
	netns.RequireRoot(t)
	ns := netns.New(t, "as")
	a, b, c := entry("na00000000001", "10.9.0.2"), entry("na00000000002", "10.9.0.3"), entry("na00000000003", "10.9.0.4")
	nft := func(args ...string) func() { return func() { ns.MustRun(t, "nft", args...) } }
	steps := []struct {
		name    string
		before  func()
		desired []antispoof.Entry
		want    antispoof.Stats
	}{
		{"install", nil, []antispoof.Entry{a, b}, antispoof.Stats{Entries: 2, Added: 2, Repaired: true}},
		{"unchanged writes nothing", nil, []antispoof.Entry{b, a}, antispoof.Stats{Entries: 2}},
		{"one in, one out", nil, []antispoof.Entry{b, c}, antispoof.Stats{Entries: 2, Added: 1, Removed: 1}},
		{"table deleted", nft("delete", "table", "bridge", "netagent"), []antispoof.Entry{b, c}, antispoof.Stats{Entries: 2, Added: 2, Repaired: true}},
		{"ruleset flushed", nft("flush", "ruleset"), []antispoof.Entry{b, c}, antispoof.Stats{Entries: 2, Added: 2, Repaired: true}},
		{"chain flushed", nft("flush", "chain", "bridge", "netagent", "prerouting"), []antispoof.Entry{b, c}, antispoof.Stats{Entries: 2, Repaired: true}},
		{"rule added", nft("insert", "rule", "bridge", "netagent", "prerouting", "accept"), []antispoof.Entry{b, c}, antispoof.Stats{Entries: 2, Repaired: true}},
		{"rule changed", func() {
			// Same comment, different expressions: the IPv4 accept rule without its lookup.
			out := ns.MustRun(t, "nft", "-a", "list", "chain", "bridge", "netagent", "prerouting")
			h := handleOf(t, out, "@pods accept comment \"netagent antispoof v1: IPv4")
			ns.MustRun(t, "nft", "replace", "rule", "bridge", "netagent", "prerouting", "handle", h,
				"ether", "type", "ip", "accept", "comment", `"netagent antispoof v1: IPv4 from the pod's own address and MAC"`)
		}, []antispoof.Entry{b, c}, antispoof.Stats{Entries: 2, Repaired: true}},
		{"policy changed", nft("add", "chain", "bridge", "netagent", "prerouting", "{ policy drop; }"), []antispoof.Entry{b, c}, antispoof.Stats{Entries: 2, Repaired: true}},
		{"foreign element removed", nft("add", "element", "bridge", "netagent", "pods", `{ "na0000000000f" . 10.9.0.200 . 0a:58:0a:09:00:c8 }`), []antispoof.Entry{b, c}, antispoof.Stats{Entries: 2, Removed: 1}},
		{"empty", nil, nil, antispoof.Stats{Removed: 2}},
	}
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			if s.before != nil {
				s.before()
			}
			var got antispoof.Stats
			in(t, ns, func() error {
				var err error
				got, err = antispoof.Sync(ctx, s.desired)
				return err
			})
			if got != s.want {
				t.Errorf("Sync = %+v, want %+v", got, s.want)
			}
			if l, w := list(t, ns), strs(s.desired...); !slices.Equal(l, w) {
				t.Errorf("set = %v, want %v", l, w)
			}
			// Applying the same state again changes nothing.
			in(t, ns, func() error {
				var err error
				got, err = antispoof.Sync(ctx, s.desired)
				return err
			})
			if want := (antispoof.Stats{Entries: len(s.desired)}); got != want {
				t.Errorf("second Sync = %+v, want %+v", got, want)
			}
		})
	}
}

func handleOf(t *testing.T, listing, contains string) string {
	t.Helper()
	for _, l := range strings.Split(listing, "\n") {
		if strings.Contains(l, contains) {
			if _, h, ok := strings.Cut(l, "# handle "); ok {
				return strings.TrimSpace(h)
			}
		}
	}
	t.Fatalf("no rule containing %q in\n%s", contains, listing)
	return ""
}

func TestSyncDataDir(t *testing.T) {
	netns.RequireRoot(t)
	ns := netns.New(t, "as")
	dir := t.TempDir()
	put := func(network string, recs ...ipam.Record) {
		s, err := ipam.Open(filepath.Join(dir, network))
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Update(func(tx *ipam.Tx) error {
			for _, r := range recs {
				if err := tx.Put(r); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	rec := func(id, ip string) ipam.Record {
		return ipam.Record{Key: ipam.Key{ContainerID: id, IfName: "eth0"}, IP: netip.MustParseAddr(ip)}
	}
	put("netagent", rec("pod-a", "10.9.0.2"), rec("pod-b", "10.9.0.3"))
	put("other", rec("pod-c", "10.8.0.2"), rec("pod-d", "10.8.0.3"))
	// Pods a, b and c have their host veths; d's is gone (a DEL on its way: veth and entry
	// removed, address not yet released), so its entry must not be put back.
	for i, id := range []string{"pod-a", "pod-b", "pod-c"} {
		ns.MustRun(t, "ip", "link", "add", bridge.HostVethName(id, "eth0"), "type", "veth", "peer", "name", fmt.Sprintf("peer%d", i))
	}
	if err := os.MkdirAll(filepath.Join(dir, "not-a-store"), 0o700); err != nil {
		t.Fatal(err)
	}
	want := strs(
		entry(bridge.HostVethName("pod-a", "eth0"), "10.9.0.2"),
		entry(bridge.HostVethName("pod-b", "eth0"), "10.9.0.3"),
		entry(bridge.HostVethName("pod-c", "eth0"), "10.8.0.2"),
	)
	es, err := antispoof.Entries(dir)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(slices.Sorted(slices.Values(append(slices.Clone(want), entry(bridge.HostVethName("pod-d", "eth0"), "10.8.0.3").String()))), strs(es...)); diff != "" {
		t.Errorf("Entries (-want +got):\n%s", diff)
	}

	var st antispoof.Stats
	in(t, ns, func() error { st, err = antispoof.SyncDataDir(ctx, dir); return err })
	if st != (antispoof.Stats{Entries: 3, Added: 3, Repaired: true}) {
		t.Errorf("SyncDataDir = %+v", st)
	}
	if diff := cmp.Diff(want, list(t, ns)); diff != "" {
		t.Errorf("set (-want +got):\n%s", diff)
	}

	// A data dir that does not exist keeps the entries and says so.
	missing := filepath.Join(dir, "nope")
	in(t, ns, func() error {
		st, err = antispoof.SyncDataDir(ctx, missing)
		if err == nil || !strings.Contains(err.Error(), "kept them") {
			return fmt.Errorf("SyncDataDir(missing) = %+v, %v, want an error saying the entries were kept", st, err)
		}
		return nil
	})
	if diff := cmp.Diff(want, list(t, ns)); diff != "" {
		t.Errorf("set after a missing data dir (-want +got):\n%s", diff)
	}
	// An empty data dir is the truth: nothing recorded, nothing allowed.
	in(t, ns, func() error { st, err = antispoof.SyncDataDir(ctx, t.TempDir()); return err })
	if st != (antispoof.Stats{Removed: 3}) || len(list(t, ns)) != 0 {
		t.Errorf("SyncDataDir(empty) = %+v, set %v", st, list(t, ns))
	}
}

// TestCounters wires one pod with the plugin's own bridge code, lets it send with its own
// and with another source, and reads the counters; a repair of the rule set keeps them.
func TestCounters(t *testing.T) {
	netns.RequireRoot(t)
	node, pod := netns.New(t, "asnode"), netns.New(t, "aspod")
	h, err := node.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	podFd, err := os.Open(pod.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer podFd.Close()
	gw, addr := netip.MustParsePrefix("10.9.0.1/24"), netip.MustParsePrefix("10.9.0.2/24")
	br, err := bridge.Ensure(h, "br0", gw, 1500)
	if err != nil {
		t.Fatal(err)
	}
	veth := bridge.HostVethName("counters", "eth0")
	pn, err := bridge.OpenPodNS(vns.NsHandle(podFd.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	defer pn.Close()
	wired, err := bridge.Add(h, br, pn, bridge.Pod{NetnsFd: int(podFd.Fd()), IfName: "eth0", HostVeth: veth, Addr: addr, Gateway: gw.Addr(), MTU: 1500})
	if err != nil {
		t.Fatal(err)
	}
	// The plugin sets the host end up last (a live attachment is told from a half-done one by it).
	in(t, node, func() error { return bridge.Up(h, pn, wired, veth, "eth0") })
	in(t, node, func() error { return antispoof.Install(ctx, []antispoof.Entry{antispoof.EntryFor(veth, addr.Addr())}) })
	counts := func() antispoof.Counts {
		var c antispoof.Counts
		in(t, node, func() error { var err error; c, err = antispoof.Counters(ctx); return err })
		return c
	}
	ping := func(args ...string) error {
		_, err := pod.Run("ping", append([]string{"-c", "1", "-W", "1", "-q"}, args...)...)
		return err
	}

	if err := ping("10.9.0.1"); err != nil {
		t.Fatalf("legitimate ping: %v", err)
	}
	if c := counts(); c.SpoofedIPv4.Packets != 0 || c.SpoofedARP.Packets != 0 {
		t.Fatalf("legitimate traffic was counted as spoofed: %+v", c)
	}
	pod.MustRun(t, "ip", "addr", "add", "10.9.0.77/32", "dev", "eth0")
	if err := ping("-I", "10.9.0.77", "10.9.0.1"); err == nil {
		t.Error("ping from a spoofed source got an answer")
	}
	pod.MustRun(t, "ip", "addr", "del", "10.9.0.77/32", "dev", "eth0")
	spoofed := counts()
	var packets uint64
	in(t, node, func() error { var err error; packets, _, err = antispoof.Dropped(ctx); return err })
	if packets == 0 || packets != spoofed.SpoofedIPv4.Packets+spoofed.SpoofedARP.Packets {
		t.Errorf("Dropped = %d after a spoofed ping, counters %+v", packets, spoofed)
	}
	if err := ping("10.9.0.1"); err != nil {
		t.Errorf("legitimate ping after the spoofed one: %v", err)
	}

	// A repair rewrites the chain and re-sends the counters: their values stay.
	node.MustRun(t, "nft", "flush", "chain", "bridge", antispoof.Table, antispoof.Chain)
	in(t, node, func() error {
		st, err := antispoof.Sync(ctx, []antispoof.Entry{antispoof.EntryFor(veth, addr.Addr())})
		if err == nil && !st.Repaired {
			err = fmt.Errorf("Sync after a flushed chain = %+v, want repaired", st)
		}
		return err
	})
	if c := counts(); c.SpoofedIPv4 != spoofed.SpoofedIPv4 || c.SpoofedARP != spoofed.SpoofedARP {
		t.Errorf("counters after a repair %+v, before %+v", c, spoofed)
	}
}

// TestIPv6Entries: a dual-stack pod's entries (IPv4, IPv6 and link-local, one MAC) go into
// their sets in one Add, read back through List and nft, and go in one Delete.
func TestIPv6Entries(t *testing.T) {
	netns.RequireRoot(t)
	ns := netns.New(t, "as")
	dual := antispoof.EntriesFor("na00000000001", netip.MustParseAddr("10.9.0.2"), netip.MustParseAddr("fd00:9::2"))
	v6 := antispoof.EntriesFor("na00000000002", netip.MustParseAddr("2001:db8:9::3"))
	mac := bridge.PodMAC(netip.MustParseAddr("10.9.0.2"))
	if len(dual) != 3 || dual[2].IP != bridge.LinkLocal(mac).Addr() || dual[1].MAC.String() != mac.String() {
		t.Fatalf("EntriesFor(dual) = %v, want IPv4, IPv6 and link-local, all with MAC %s", dual, mac)
	}
	if len(v6) != 2 {
		t.Fatalf("EntriesFor(IPv6 only) = %v, want the address and link-local", v6)
	}
	in(t, ns, func() error {
		if err := antispoof.Install(ctx, v6); err != nil {
			return err
		}
		return antispoof.Add(ctx, dual...)
	})
	if got, want := list(t, ns), strs(append(dual, v6...)...); !slices.Equal(got, want) {
		t.Fatalf("List = %v, want %v", got, want)
	}
	got := ns.MustRun(t, "nft", "list", "set", "bridge", antispoof.Table, antispoof.Set6)
	if !strings.Contains(got, "type ifname . ipv6_addr . ether_addr\n") || !strings.Contains(got, `"na00000000001" . fd00:9::2 . `+mac.String()) {
		t.Errorf("nft list set %s:\n%s", antispoof.Set6, got)
	}
	in(t, ns, func() error {
		if ok, err := antispoof.Has(ctx, dual[1]); err != nil || !ok {
			return fmt.Errorf("Has(%s) = %v, %v", dual[1], ok, err)
		}
		if err := antispoof.Delete(ctx, dual...); err != nil {
			return err
		}
		return antispoof.DeleteVeth(ctx, v6[0].HostVeth)
	})
	if got := list(t, ns); len(got) != 0 {
		t.Errorf("after Delete: %v, want none", got)
	}
}

// TestSyncRoutedKeepsANewChain: a routed pod's chain that appears, with its veth, while the
// agent's sync runs, for a pod its records do not name (another data directory's pod, or
// the first pod of a network whose store came after the sync opened the stores), is kept.
// The plugin adds a chain only once its veth exists, so the links must be listed after the
// chains are read: the other order took such a chain for one whose veth is gone, and
// removed the live pod's protection with nothing to bring it back.
func TestSyncRoutedKeepsANewChain(t *testing.T) {
	netns.RequireRoot(t)
	ns := netns.New(t, "as")
	dir := t.TempDir()
	if _, err := ipam.Open(filepath.Join(dir, "netagent")); err != nil { // a store with no pod
		t.Fatal(err)
	}
	veth := bridge.HostVethName("pod-elsewhere", "eth0")
	restore := antispoof.SetBetweenRoutedReads(func() {
		ns.MustRun(t, "ip", "link", "add", veth, "type", "veth", "peer", "name", "peer-elsewhere")
		if err := antispoof.AddRouted(ctx, antispoof.Routed{HostVeth: veth, IPs: []netip.Addr{netip.MustParseAddr("10.9.0.5")}}); err != nil {
			t.Error(err)
		}
	})
	in(t, ns, func() error { _, err := antispoof.SyncDataDir(ctx, dir); return err })
	restore()
	var chains []string
	in(t, ns, func() error {
		var err error
		chains, err = antispoof.RoutedChains(ctx)
		return err
	})
	if !slices.Contains(chains, veth) {
		t.Errorf("chains after a sync during the pod's ADD = %v, want %s kept", chains, veth)
	}
}

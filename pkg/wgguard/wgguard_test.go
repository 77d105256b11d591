package wgguard

import (
	"bytes"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/test/netns"
)

// TestSetDriftRemove applies specs in order against a real kernel: the rule nft prints,
// nothing written when nothing changed, drift seen and repaired, the zero Spec removing it.
func TestSetDriftRemove(t *testing.T) {
	netns.RequireRoot(t)
	ns := netns.New(t, "wgguard")
	var g *Guard
	if err := ns.Do(func() (err error) { g, err = New(); return err }); err != nil {
		t.Fatal(err)
	}
	// list is the guard's tables as nft prints them, the ip one first.
	list := func() string {
		var b strings.Builder
		for _, family := range []string{"ip", "ip6"} {
			if out, err := ns.Run("nft", "list", "table", family, Table); err == nil {
				b.WriteString(out)
			}
		}
		return b.String()
	}
	a := Spec{Underlay: "eth0", Network: netip.MustParsePrefix("10.244.0.0/16")}
	b := Spec{Underlay: "ens3", Network: netip.MustParsePrefix("10.42.0.0/16")}
	dual := Spec{Underlay: "eth0", Network: netip.MustParsePrefix("10.244.0.0/16"), Network6: netip.MustParsePrefix("fd00:10:244::/48")}
	v6 := Spec{Underlay: "eth0", Network6: netip.MustParsePrefix("fd00:10:244::/48")}
	routable := v6
	routable.Routable6 = true
	const rule6 = `iifname "eth0" ip6 daddr fd00:10:244::/48 counter packets 0 bytes 0 drop`
	for _, step := range []struct {
		name  string
		spec  Spec
		drift func()
		want  []string // rules in nft's listing (none: no table)
	}{
		{"first", a, nil, []string{`iifname "eth0" ip daddr 10.244.0.0/16 counter packets 0 bytes 0 drop`}},
		{"again", a, nil, []string{`iifname "eth0" ip daddr 10.244.0.0/16`}},
		{"another underlay and network", b, nil, []string{`iifname "ens3" ip daddr 10.42.0.0/16`}},
		{"rule deleted", b, func() { ns.MustRun(t, "nft", "flush", "chain", "ip", Table, Chain) }, []string{`iifname "ens3" ip daddr 10.42.0.0/16`}},
		{"table deleted", b, func() { ns.MustRun(t, "nft", "delete", "table", "ip", Table) }, []string{`iifname "ens3" ip daddr 10.42.0.0/16`}},
		{"a rule added", b, func() { ns.MustRun(t, "nft", "add", "rule", "ip", Table, Chain, "accept") }, []string{`iifname "ens3" ip daddr 10.42.0.0/16`}},
		{"dual stack", dual, nil, []string{`iifname "eth0" ip daddr 10.244.0.0/16`, rule6}},
		{"IPv6 rule deleted", dual, func() { ns.MustRun(t, "nft", "flush", "chain", "ip6", Table, Chain) }, []string{`iifname "eth0" ip daddr 10.244.0.0/16`, rule6}},
		{"IPv6 table deleted", dual, func() { ns.MustRun(t, "nft", "delete", "table", "ip6", Table) }, []string{`iifname "eth0" ip daddr 10.244.0.0/16`, rule6}},
		{"IPv6 only: the IPv4 table goes", v6, nil, []string{rule6}},
		{"IPv6 routable: pod sources only", routable, nil, []string{`iifname "eth0" ip6 saddr fd00:10:244::/48 ip6 daddr fd00:10:244::/48 counter`}},
		{"IPv6 routable rule replaced", routable, func() {
			ns.MustRun(t, "nft", "flush", "chain", "ip6", Table, Chain)
			ns.MustRun(t, "nft", "add", "rule", "ip6", Table, Chain, "iifname", "eth0", "ip6", "daddr", "fd00:10:244::/48", "counter", "drop")
		}, []string{`iifname "eth0" ip6 saddr fd00:10:244::/48 ip6 daddr fd00:10:244::/48 counter`}},
		{"IPv6 masqueraded again", v6, nil, []string{rule6}},
		{"IPv4 table back", v6, func() { ns.MustRun(t, "nft", "add", "table", "ip", Table) }, []string{rule6}},
		{"removed", Spec{}, nil, nil},
		{"removed again", Spec{}, nil, nil},
	} {
		t.Run(step.name, func(t *testing.T) {
			if step.drift != nil {
				step.drift()
				if g.Drifted() == "" {
					t.Fatal("Drifted() = \"\" after a change behind the guard's back")
				}
			}
			if err := g.Set(step.spec); err != nil {
				t.Fatal(err)
			}
			if why := g.Drifted(); why != "" {
				t.Errorf("Drifted() = %q right after Set", why)
			}
			got := list()
			ok := strings.Count(got, "drop") == len(step.want) && strings.Count(got, "accept") == len(step.want) &&
				strings.Count(got, "type filter hook prerouting priority raw; policy accept;") == len(step.want)
			for _, w := range step.want {
				ok = ok && strings.Contains(got, w)
			}
			if !ok {
				t.Errorf("tables:\n%s\nwant one rule each at prerouting, raw: %q", got, step.want)
			}
		})
	}
	for _, bad := range []Spec{{Underlay: "eth0"}, {Underlay: "eth0", Network: netip.MustParsePrefix("10.0.0.0/8"), Routable6: true}, {Underlay: "eth0", Network: netip.MustParsePrefix("fd00::/48")}, {Underlay: "eth0", Network6: netip.MustParsePrefix("10.0.0.0/8")}} {
		if err := g.Set(bad); err == nil {
			t.Errorf("Set(%+v) succeeded", bad)
		}
	}
}

// An unencrypted IPv4 or IPv6 packet for the pod network arriving on the underlay is
// dropped (counted), one for the node's own address passes; with routable IPv6 pods, only
// one from a pod source is.
func TestDrops(t *testing.T) {
	node, peer := underlay(t)
	node.MustRun(t, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
	// The pod networks are local on the node (lo), so a packet that got through would be
	// answered.
	node.MustRun(t, "ip", "addr", "add", "10.244.1.2/32", "dev", "lo")
	node.MustRun(t, "ip", "addr", "add", "fd00:10:244:1::2/128", "dev", "lo")
	peer.MustRun(t, "ip", "route", "add", "10.244.0.0/16", "via", "192.0.2.1")
	peer.MustRun(t, "ip", "-6", "route", "add", "fd00:10:244::/48", "via", "2001:db8:1::1")
	var g *Guard
	if err := node.Do(func() (err error) { g, err = New(); return err }); err != nil {
		t.Fatal(err)
	}
	for _, dst := range []string{"10.244.1.2", "fd00:10:244:1::2"} {
		if _, err := peer.Run("ping", "-c", "1", "-W", "1", dst); err != nil {
			t.Fatalf("ping %s before the guard: %v (the test would prove nothing)", dst, err)
		}
	}
	if err := g.Set(Spec{Underlay: "eth0", Network: netip.MustParsePrefix("10.244.0.0/16"), Network6: netip.MustParsePrefix("fd00:10:244::/48")}); err != nil {
		t.Fatal(err)
	}
	for _, dst := range []string{"10.244.1.2", "fd00:10:244:1::2"} {
		if _, err := peer.Run("ping", "-c", "2", "-i", "0.1", "-W", "1", dst); err == nil {
			t.Errorf("ping %s from the underlay got through the guard", dst)
		}
	}
	for _, dst := range []string{"192.0.2.1", "2001:db8:1::1"} {
		if _, err := peer.Run("ping", "-c", "1", "-W", "1", dst); err != nil {
			t.Errorf("ping the node's own %s: %v", dst, err)
		}
	}
	if n := g.Dropped(); n != 4 {
		t.Errorf("Dropped() = %d, want 4 (two pings per family)", n)
	}

	// IPv6 pods not masqueraded: the outside reaches them from the underlay, a source in
	// the pod network does not.
	if err := g.Set(Spec{Underlay: "eth0", Network6: netip.MustParsePrefix("fd00:10:244::/48"), Routable6: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := peer.Run("ping", "-c", "1", "-W", "1", "fd00:10:244:1::2"); err != nil {
		t.Errorf("ping a routable IPv6 pod from the outside: %v", err)
	}
	peer.MustRun(t, "ip", "addr", "add", "fd00:10:244:9::9/128", "dev", "lo")
	if _, err := peer.Run("ping", "-c", "2", "-i", "0.1", "-W", "1", "-I", "fd00:10:244:9::9", "fd00:10:244:1::2"); err == nil {
		t.Error("ping from a pod source on the underlay got through the guard")
	}
	if n := g.Dropped(); n != 2 {
		t.Errorf("Dropped() = %d, want 2 (the pings from a pod source)", n)
	}
}

// Handshake initiations and responses to the port are recorded by source, over either
// underlay family, whether or not anything listens; other messages to the port and
// handshake messages to other ports are not.
func TestHandshakes(t *testing.T) {
	node, peer := underlay(t)
	if _, err := peer.Run("ip", "addr", "add", "192.0.2.3/24", "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	var g *Guard
	if err := node.Do(func() (err error) { g, err = New(); return err }); err != nil {
		t.Fatal(err)
	}
	// IPv6 pods only: the IPv4 table exists for the IPv4 underlay's initiations.
	if err := g.Set(Spec{Underlay: "eth0", Network6: netip.MustParsePrefix("fd00:10:244::/48"), Port: 51820}); err != nil {
		t.Fatal(err)
	}
	if why := g.Drifted(); why != "" {
		t.Fatalf("Drifted() = %q right after Set", why)
	}
	// The recording rule is the guard's like the drop rule: its loss is drift, repaired.
	node.MustRun(t, "nft", "flush", "chain", "ip", Table, Chain)
	if g.Drifted() == "" {
		t.Fatal("Drifted() = \"\" with the IPv4 recording rule gone")
	}
	if err := g.Set(Spec{Underlay: "eth0", Network6: netip.MustParsePrefix("fd00:10:244::/48"), Port: 51820}); err != nil {
		t.Fatal(err)
	}
	if why := g.Drifted(); why != "" {
		t.Fatalf("Drifted() = %q after the repair", why)
	}
	initiation := append([]byte{1, 0, 0, 0}, make([]byte, 144)...)
	response := append([]byte{2, 0, 0, 0}, make([]byte, 88)...)
	send := func(from, to netip.AddrPort, b []byte) {
		t.Helper()
		err := peer.Do(func() error {
			c, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(from), net.UDPAddrFromAddrPort(to))
			if err != nil {
				return err
			}
			defer c.Close()
			_, err = c.Write(b)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	ap := netip.MustParseAddrPort
	send(ap("192.0.2.2:40000"), ap("192.0.2.1:51820"), initiation)
	send(ap("[2001:db8:1::2]:40000"), ap("[2001:db8:1::1]:51820"), initiation)
	send(ap("192.0.2.3:40000"), ap("192.0.2.1:51820"), response)
	send(ap("[2001:db8:1::2]:40000"), ap("[2001:db8:1::1]:51821"), response)                        // another port
	send(ap("192.0.2.3:40000"), ap("192.0.2.1:51821"), initiation)                                  // another port
	send(ap("192.0.2.2:40000"), ap("192.0.2.1:51820"), append(bytes.Clone(response), 0))            // another length
	send(ap("[2001:db8:1::2]:40000"), ap("[2001:db8:1::1]:51820"), append([]byte{4, 0, 0, 0}, 0x1)) // another type
	var ini, resp map[netip.Addr]time.Duration
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		var err error
		if ini, resp, err = g.Handshakes(); err != nil {
			t.Fatal(err)
		}
		if len(ini)+len(resp) >= 3 || time.Now().After(deadline) {
			break
		}
	}
	if len(ini) != 2 || len(resp) != 1 {
		t.Fatalf("Handshakes() = initiations %v, responses %v; want 192.0.2.2 and 2001:db8:1::2, and 192.0.2.3", ini, resp)
	}
	for _, a := range []string{"192.0.2.2", "2001:db8:1::2"} {
		if age, ok := ini[netip.MustParseAddr(a)]; !ok || age < 0 || age > time.Second {
			t.Errorf("initiations[%s] = %v, %v; want a recent one", a, age, ok)
		}
	}
	if age, ok := resp[netip.MustParseAddr("192.0.2.3")]; !ok || age < 0 || age > time.Second {
		t.Errorf("responses[192.0.2.3] = %v, %v; want a recent one", age, ok)
	}
	time.Sleep(300 * time.Millisecond)
	ini, _, err := g.Handshakes()
	if age := ini[netip.MustParseAddr("192.0.2.2")]; err != nil || age < 250*time.Millisecond {
		t.Errorf("Handshakes() 300 ms later: age %v, %v; want it to have grown", age, err)
	}
	// Without a port nothing is recorded, and the IPv4 table (no IPv4 pods) goes.
	if err := g.Set(Spec{Underlay: "eth0", Network6: netip.MustParsePrefix("fd00:10:244::/48")}); err != nil {
		t.Fatal(err)
	}
	if ini, resp, err := g.Handshakes(); err != nil || ini != nil || resp != nil {
		t.Errorf("Handshakes() without a port = %v, %v, %v", ini, resp, err)
	}
	if _, err := node.Run("nft", "list", "table", "ip", Table); err == nil {
		t.Error("the IPv4 table stayed without IPv4 pods or a port")
	}
}

// underlay is a node and a peer on one veth, with addresses of both families.
func underlay(t *testing.T) (node, peer *netns.NS) {
	t.Helper()
	netns.RequireRoot(t)
	node, peer = netns.New(t, "wgguard-n"), netns.New(t, "wgguard-p")
	if err := netns.Veth(node, "eth0", peer, "eth0"); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		ns   *netns.NS
		addr string
	}{{node, "192.0.2.1/24"}, {node, "2001:db8:1::1/64"}, {peer, "192.0.2.2/24"}, {peer, "2001:db8:1::2/64"}} {
		if _, err := c.ns.Run("ip", "addr", "add", c.addr, "dev", "eth0", "nodad"); err != nil {
			t.Fatal(err)
		}
	}
	return node, peer
}

package wireguard

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/netipx"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func genKey(t testing.TB) wgtypes.Key {
	t.Helper()
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestPeersRejects(t *testing.T) {
	self := Self{PublicKey: genKey(t).PublicKey(), Network: netip.MustParsePrefix("10.244.0.0/16"), Subnet: netip.MustParsePrefix("10.244.1.0/24")}
	good := genKey(t).PublicKey().String()
	spec := func(f func(*PeerSpec)) PeerSpec {
		s := PeerSpec{Node: "n2", PublicKey: good, Endpoint: "192.0.2.2:51820", AllowedIPs: []string{"10.244.2.0/24"}}
		f(&s)
		return s
	}
	tests := []struct {
		name string
		spec PeerSpec
		want string
	}{
		{"no node", spec(func(s *PeerSpec) { s.Node = "" }), "node: empty"},
		{"bad key", spec(func(s *PeerSpec) { s.PublicKey = "x" }), "public key: bad key"},
		{"zero key", spec(func(s *PeerSpec) { s.PublicKey = wgtypes.Key{}.String() }), "all zero"},
		{"own key", spec(func(s *PeerSpec) { s.PublicKey = self.PublicKey.String() }), "this node's own"},
		{"endpoint no port", spec(func(s *PeerSpec) { s.Endpoint = "192.0.2.2" }), "endpoint"},
		{"endpoint port 0", spec(func(s *PeerSpec) { s.Endpoint = "192.0.2.2:0" }), "port 0"},
		{"endpoint hostname", spec(func(s *PeerSpec) { s.Endpoint = "node2:51820" }), "endpoint"},
		{"endpoint unspecified", spec(func(s *PeerSpec) { s.Endpoint = "0.0.0.0:51820" }), "not a unicast"},
		{"endpoint loopback", spec(func(s *PeerSpec) { s.Endpoint = "127.0.0.1:51820" }), "not a unicast"},
		{"endpoint multicast", spec(func(s *PeerSpec) { s.Endpoint = "[ff02::1]:51820" }), "not a unicast"},
		{"endpoint broadcast", spec(func(s *PeerSpec) { s.Endpoint = "255.255.255.255:51820" }), "not a unicast"},
		{"endpoint zone", spec(func(s *PeerSpec) { s.Endpoint = "[fe80::1%eth0]:51820" }), "zoned"},
		{"no allowed IPs", spec(func(s *PeerSpec) { s.AllowedIPs = nil }), "allowed IPs: none"},
		{"allowed garbage", spec(func(s *PeerSpec) { s.AllowedIPs = []string{"10.244.2.0"} }), "allowed IPs"},
		{"allowed host bits", spec(func(s *PeerSpec) { s.AllowedIPs = []string{"10.244.2.1/24"} }), "host bits"},
		{"allowed default route", spec(func(s *PeerSpec) { s.AllowedIPs = []string{"0.0.0.0/0"} }), "outside the pod network"},
		{"allowed wider than network", spec(func(s *PeerSpec) { s.AllowedIPs = []string{"10.0.0.0/8"} }), "outside the pod network"},
		{"allowed outside network", spec(func(s *PeerSpec) { s.AllowedIPs = []string{"192.0.2.0/24"} }), "outside the pod network"},
		{"allowed IPv6 in IPv4 network", spec(func(s *PeerSpec) { s.AllowedIPs = []string{"::ffff:10.244.2.0/120"} }), "outside the pod network"},
		{"allowed own subnet", spec(func(s *PeerSpec) { s.AllowedIPs = []string{"10.244.1.128/25"} }), "this node's subnet"},
		{"allowed covers own subnet", spec(func(s *PeerSpec) { s.AllowedIPs = []string{"10.244.0.0/23"} }), "this node's subnet"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Peers(self, []PeerSpec{tt.spec})
			if len(got) != 0 || err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Peers(%+v) = %d peers, %v; want none and an error with %q", tt.spec, len(got), err, tt.want)
			}
			if !strings.Contains(err.Error(), `peer "`+tt.spec.Node+`"`) {
				t.Errorf("error %q does not name the peer", err)
			}
		})
	}
}

// Dual-stack and IPv6-only clusters: a peer's allowed IPs are its subnets of both
// families, each checked against the pod network of its family and this node's subnets.
func TestPeersIPv6(t *testing.T) {
	dual := Self{PublicKey: genKey(t).PublicKey(), Network: netip.MustParsePrefix("10.244.0.0/16"), Subnet: netip.MustParsePrefix("10.244.1.0/24"),
		Network6: netip.MustParsePrefix("fd00::/48"), Subnet6: netip.MustParsePrefix("fd00:0:0:1::/64")}
	v6only := dual
	v6only.Network, v6only.Subnet = netip.Prefix{}, netip.Prefix{}
	k2, k3 := genKey(t).PublicKey(), genKey(t).PublicKey()
	p := func(node string, k wgtypes.Key, ep string, ips ...string) PeerSpec {
		return PeerSpec{Node: node, PublicKey: k.String(), Endpoint: ep, AllowedIPs: ips}
	}
	tests := []struct {
		name    string
		self    Self
		specs   []PeerSpec
		want    string // the peers kept, as "node endpoint allowed,..." lines
		wantErr string
	}{
		{"dual, IPv4 endpoint", dual, []PeerSpec{p("n2", k2, "192.0.2.2:51820", "fd00:0:0:2::/64", "10.244.2.0/24")}, "n2 192.0.2.2:51820 10.244.2.0/24,fd00:0:0:2::/64", ""},
		{"IPv6-only, IPv6 endpoint", v6only, []PeerSpec{p("n2", k2, "[2001:db8:1::2]:51820", "fd00:0:0:2::/64")}, "n2 [2001:db8:1::2]:51820 fd00:0:0:2::/64", ""},
		{"IPv6-only: an IPv4 allowed IP", v6only, []PeerSpec{p("n2", k2, "[2001:db8:1::2]:51820", "fd00:0:0:2::/64", "10.244.2.0/24")}, "", "has none of its family"},
		{"IPv6 own subnet", dual, []PeerSpec{p("n2", k2, "192.0.2.2:51820", "10.244.2.0/24", "fd00:0:0:1::/64")}, "", "overlaps this node's subnet fd00:0:0:1::/64"},
		{"IPv6 outside", dual, []PeerSpec{p("n2", k2, "192.0.2.2:51820", "10.244.2.0/24", "fd01::/64")}, "", "outside the pod network fd00::/48"},
		{"IPv6 wider than the network", dual, []PeerSpec{p("n2", k2, "192.0.2.2:51820", "fd00::/40")}, "", "outside the pod network fd00::/48"},
		{"IPv6 hijack", dual, []PeerSpec{p("n2", k2, "192.0.2.2:51820", "10.244.2.0/24", "fd00:0:0:2::/64"), p("n3", k3, "192.0.2.3:51820", "10.244.3.0/24", "fd00:0:0:2::/80")}, "", "overlapping allowed IPs"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Peers(tt.self, tt.specs)
			var lines []string
			for _, g := range got {
				lines = append(lines, fmt.Sprintf("%s %s %s", g.Node, g.Endpoint, netipx.Join(g.AllowedIPs)))
			}
			if s := strings.Join(lines, "\n"); s != tt.want {
				t.Errorf("Peers() kept %q, want %q", s, tt.want)
			}
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Errorf("Peers() error = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

func TestPeersConflicts(t *testing.T) {
	self := Self{PublicKey: genKey(t).PublicKey(), Network: netip.MustParsePrefix("10.244.0.0/16"), Subnet: netip.MustParsePrefix("10.244.1.0/24")}
	k2, k3, k4 := genKey(t).PublicKey(), genKey(t).PublicKey(), genKey(t).PublicKey()
	p := func(node string, k wgtypes.Key, ips ...string) PeerSpec {
		return PeerSpec{Node: node, PublicKey: k.String(), Endpoint: "[::ffff:192.0.2.9]:51820", AllowedIPs: ips}
	}
	tests := []struct {
		name    string
		specs   []PeerSpec
		want    []string // nodes kept
		wantErr string
	}{
		{"distinct", []PeerSpec{p("n2", k2, "10.244.2.0/24"), p("n3", k3, "10.244.3.0/24")}, []string{"n2", "n3"}, ""},
		{"same key", []PeerSpec{p("n2", k2, "10.244.2.0/24"), p("n3", k2, "10.244.3.0/24"), p("n4", k4, "10.244.4.0/24")}, []string{"n4"}, "same public key"},
		{"hijack a subnet", []PeerSpec{p("n2", k2, "10.244.2.0/24"), p("n3", k3, "10.244.3.0/24", "10.244.2.128/25"), p("n4", k4, "10.244.4.0/24")}, []string{"n4"}, "overlapping allowed IPs"},
		{"same subnet twice", []PeerSpec{p("n2", k2, "10.244.2.0/24"), p("n3", k3, "10.244.2.0/24")}, nil, "overlapping"},
		{"one bad, others kept", []PeerSpec{p("n2", k2, "10.244.2.0/24"), p("n3", k3, "10.244.300.0/24")}, []string{"n2"}, `peer "n3"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Peers(self, tt.specs)
			var nodes []string
			for _, g := range got {
				nodes = append(nodes, g.Node)
				if g.Endpoint != netip.MustParseAddrPort("192.0.2.9:51820") {
					t.Errorf("peer %s endpoint = %s, want the IPv4-mapped address unmapped", g.Node, g.Endpoint)
				}
			}
			if !sameSet(tt.want, nodes) {
				t.Errorf("Peers kept %v, want %v", nodes, tt.want)
			}
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Errorf("Peers error = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

func sameSet(a, b []string) bool {
	m := map[string]int{}
	for _, x := range a {
		m[x]++
	}
	for _, x := range b {
		m[x]--
	}
	for _, v := range m {
		if v != 0 {
			return false
		}
	}
	return true
}

func TestConfigValidate(t *testing.T) {
	ok := Config{Name: "wg0", PrivateKey: genKey(t), ListenPort: 51820, MTU: 1440}
	if err := ok.Validate(); err != nil {
		t.Fatalf("Validate(%+v) = %v", ok.Name, err)
	}
	k := genKey(t).PublicKey()
	tests := []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"long name", func(c *Config) { c.Name = "a-very-long-name0" }, "1-15 characters"},
		{"slash", func(c *Config) { c.Name = "../x" }, "not a valid interface name"},
		{"no key", func(c *Config) { c.PrivateKey = wgtypes.Key{} }, "private key"},
		{"port", func(c *Config) { c.ListenPort = 0 }, "listen port"},
		{"mtu", func(c *Config) { c.MTU = 1000 }, "mtu 1000"},
		{"dup peer", func(c *Config) { c.Peers = []Peer{{Node: "a", PublicKey: k}, {Node: "b", PublicKey: k}} }, "listed twice"},
	}
	for _, tt := range tests {
		c := ok
		tt.mod(&c)
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: Validate = %v, want an error with %q", tt.name, err, tt.want)
		}
	}
}

// TestDiff covers each kind of drift between the desired state and what wgctrl reads back.
func TestDiff(t *testing.T) {
	priv, other := genKey(t), genKey(t)
	psk := genKey(t)
	k2, k3, k9 := genKey(t).PublicKey(), genKey(t).PublicKey(), genKey(t).PublicKey()
	ep2 := netip.MustParseAddrPort("192.0.2.2:51820")
	ep3 := netip.MustParseAddrPort("192.0.2.3:51820")
	sub2, sub3 := netip.MustParsePrefix("10.244.2.0/24"), netip.MustParsePrefix("10.244.3.0/24")
	want := Config{Name: "wg0", PrivateKey: priv, ListenPort: 51820, MTU: 1440, Peers: []Peer{
		{Node: "n2", PublicKey: k2, Endpoint: ep2, AllowedIPs: []netip.Prefix{sub2}},
		{Node: "n3", PublicKey: k3, Endpoint: ep3, AllowedIPs: []netip.Prefix{sub3}},
	}}
	ipnet := func(s string) net.IPNet { _, n, _ := net.ParseCIDR(s); return *n }
	inSync := func() *wgtypes.Device {
		return &wgtypes.Device{Name: "wg0", PrivateKey: priv, ListenPort: 51820, Peers: []wgtypes.Peer{
			{PublicKey: k2, Endpoint: net.UDPAddrFromAddrPort(ep2), AllowedIPs: []net.IPNet{ipnet("10.244.2.0/24")}, LastHandshakeTime: time.Now()},
			// wgctrl reads an IPv4 endpoint back as 16 bytes: still the same endpoint.
			{PublicKey: k3, Endpoint: &net.UDPAddr{IP: net.ParseIP("192.0.2.3"), Port: 51820}, AllowedIPs: []net.IPNet{ipnet("10.244.3.0/24")}},
		}}
	}
	tests := []struct {
		name    string
		cur     func(d *wgtypes.Device)
		cfg     func(c *Config)
		want    string // Changes.String()
		nothing bool   // no request at all
	}{
		{name: "in sync", cur: func(*wgtypes.Device) {}, want: "no change", nothing: true},
		{name: "fresh device", cur: func(d *wgtypes.Device) { *d = wgtypes.Device{Name: "wg0"} }, want: "private key; listen port; added n2,n3"},
		{name: "key rotated here", cur: func(d *wgtypes.Device) { d.PrivateKey = other }, want: "private key"},
		{name: "port", cur: func(d *wgtypes.Device) { d.ListenPort = 40000 }, want: "listen port"},
		{name: "peer removed by hand", cur: func(d *wgtypes.Device) { d.Peers = d.Peers[:1] }, want: "added n3"},
		{name: "unknown peer", cur: func(d *wgtypes.Device) { d.Peers = append(d.Peers, wgtypes.Peer{PublicKey: k9}) }, want: "removed " + k9.String()},
		{name: "peer rotated its key", cfg: func(c *Config) { c.Peers[1].PublicKey = k9 }, cur: func(*wgtypes.Device) {}, want: "added n3; removed " + k3.String()},
		{name: "endpoint changed by hand", cur: func(d *wgtypes.Device) { d.Peers[0].Endpoint.Port = 1 }, want: "updated n2"},
		{name: "endpoint lost", cur: func(d *wgtypes.Device) { d.Peers[0].Endpoint = nil }, want: "updated n2"},
		{name: "allowed IP added by hand", cur: func(d *wgtypes.Device) { d.Peers[0].AllowedIPs = append(d.Peers[0].AllowedIPs, ipnet("10.244.9.0/24")) }, want: "updated n2"},
		{name: "allowed IPs emptied", cur: func(d *wgtypes.Device) { d.Peers[1].AllowedIPs = nil }, want: "updated n3"},
		{name: "keepalive set by hand", cur: func(d *wgtypes.Device) { d.Peers[0].PersistentKeepaliveInterval = 25 * time.Second }, want: "updated n2"},
		{name: "psk wanted", cfg: func(c *Config) { c.PresharedKey = &psk }, cur: func(*wgtypes.Device) {}, want: "updated n2,n3"},
		{name: "psk in place", cfg: func(c *Config) { c.PresharedKey = &psk }, cur: func(d *wgtypes.Device) {
			d.Peers[0].PresharedKey, d.Peers[1].PresharedKey = psk, psk
		}, want: "no change", nothing: true},
		{name: "psk dropped", cur: func(d *wgtypes.Device) { d.Peers[0].PresharedKey = psk }, want: "updated n2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := want
			c.Peers = append([]Peer(nil), want.Peers...)
			if tt.cfg != nil {
				tt.cfg(&c)
			}
			cur := inSync()
			tt.cur(cur)
			wc, lead, follow, ch := diff(c, cur)
			if ch.String() != tt.want {
				t.Errorf("diff changes = %q, want %q", ch, tt.want)
			}
			if (wc == nil) != tt.nothing {
				t.Fatalf("diff request = %+v, want none: %v", wc, tt.nothing)
			}
			if wc == nil {
				return
			}
			// Applying the request to the device must give the desired state, and an
			// unchanged peer must not appear in it (its session would be disturbed).
			got := apply(t, cur, *wc)
			// Each new peer is either kicked now (we lead: the keepalive on, and off again
			// later in the request) or followed up (it leads), never both.
			self := c.PrivateKey.PublicKey()
			off := map[wgtypes.Key]int{}
			for i, pc := range wc.Peers {
				if pc.UpdateOnly && pc.PersistentKeepaliveInterval != nil && *pc.PersistentKeepaliveInterval == 0 {
					off[pc.PublicKey] = i
				}
			}
			for i, pc := range wc.Peers {
				if pc.UpdateOnly || pc.Remove {
					continue
				}
				kick := pc.PersistentKeepaliveInterval != nil && *pc.PersistentKeepaliveInterval != 0
				followed := slices.Contains(follow, pc.PublicKey)
				if kick != leads(self, pc.PublicKey) || followed == kick || kick != slices.Contains(lead, pc.PublicKey) {
					t.Errorf("new peer %s: kicked %v, followed up %v; we lead: %v", pc.PublicKey, kick, followed, leads(self, pc.PublicKey))
				}
				if j, ok := off[pc.PublicKey]; kick && (!ok || j < i) {
					t.Errorf("kicked peer %s: its keepalive is not turned off later in the request", pc.PublicKey)
				}
			}
			if wc2, _, _, ch2 := diff(c, got); wc2 != nil {
				t.Errorf("after applying, diff still asks for %q", ch2)
			}
			for _, pc := range wc.Peers {
				if pc.Remove {
					continue
				}
				for _, h := range cur.Peers {
					if h.PublicKey == pc.PublicKey && !pc.UpdateOnly {
						t.Errorf("request re-adds existing peer %s instead of updating it", pc.PublicKey)
					}
				}
			}
		})
	}
}

// TestOneSideKicks: of the two nodes of a pair that learn of each other, exactly one
// starts the handshake at once and the other follows up (two initiations that cross cost
// both sides REKEY_TIMEOUT, 5 s: TestHandshakeCrossing).
func TestOneSideKicks(t *testing.T) {
	for range 50 {
		a, b := genKey(t), genKey(t)
		sides := []struct {
			self, peer wgtypes.Key
		}{{a, b}, {b, a}}
		kicks := 0
		for _, s := range sides {
			c := Config{Name: "wg0", PrivateKey: s.self, ListenPort: 51820, MTU: 1440, Peers: []Peer{{
				Node: "peer", PublicKey: s.peer.PublicKey(), Endpoint: netip.MustParseAddrPort("192.0.2.2:51820"), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.244.2.0/24")},
			}}}
			wc, lead, follow, _ := diff(c, &wgtypes.Device{Name: "wg0", PrivateKey: s.self, ListenPort: 51820})
			kick := wc.Peers[0].PersistentKeepaliveInterval != nil
			if kick == (len(follow) == 1) || kick != (len(wc.Peers) == 2) || kick != (len(lead) == 1) {
				t.Fatalf("new peer: request %+v, lead %v, followed up %v", wc.Peers, lead, follow)
			}
			if kick {
				kicks++
			}
		}
		if kicks != 1 {
			t.Fatalf("%d sides of a pair kick the first handshake at once, want exactly one", kicks)
		}
	}
}

// TestRekeyKicks: a new private key (set here, or given out of band: KeyReplaced) ends every
// session, so the peers we lead are kicked again, and only those; otherwise an unchanged
// peer is not touched.
func TestRekeyKicks(t *testing.T) {
	priv, old := genKey(t), genKey(t)
	var peers []Peer
	var device []wgtypes.Peer
	for i := range 8 {
		k := genKey(t).PublicKey()
		ep := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), uint16(51820+i))
		sub := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i + 2), 0}), 24)
		peers = append(peers, Peer{Node: fmt.Sprint("n", i), PublicKey: k, Endpoint: ep, AllowedIPs: []netip.Prefix{sub}})
		device = append(device, wgtypes.Peer{PublicKey: k, Endpoint: net.UDPAddrFromAddrPort(ep), AllowedIPs: []net.IPNet{*netipx.IPNet(sub)}})
	}
	for _, tt := range []struct {
		name     string
		have     wgtypes.Key
		replaced bool
		kicks    bool
	}{{"in sync", priv, false, false}, {"key changed here", old, false, true}, {"key replaced out of band", priv, true, true}} {
		t.Run(tt.name, func(t *testing.T) {
			c := Config{Name: "wg0", PrivateKey: priv, ListenPort: 51820, MTU: 1440, Peers: peers, KeyReplaced: tt.replaced}
			_, lead, follow, _ := diff(c, &wgtypes.Device{Name: "wg0", PrivateKey: tt.have, ListenPort: 51820, Peers: device})
			var want []wgtypes.Key
			for _, p := range peers {
				if tt.kicks && leads(priv.PublicKey(), p.PublicKey) {
					want = append(want, p.PublicKey)
				}
			}
			if !slices.Equal(lead, want) || len(follow) != 0 {
				t.Errorf("diff kicks %v and follows %v, want kicks %v", lead, follow, want)
			}
		})
	}
}

// apply is wg(8)'s semantics of a configuration request, enough to check diff's requests.
func apply(t *testing.T, d *wgtypes.Device, c wgtypes.Config) *wgtypes.Device {
	t.Helper()
	out := *d
	out.Peers = append([]wgtypes.Peer(nil), d.Peers...)
	if c.PrivateKey != nil {
		out.PrivateKey = *c.PrivateKey
	}
	if c.ListenPort != nil {
		out.ListenPort = *c.ListenPort
	}
	for _, pc := range c.Peers {
		i := -1
		for j := range out.Peers {
			if out.Peers[j].PublicKey == pc.PublicKey {
				i = j
			}
		}
		switch {
		case pc.Remove:
			if i >= 0 {
				out.Peers = append(out.Peers[:i], out.Peers[i+1:]...)
			}
			continue
		case i < 0 && pc.UpdateOnly:
			t.Fatalf("update of missing peer %s", pc.PublicKey)
		case i < 0:
			out.Peers = append(out.Peers, wgtypes.Peer{PublicKey: pc.PublicKey})
			i = len(out.Peers) - 1
		}
		p := &out.Peers[i]
		if pc.Endpoint != nil {
			p.Endpoint = pc.Endpoint
		}
		if pc.PresharedKey != nil {
			p.PresharedKey = *pc.PresharedKey
		}
		if pc.PersistentKeepaliveInterval != nil {
			p.PersistentKeepaliveInterval = *pc.PersistentKeepaliveInterval
		}
		if pc.ReplaceAllowedIPs {
			p.AllowedIPs = nil
		}
		p.AllowedIPs = append(p.AllowedIPs, pc.AllowedIPs...)
	}
	return &out
}

// FuzzPeers feeds hostile store content to Peers (a dual-stack node): whatever it accepts
// lies inside the pod network of its family, outside our subnets, and no two accepted peers
// share a key or a prefix.
func FuzzPeers(f *testing.F) {
	k1 := "hfBAxUYwzmeCq1NlgUWWzH/kpQtzOGJ743wnbIv2ux4="
	k2 := "Spia8ZU+XbXttSHgqeN/8JSQ1/Oglww95HHcIvsvUWI="
	f.Add(k1, "192.0.2.2:51820", "10.244.2.0/24", k2, "192.0.2.3:51820", "10.244.3.0/24")
	f.Add(k1, "[2001:db8::1]:1", "10.244.0.0/16", k1, "0.0.0.0:0", "0.0.0.0/0")
	f.Add(k1, "[2001:db8::2]:51820", "10.244.2.0/24,fd00:0:0:2::/64", k2, "[2001:db8::3]:51820", "fd00:0:0:2:8000::/65,::/0")
	self := Self{Network: netip.MustParsePrefix("10.244.0.0/16"), Subnet: netip.MustParsePrefix("10.244.1.0/24"),
		Network6: netip.MustParsePrefix("fd00::/48"), Subnet6: netip.MustParsePrefix("fd00:0:0:1::/64")}
	f.Fuzz(func(t *testing.T, key1, ep1, ips1, key2, ep2, ips2 string) {
		specs := []PeerSpec{
			{Node: "a", PublicKey: key1, Endpoint: ep1, AllowedIPs: strings.Split(ips1, ",")},
			{Node: "b", PublicKey: key2, Endpoint: ep2, AllowedIPs: strings.Split(ips2, ",")},
		}
		got, _ := Peers(self, specs)
		for i, p := range got {
			for _, ip := range p.AllowedIPs {
				network := self.network(ip.Addr())
				if !network.Contains(ip.Addr()) || ip.Bits() < network.Bits() || ip.Overlaps(self.Subnet) || ip.Overlaps(self.Subnet6) || ip != ip.Masked() {
					t.Fatalf("accepted %s for %s", ip, p.Node)
				}
				for _, q := range got[i+1:] {
					for _, jp := range q.AllowedIPs {
						if ip.Overlaps(jp) {
							t.Fatalf("accepted overlapping %s (%s) and %s (%s)", ip, p.Node, jp, q.Node)
						}
					}
				}
			}
			if !p.Endpoint.IsValid() || p.Endpoint.Port() == 0 || p.Endpoint.Addr().IsUnspecified() {
				t.Fatalf("accepted endpoint %s", p.Endpoint)
			}
			for _, q := range got[i+1:] {
				if p.PublicKey == q.PublicKey {
					t.Fatalf("accepted key %s twice", p.PublicKey)
				}
			}
		}
	})
}

func TestOverhead(t *testing.T) {
	if got := 1500 - Overhead(false); got != 1440 {
		t.Errorf("MTU on a 1500 IPv4 underlay = %d, want 1440", got)
	}
	if got := 1500 - Overhead(true); got != 1420 {
		t.Errorf("MTU on a 1500 IPv6 underlay = %d, want 1420 (wg-quick's default)", got)
	}
}

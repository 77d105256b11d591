package wireguard

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/netagent/netagent/pkg/wireguard/key"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// PeerSpec is a peer as the store publishes it (a lease or Node annotations): untrusted
// text until Peers has checked it.
type PeerSpec struct {
	Node       string   // for messages
	PublicKey  string   // base64
	Endpoint   string   // underlay address and WireGuard port, "192.0.2.2:51820" or "[2001:db8::2]:51820"
	AllowedIPs []string // the peer's pod subnets (one per family)
}

// Self is what a peer is checked against. Each family's fields are unset when the
// cluster does not have that family.
type Self struct {
	PublicKey wgtypes.Key
	// Network and Network6 are the cluster's pod networks: every allowed IP lies inside the
	// one of its family.
	Network, Network6 netip.Prefix
	// Subnet and Subnet6 are this node's pod subnets: no peer may claim any of them.
	Subnet, Subnet6 netip.Prefix
}

// network is the pod network of a's family (invalid: the cluster has none).
func (s Self) network(a netip.Addr) netip.Prefix {
	if a.Is4() {
		return s.Network
	}
	return s.Network6
}

// Peer is a validated peer.
type Peer struct {
	Node       string
	PublicKey  wgtypes.Key
	Endpoint   netip.AddrPort
	AllowedIPs []netip.Prefix // masked, sorted
}

// Peers checks specs as hostile input and returns the peers that pass, sorted by public
// key, with one error per peer left out. Beyond each field's syntax, it refuses what would
// let one peer take another's traffic: WireGuard routes by allowed IPs (the last peer
// configured with a prefix gets it), so a prefix outside the pod network, inside our own
// subnet, or overlapping another peer's, and a public key used twice (or ours), leave
// every peer involved out, rather than letting input order pick a winner.
func Peers(self Self, specs []PeerSpec) ([]Peer, error) {
	if !self.Network.IsValid() && !self.Network6.IsValid() {
		return nil, errors.New("wireguard peers: no pod network to check allowed IPs against")
	}
	var errs []error
	var ok []Peer
	for _, s := range specs {
		p, err := parsePeer(self, s)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		ok = append(ok, p)
	}
	bad := make([]bool, len(ok))
	for i := range ok {
		for j := i + 1; j < len(ok); j++ {
			if ok[i].PublicKey == ok[j].PublicKey {
				bad[i], bad[j] = true, true
				errs = append(errs, fmt.Errorf("peers %s and %s publish the same public key: both left out", ok[i].Node, ok[j].Node))
				continue
			}
			if a, b, ok2 := overlap(ok[i].AllowedIPs, ok[j].AllowedIPs); ok2 {
				bad[i], bad[j] = true, true
				errs = append(errs, fmt.Errorf("peers %s (%s) and %s (%s) claim overlapping allowed IPs: both left out", ok[i].Node, a, ok[j].Node, b))
			}
		}
	}
	out := ok[:0]
	for i, p := range ok {
		if !bad[i] {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, func(a, b Peer) int { return strings.Compare(a.PublicKey.String(), b.PublicKey.String()) })
	return out, errors.Join(errs...)
}

func overlap(a, b []netip.Prefix) (netip.Prefix, netip.Prefix, bool) {
	for _, x := range a {
		for _, y := range b {
			if x.Overlaps(y) {
				return x, y, true
			}
		}
	}
	return netip.Prefix{}, netip.Prefix{}, false
}

func parsePeer(self Self, s PeerSpec) (Peer, error) {
	fail := func(field, format string, args ...any) (Peer, error) {
		return Peer{}, fmt.Errorf("peer %q: %s: %s", s.Node, field, fmt.Sprintf(format, args...))
	}
	if s.Node == "" {
		return fail("node", "empty")
	}
	pub, err := key.ParsePublic(s.PublicKey)
	if err != nil {
		return fail("public key", "%v", err)
	}
	if pub == self.PublicKey {
		return fail("public key", "is this node's own")
	}
	ep, err := netip.ParseAddrPort(s.Endpoint)
	if err != nil {
		return fail("endpoint", "%v", err)
	}
	ep = netip.AddrPortFrom(ep.Addr().Unmap(), ep.Port())
	a := ep.Addr()
	switch {
	case ep.Port() == 0:
		return fail("endpoint", "%s: port 0", s.Endpoint)
	case a.Zone() != "":
		return fail("endpoint", "%s: a zoned address", s.Endpoint)
	case a.IsUnspecified() || a.IsMulticast() || a.IsLoopback() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return fail("endpoint", "%s: not a unicast address", s.Endpoint)
	}
	if len(s.AllowedIPs) == 0 {
		return fail("allowed IPs", "none")
	}
	var ips []netip.Prefix
	for _, t := range s.AllowedIPs {
		p, err := netip.ParsePrefix(t)
		if err != nil {
			return fail("allowed IPs", "%v", err)
		}
		network := self.network(p.Addr())
		switch {
		case p != p.Masked():
			return fail("allowed IPs", "%s has host bits set (want %s)", p, p.Masked())
		case !network.IsValid():
			return fail("allowed IPs", "%s is outside the pod network (the cluster has none of its family)", p)
		case p.Addr().Is4In6() || p.Bits() < network.Bits() || !network.Contains(p.Addr()):
			return fail("allowed IPs", "%s is outside the pod network %s", p, network)
		case self.Subnet.IsValid() && p.Overlaps(self.Subnet):
			return fail("allowed IPs", "%s overlaps this node's subnet %s", p, self.Subnet)
		case self.Subnet6.IsValid() && p.Overlaps(self.Subnet6):
			return fail("allowed IPs", "%s overlaps this node's subnet %s", p, self.Subnet6)
		}
		ips = append(ips, p)
	}
	slices.SortFunc(ips, comparePrefix)
	ips = slices.Compact(ips)
	return Peer{Node: s.Node, PublicKey: pub, Endpoint: ep, AllowedIPs: ips}, nil
}

func comparePrefix(x, y netip.Prefix) int {
	return cmp.Or(x.Addr().Compare(y.Addr()), cmp.Compare(x.Bits(), y.Bits()))
}

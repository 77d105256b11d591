// Package lease defines a node's subnet lease, how it is encoded in a store, the checks a
// peer's lease must pass (Rules, Peers), and the Store interface the agent works against.
// It is store-neutral: the stores are their own packages (etcdstore on etcd, kube on the
// Kubernetes API), so the planner and the reconcilers, which use only the types here,
// link neither etcd nor client-go (scripts/test.sh checks it).
package lease

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/wireguard/key"
)

// Store is what the agent needs from a lease store.
type Store interface {
	Config(ctx context.Context) (config.Network, int64, error)
	Acquire(ctx context.Context, cfg config.Network, self Lease, hint netip.Prefix) (Held, error)
	Renew(ctx context.Context, h Held) (Held, error)
	KeepAlive(ctx context.Context, h Held) error
	Watch(ctx context.Context, peers *Peers, changed chan<- struct{}, stats WatchStats)
	WatchConfig(ctx context.Context, changed chan<- struct{})
}

// HealthWatcher is implemented by stores that can tell whether they reach their backend
// (etcd): WatchHealth calls report(nil) while it answers and report(err) while it does
// not, until ctx ends.
type HealthWatcher interface {
	WatchHealth(ctx context.Context, report func(error))
}

// WatchStats is reported to metrics.
type WatchStats interface {
	WatchRestart(reason string)
}

// Held is a lease this agent holds.
type Held struct {
	Lease Lease
	// Token is the store's handle on the claim (etcd: the etcd lease ID), opaque to
	// everyone but the store that issued it.
	Token int64
}

// ErrConflict means the subnet or node is held by someone else.
var ErrConflict = errors.New("lease conflict")

// ErrIdentity means another live agent runs under this node's name (two hosts with the
// same name): the agent refuses to start, or stops, rather than fight over the lease.
var ErrIdentity = errors.New("node name in use by another agent")

// ErrReassigned means the store now gives this node another subnet than the one the agent
// runs on (a Kubernetes Node deleted and registered again with a new podCIDR): the agent
// cannot move its pods, so it exits and its restart takes the new subnet.
var ErrReassigned = errors.New("the node's subnet was reassigned")

// Lease is one node's claim on a subnet per family and how peers reach it. Subnet is the
// IPv4 pod subnet (unset in an IPv6-only cluster), Subnet6 the IPv6 one (unset without
// IPv6); PublicIP and PublicIP6 are the node's underlay addresses of each family, at least
// one set. The lease's key in a store is its Primary subnet.
type Lease struct {
	Node     string       `json:"node"`
	Subnet   netip.Prefix `json:"subnet"`
	PublicIP netip.Addr   `json:"publicIP"`
	Backend  string       `json:"backend"`
	// Subnet6 is the node's IPv6 pod subnet.
	Subnet6 netip.Prefix `json:"subnet6,omitzero"`
	// PublicIP6 is the node's IPv6 underlay address, when it has one.
	PublicIP6 netip.Addr `json:"publicIP6,omitzero"`
	// VTEPMAC is the MAC of the node's VXLAN device (vxlan and hybrid backends).
	VTEPMAC string `json:"vtepMAC,omitempty"`
	// UnderlayMAC is the MAC of the node's underlay interface: peers on the same L2 accept
	// its VXLAN only from this MAC.
	UnderlayMAC string `json:"underlayMAC,omitempty"`
	// WGPublicKey and WGPort are how peers reach the node's WireGuard device (wireguard
	// backend): its public key (base64) and listen port. The private key never leaves the node.
	WGPublicKey string `json:"wgPublicKey,omitempty"`
	WGPort      int    `json:"wgPort,omitempty"`
	// Instance is random per agent run: a lease rewritten with another instance was written
	// by another agent using this node's name.
	Instance string `json:"instance,omitempty"`
}

// MAC parses VTEPMAC (nil when unset or invalid).
func (l Lease) MAC() net.HardwareAddr {
	m, err := net.ParseMAC(l.VTEPMAC)
	if err != nil || len(m) != 6 {
		return nil
	}
	return m
}

// Primary is the subnet a store keys the lease by: the IPv4 one, else the IPv6 one.
func (l Lease) Primary() netip.Prefix {
	if l.Subnet.IsValid() {
		return l.Subnet
	}
	return l.Subnet6
}

// Subnets are the lease's valid subnets, IPv4 first.
func (l Lease) Subnets() []netip.Prefix {
	out := make([]netip.Prefix, 0, 2)
	for _, s := range [2]netip.Prefix{l.Subnet, l.Subnet6} {
		if s.IsValid() {
			out = append(out, s)
		}
	}
	return out
}

// Gone reports whether l names a node without any claim (how Peers.Take reports a node
// that left).
func (l Lease) Gone() bool {
	return !l.Subnet.IsValid() && !l.Subnet6.IsValid() && !l.PublicIP.IsValid() && !l.PublicIP6.IsValid()
}

// PublicIPOf is the node's underlay address of the family v6 says (invalid: none).
func (l Lease) PublicIPOf(v6 bool) netip.Addr {
	if v6 {
		return l.PublicIP6
	}
	return l.PublicIP
}

// Validate checks a lease for use as a peer.
func (l Lease) Validate() error {
	if err := ValidNodeName(l.Node); err != nil {
		return fmt.Errorf("lease: %w", err)
	}
	switch {
	case !l.Subnet.IsValid() && !l.Subnet6.IsValid():
		return fmt.Errorf("lease %s: no subnet", l.Node)
	case l.Subnet.IsValid() && (!l.Subnet.Addr().Is4() || l.Subnet != l.Subnet.Masked()):
		return fmt.Errorf("lease %s: invalid subnet %s", l.Node, l.Subnet)
	case l.Subnet6.IsValid() && !ValidSubnet6(l.Subnet6):
		return fmt.Errorf("lease %s: invalid IPv6 subnet %s (not a masked IPv6 unicast prefix)", l.Node, l.Subnet6)
	case !l.PublicIP.IsValid() && !l.PublicIP6.IsValid():
		return fmt.Errorf("lease %s: no public IP", l.Node)
	case l.PublicIP.IsValid() && (!l.PublicIP.Is4() || !l.PublicIP.IsGlobalUnicast()):
		// Loopback, link-local, broadcast, multicast or unspecified: a peer there would make
		// this node tunnel to itself or broadcast pod traffic on the underlay.
		return fmt.Errorf("lease %s: invalid public IP %s (not a unicast address)", l.Node, l.PublicIP)
	case l.PublicIP6.IsValid() && (!l.PublicIP6.Is6() || l.PublicIP6.Is4In6() || l.PublicIP6.Zone() != "" || !l.PublicIP6.IsGlobalUnicast()):
		return fmt.Errorf("lease %s: invalid IPv6 public IP %s (not a global unicast IPv6 address)", l.Node, l.PublicIP6)
	case l.VTEPMAC != "" && !ValidMAC(l.VTEPMAC):
		return fmt.Errorf("lease %s: invalid VTEP MAC %q", l.Node, l.VTEPMAC)
	case l.UnderlayMAC != "" && !ValidMAC(l.UnderlayMAC):
		return fmt.Errorf("lease %s: invalid underlay MAC %q", l.Node, l.UnderlayMAC)
	}
	return l.validWireGuard()
}

// validWireGuard checks the WireGuard fields: both or neither, a key that parses, a port in
// range. The key's text is not echoed (it is a key, if a public one: keep logs short).
func (l Lease) validWireGuard() error {
	if l.WGPublicKey == "" && l.WGPort == 0 {
		return nil
	}
	if _, err := key.ParsePublic(l.WGPublicKey); err != nil {
		return fmt.Errorf("lease %s: invalid WireGuard public key: %w", l.Node, err)
	}
	if l.WGPort < 1 || l.WGPort > 65535 {
		return fmt.Errorf("lease %s: invalid WireGuard port %d", l.Node, l.WGPort)
	}
	return nil
}

// ValidSubnet6 reports whether s is a masked IPv6 unicast prefix (not IPv4-mapped,
// link-local, multicast, loopback or unspecified).
func ValidSubnet6(s netip.Prefix) bool {
	a := s.Addr()
	return s.IsValid() && a.Is6() && !a.Is4In6() && a.Zone() == "" && s == s.Masked() &&
		!a.IsLinkLocalUnicast() && !a.IsMulticast() && !a.IsLoopback() && !a.IsUnspecified()
}

// ValidNodeName checks a node name (it is a key suffix in the store).
func ValidNodeName(n string) error {
	if n == "" || len(n) > 253 || strings.ContainsAny(n, "/ \t\n") || n == "." || n == ".." {
		return fmt.Errorf("invalid node name %q", n)
	}
	return nil
}

// Encode is the stored form.
func (l Lease) Encode() []byte {
	b, _ := json.Marshal(l)
	return b
}

// Decode parses and validates a stored lease value.
func Decode(b []byte) (Lease, error) {
	var l Lease
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&l); err != nil {
		return Lease{}, fmt.Errorf("decode lease: %w", err)
	}
	if err := l.Validate(); err != nil {
		return Lease{}, err
	}
	l.VTEPMAC = strings.ToLower(l.VTEPMAC) // canonical, so plans compare strings
	l.UnderlayMAC = strings.ToLower(l.UnderlayMAC)
	return l, nil
}

// ValidMAC reports whether s is a 48-bit MAC in colon notation (the only form netagent
// writes), without allocating: the planner checks one per peer per pass.
func ValidMAC(s string) bool {
	if len(s) != 17 {
		return false
	}
	for i := 0; i < 17; i++ {
		c := s[i]
		if i%3 == 2 {
			if c != ':' {
				return false
			}
			continue
		}
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return false
		}
	}
	return true
}

// SubnetKey is the key suffix for a subnet: 10.244.1.0/24 -> 10.244.1.0-24.
func SubnetKey(p netip.Prefix) string {
	return fmt.Sprintf("%s-%d", p.Addr(), p.Bits())
}

// ParseSubnetKey reverses SubnetKey.
func ParseSubnetKey(s string) (netip.Prefix, error) {
	i := strings.LastIndexByte(s, '-')
	if i < 0 {
		return netip.Prefix{}, fmt.Errorf("subnet key %q: no '-'", s)
	}
	return netip.ParsePrefix(s[:i] + "/" + s[i+1:])
}

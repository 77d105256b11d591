package lease

import (
	"fmt"
	"net/netip"
	"path"
)

// Rules are what a peer's lease must satisfy beyond being well-formed. They depend on the
// network config and on who we are, so they are checked where leases enter the peer view
// (Peers), the one place every store feeds: a lease that fails them is never routed to,
// and the reason is kept for status, metrics and the log.
type Rules struct {
	// Network and Network6 are the cluster's pod networks; both invalid: not checked; one
	// invalid: that family is off, and a lease carrying a subnet of it is refused.
	Network, Network6 netip.Prefix
	// SubnetLen and SubnetLen6 are the configured subnet lengths: leases of another length
	// (left from before a config change, or forged) lose to any lease of this length they
	// overlap.
	SubnetLen, SubnetLen6 int
	Self                  string // this node's name
	// SelfIP and SelfIP6 are this node's public IPs: no peer may claim them.
	SelfIP, SelfIP6 netip.Addr
	// SelfWGKey is this node's WireGuard public key: no peer may publish it (a peer with our
	// key would be dropped by WireGuard, or take our identity on the others). "": not checked.
	SelfWGKey string
}

// Check reports why l may not be used as a peer's lease (nil: it may).
func (r Rules) Check(l Lease) error {
	if err := l.Validate(); err != nil {
		return err
	}
	if r.Network.IsValid() || r.Network6.IsValid() {
		for _, s := range [2]struct {
			name        string
			subnet, net netip.Prefix
		}{{"subnet", l.Subnet, r.Network}, {"IPv6 subnet", l.Subnet6, r.Network6}} {
			switch {
			case !s.subnet.IsValid():
			case !s.net.IsValid():
				return fmt.Errorf("lease %s: %s %s, but the cluster has no network of its family", l.Node, s.name, s.subnet)
			case !s.net.Contains(s.subnet.Addr()) || s.subnet.Bits() < s.net.Bits():
				return fmt.Errorf("lease %s: %s %s is outside the network %s", l.Node, s.name, s.subnet, s.net)
			}
		}
	}
	if l.Node != r.Self {
		for _, ip := range [2]netip.Addr{r.SelfIP, r.SelfIP6} {
			if ip.IsValid() && (l.PublicIP == ip || l.PublicIP6 == ip) {
				return fmt.Errorf("lease %s: public IP %s is this node's own", l.Node, ip)
			}
		}
	}
	if l.Node != r.Self && r.SelfWGKey != "" && l.WGPublicKey == r.SelfWGKey {
		return fmt.Errorf("lease %s: WireGuard public key is this node's own", l.Node)
	}
	return nil
}

// Enabled is l without the subnets of a family the cluster has off (a Kubernetes Node lists
// podCIDRs of both families whatever netagent's config says); unchanged when no network
// is set.
func (r Rules) Enabled(l Lease) Lease {
	if !r.Network.IsValid() && !r.Network6.IsValid() {
		return l
	}
	if !r.Network.IsValid() {
		l.Subnet = netip.Prefix{}
	}
	if !r.Network6.IsValid() {
		l.Subnet6 = netip.Prefix{}
	}
	return l
}

// subnetLen is the configured length of s's family (0: not checked).
func (r Rules) subnetLen(s netip.Prefix) int {
	if s.Addr().Is4() {
		return r.SubnetLen
	}
	return r.SubnetLen6
}

// DecodeKey decodes the lease stored under key (…/subnets/<SubnetKey>) and checks that the
// key and the value name the same subnet: a value naming another subnet than its key would
// let one forged key take over a live node's subnet on every other node.
func DecodeKey(key string, value []byte) (Lease, error) {
	l, err := Decode(value)
	if err != nil {
		return Lease{}, err
	}
	s, err := ParseSubnetKey(path.Base(key))
	if err != nil {
		return Lease{}, fmt.Errorf("lease %s: %w", l.Node, err)
	}
	if s != l.Primary() {
		return Lease{}, fmt.Errorf("lease %s: its value names subnet %s but its key %s", l.Node, l.Primary(), s)
	}
	return l, nil
}

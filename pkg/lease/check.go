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
	Network netip.Prefix // the cluster pod network; invalid: not checked
	// SubnetLen is the configured subnet length: leases of another length (left from before
	// a config change, or forged) lose to any lease of this length they overlap.
	SubnetLen int
	Self      string     // this node's name
	SelfIP    netip.Addr // this node's public IP: no peer may claim it
	// SelfWGKey is this node's WireGuard public key: no peer may publish it (a peer with our
	// key would be dropped by WireGuard, or take our identity on the others). "": not checked.
	SelfWGKey string
}

// Check reports why l may not be used as a peer's lease (nil: it may).
func (r Rules) Check(l Lease) error {
	if err := l.Validate(); err != nil {
		return err
	}
	if r.Network.IsValid() && (!r.Network.Contains(l.Subnet.Addr()) || l.Subnet.Bits() < r.Network.Bits()) {
		return fmt.Errorf("lease %s: subnet %s is outside the network %s", l.Node, l.Subnet, r.Network)
	}
	if l.Node != r.Self && r.SelfIP.IsValid() && l.PublicIP == r.SelfIP {
		return fmt.Errorf("lease %s: public IP %s is this node's own", l.Node, l.PublicIP)
	}
	if l.Node != r.Self && r.SelfWGKey != "" && l.WGPublicKey == r.SelfWGKey {
		return fmt.Errorf("lease %s: WireGuard public key is this node's own", l.Node)
	}
	return nil
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
	if s != l.Subnet {
		return Lease{}, fmt.Errorf("lease %s: its value names subnet %s but its key %s", l.Node, l.Subnet, s)
	}
	return l, nil
}

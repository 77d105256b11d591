// Package config is the cluster-wide network configuration that every agent reads from the
// store (etcd key <prefix>/config): the pod network of each family, how it is cut into node
// subnets, and the backend. Validate rejects anything an agent could not safely act on,
// naming the field.
//
// A cluster is IPv4-only (network), IPv6-only (ipv6Network) or dual-stack (both). An IPv6
// node subnet is /48 to /126 (ipv6SubnetLen, default /64), longer than ipv6Network: the
// bounds the CNI plugin accepts for its ipv6Subnet (wider makes no sense for one node, /126
// is the smallest with an address left after the gateway). IPv6 subnets are handed out from
// the whole ipv6Network except its first subnet, as for IPv4.
package config

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/bits"
	"net/netip"
	"path/filepath"
)

// Backend names.
const (
	HostGW    = "host-gw"
	VXLAN     = "vxlan"
	Hybrid    = "hybrid"
	WireGuard = "wireguard"
)

// Defaults.
const (
	DefaultVNI  = 1
	DefaultPort = 8472
	// DefaultWireGuardPort is WireGuard's customary listen port.
	DefaultWireGuardPort = 51820
	// VXLANOverhead is what VXLAN over IPv4 costs per packet: outer IP 20, UDP 8, VXLAN 8,
	// inner Ethernet 14.
	VXLANOverhead = 50
	// VXLANOverhead6 is the same over an IPv6 underlay (outer IP 40).
	VXLANOverhead6 = 70
	// DefaultIPv6SubnetLen is the default IPv6 node subnet length.
	DefaultIPv6SubnetLen = 64
	// MinIPv6SubnetLen and MaxIPv6SubnetLen bound ipv6SubnetLen (the plugin's bounds).
	MinIPv6SubnetLen, MaxIPv6SubnetLen = 48, 126
)

// Network is the cluster network configuration.
type Network struct {
	// Network is the whole IPv4 pod network, e.g. 10.244.0.0/16; unset in an IPv6-only
	// cluster.
	Network netip.Prefix `json:"network,omitzero"`
	// SubnetLen is the prefix length of each node's subnet (default 24).
	SubnetLen int `json:"subnetLen,omitempty"`
	// SubnetMin and SubnetMax bound the subnets handed out (default: the whole network,
	// except its first subnet, which is easy to confuse with the network address).
	SubnetMin netip.Addr `json:"subnetMin,omitzero"`
	SubnetMax netip.Addr `json:"subnetMax,omitzero"`
	Backend   Backend    `json:"backend"`
	// MTU overrides the pod MTU; 0 derives it from the underlay.
	MTU int `json:"mtu,omitempty"`
	// IPv6Network is the whole IPv6 pod network, e.g. fd00:10:244::/48; unset: no IPv6.
	IPv6Network netip.Prefix `json:"ipv6Network,omitzero"`
	// IPv6SubnetLen is the prefix length of each node's IPv6 subnet (default 64).
	IPv6SubnetLen int `json:"ipv6SubnetLen,omitempty"`
	// IPv6Masquerade switches IPv6 egress masquerading (default on, as for IPv4; off for
	// a routable prefix whose pods keep their addresses to the outside).
	IPv6Masquerade *bool `json:"ipv6Masquerade,omitempty"`
}

// HasV4 reports whether the cluster has IPv4 pods.
func (n Network) HasV4() bool { return n.Network.IsValid() }

// HasV6 reports whether the cluster has IPv6 pods.
func (n Network) HasV6() bool { return n.IPv6Network.IsValid() }

// Masquerade6 reports whether IPv6 pod egress is masqueraded.
func (n Network) Masquerade6() bool {
	return n.HasV6() && (n.IPv6Masquerade == nil || *n.IPv6Masquerade)
}

// NetworkOf is the pod network of subnet s's family (invalid: that family is off).
func (n Network) NetworkOf(s netip.Prefix) netip.Prefix {
	if s.Addr().Is4() {
		return n.Network
	}
	return n.IPv6Network
}

// SubnetLenOf is the node subnet length of s's family.
func (n Network) SubnetLenOf(s netip.Prefix) int {
	if s.Addr().Is4() {
		return n.SubnetLen
	}
	return n.IPv6SubnetLen
}

// Backend is the dataplane choice.
type Backend struct {
	Type string `json:"type"`
	VNI  int    `json:"vni,omitempty"`
	// Port is the VXLAN port (vxlan, hybrid) or the WireGuard listen port (wireguard).
	Port int `json:"port,omitempty"`
	// PSKFile (wireguard) is the path, on every node, of a pre-shared key (base64, as `wg
	// genpsk` writes it; a mounted Secret with defaultMode 0400) mixed into every tunnel.
	PSKFile string `json:"pskFile,omitempty"`
}

// FieldError is a validation error naming the field.
type FieldError struct {
	Field string
	Msg   string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Msg }

func fieldErr(field, format string, args ...any) error {
	return &FieldError{Field: field, Msg: fmt.Sprintf(format, args...)}
}

// Parse decodes JSON strictly (unknown fields are errors, so a typo is not silently
// ignored), applies defaults and validates.
func Parse(b []byte) (Network, error) {
	var n Network
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&n); err != nil {
		return Network{}, fmt.Errorf("decode network config: %w", err)
	}
	if dec.More() {
		return Network{}, fmt.Errorf("decode network config: trailing data")
	}
	if err := explicitZeros(b); err != nil {
		return Network{}, err
	}
	n.Default()
	if err := n.Validate(); err != nil {
		return Network{}, err
	}
	return n, nil
}

// explicitZeros rejects "vni": 0 and "port": 0, which would otherwise read as "not set"
// and silently become the defaults.
func explicitZeros(b []byte) error {
	var probe struct {
		Backend struct {
			VNI  *int `json:"vni"`
			Port *int `json:"port"`
		} `json:"backend"`
	}
	if json.Unmarshal(b, &probe) != nil {
		return nil // the strict decode has said what is wrong
	}
	if v := probe.Backend.VNI; v != nil && *v == 0 {
		return fieldErr("backend.vni", "0 is out of range 1-16777215 (leave it out for the default %d)", DefaultVNI)
	}
	if p := probe.Backend.Port; p != nil && *p == 0 {
		return fieldErr("backend.port", "0 is out of range 1-65535 (leave it out for the default)")
	}
	return nil
}

// Marshal encodes the config (the form stored in etcd).
func (n Network) Marshal() []byte {
	b, _ := json.Marshal(n)
	return b
}

// Default fills unset optional fields.
func (n *Network) Default() {
	if n.IPv6Network.IsValid() && n.IPv6SubnetLen == 0 {
		n.IPv6SubnetLen = DefaultIPv6SubnetLen
	}
	if !n.Network.IsValid() && n.IPv6Network.IsValid() {
		n.defaultBackend()
		return // IPv6-only: no IPv4 fields to default
	}
	if n.SubnetLen == 0 {
		n.SubnetLen = 24
	}
	n.defaultBackend()
	if !n.Network.IsValid() || !n.Network.Addr().Is4() || n.SubnetLen <= n.Network.Bits() || n.SubnetLen > 30 {
		return
	}
	if !n.SubnetMin.IsValid() {
		first := netip.PrefixFrom(n.Network.Addr(), n.SubnetLen)
		n.SubnetMin = nextSubnet(first)
		if !n.Network.Contains(n.SubnetMin) {
			n.SubnetMin = first.Addr()
		}
	}
	if !n.SubnetMax.IsValid() {
		n.SubnetMax = lastSubnet(n.Network, n.SubnetLen)
	}
}

func (n *Network) defaultBackend() {
	if n.Backend.Type == "" {
		n.Backend.Type = VXLAN
	}
	switch n.Backend.Type {
	case HostGW:
	case WireGuard:
		if n.Backend.Port == 0 {
			n.Backend.Port = DefaultWireGuardPort
		}
	default:
		if n.Backend.VNI == 0 {
			n.Backend.VNI = DefaultVNI
		}
		if n.Backend.Port == 0 {
			n.Backend.Port = DefaultPort
		}
	}
}

// Validate checks the config; the error names the first bad field.
func (n Network) Validate() error {
	if !n.Network.IsValid() && !n.IPv6Network.IsValid() {
		return fieldErr("network", "missing or not a CIDR prefix (set network, ipv6Network or both)")
	}
	if n.Network.IsValid() {
		if err := n.validate4(); err != nil {
			return err
		}
	} else {
		for _, f := range []struct {
			name string
			set  bool
		}{{"subnetLen", n.SubnetLen != 0}, {"subnetMin", n.SubnetMin.IsValid()}, {"subnetMax", n.SubnetMax.IsValid()}} {
			if f.set {
				return fieldErr(f.name, "set without network (IPv4 is off in an IPv6-only cluster)")
			}
		}
	}
	if err := n.validate6(); err != nil {
		return err
	}
	return n.validateRest()
}

// validate6 checks the IPv6 fields.
func (n Network) validate6() error {
	if !n.IPv6Network.IsValid() {
		switch {
		case n.IPv6SubnetLen != 0:
			return fieldErr("ipv6SubnetLen", "set without ipv6Network")
		case n.IPv6Masquerade != nil:
			return fieldErr("ipv6Masquerade", "set without ipv6Network")
		}
		return nil
	}
	p := n.IPv6Network
	a := p.Addr()
	switch {
	case !a.Is6() || a.Is4In6():
		return fieldErr("ipv6Network", "%s is not an IPv6 prefix (IPv4 goes in network)", p)
	case p != p.Masked():
		return fieldErr("ipv6Network", "%s has host bits set (did you mean %s?)", p, p.Masked())
	case a.IsLoopback() || a.IsMulticast() || a.IsLinkLocalUnicast() || a.IsUnspecified() || p.Bits() < 8:
		return fieldErr("ipv6Network", "%s is not a usable pod network (loopback, multicast, link-local or larger than /8)", p)
	}
	if l := n.IPv6SubnetLen; l <= p.Bits() || l < MinIPv6SubnetLen || l > MaxIPv6SubnetLen {
		return fieldErr("ipv6SubnetLen", "%d must be longer than the ipv6Network's /%d and within /%d-/%d", l, p.Bits(), MinIPv6SubnetLen, MaxIPv6SubnetLen)
	}
	return nil
}

// validate4 checks the IPv4 fields.
func (n Network) validate4() error {
	if !n.Network.Addr().Is4() {
		return fieldErr("network", "%s is not an IPv4 prefix (IPv6 goes in ipv6Network)", n.Network)
	}
	if n.Network != n.Network.Masked() {
		return fieldErr("network", "%s has host bits set (did you mean %s?)", n.Network, n.Network.Masked())
	}
	a := n.Network.Addr()
	if a.IsLoopback() || a.IsMulticast() || a.IsLinkLocalUnicast() || a.IsUnspecified() || n.Network.Bits() < 8 {
		return fieldErr("network", "%s is not a usable pod network (loopback, multicast, link-local or larger than /8)", n.Network)
	}
	if n.SubnetLen <= n.Network.Bits() || n.SubnetLen > 30 {
		return fieldErr("subnetLen", "%d must be longer than the network's /%d and at most 30", n.SubnetLen, n.Network.Bits())
	}
	if n.SubnetLen-n.Network.Bits() < 1 {
		return fieldErr("subnetLen", "the network holds fewer than 2 subnets")
	}
	for _, f := range []struct {
		name string
		a    netip.Addr
	}{{"subnetMin", n.SubnetMin}, {"subnetMax", n.SubnetMax}} {
		if !f.a.IsValid() {
			return fieldErr(f.name, "missing")
		}
		if !n.Network.Contains(f.a) {
			return fieldErr(f.name, "%s is outside network %s", f.a, n.Network)
		}
		if netip.PrefixFrom(f.a, n.SubnetLen).Masked().Addr() != f.a {
			return fieldErr(f.name, "%s is not aligned to /%d", f.a, n.SubnetLen)
		}
	}
	if n.SubnetMin.Compare(n.SubnetMax) > 0 {
		return fieldErr("subnetMin", "%s is after subnetMax %s", n.SubnetMin, n.SubnetMax)
	}
	return nil
}

// validateRest checks the family-neutral fields.
func (n Network) validateRest() error {
	switch n.Backend.Type {
	case HostGW:
		if n.Backend.VNI != 0 || n.Backend.Port != 0 {
			return fieldErr("backend", "vni and port apply to vxlan, hybrid and wireguard only")
		}
	case VXLAN, Hybrid:
		if n.Backend.VNI < 1 || n.Backend.VNI > 1<<24-1 {
			return fieldErr("backend.vni", "%d is out of range 1-16777215", n.Backend.VNI)
		}
		if n.Backend.Port < 1 || n.Backend.Port > 65535 {
			return fieldErr("backend.port", "%d is out of range 1-65535", n.Backend.Port)
		}
	case WireGuard:
		if n.Backend.VNI != 0 {
			return fieldErr("backend.vni", "applies to vxlan and hybrid only")
		}
		if n.Backend.Port < 1 || n.Backend.Port > 65535 {
			return fieldErr("backend.port", "%d is out of range 1-65535", n.Backend.Port)
		}
		if f := n.Backend.PSKFile; f != "" && (!filepath.IsAbs(f) || filepath.Clean(f) != f) {
			return fieldErr("backend.pskFile", "%q is not a clean absolute path", f)
		}
	default:
		return fieldErr("backend.type", "%q is not one of host-gw, vxlan, hybrid, wireguard", n.Backend.Type)
	}
	if n.Backend.PSKFile != "" && n.Backend.Type != WireGuard {
		return fieldErr("backend.pskFile", "applies to the wireguard backend only")
	}
	if n.MTU != 0 && (n.MTU < 576 || n.MTU > 9000) {
		return fieldErr("mtu", "%d is out of range 576-9000 (or 0 for automatic)", n.MTU)
	}
	return nil
}

// Subnets is the number of node subnets the config can hand out.
func (n Network) Subnets() int {
	if !n.HasV4() {
		return 0
	}
	step := uint32(1) << (32 - n.SubnetLen)
	lo, hi := u32(n.SubnetMin), u32(n.SubnetMax)
	return int((hi-lo)/step) + 1
}

// SubnetAt returns the i-th subnet between SubnetMin and SubnetMax.
func (n Network) SubnetAt(i int) netip.Prefix {
	step := uint32(1) << (32 - n.SubnetLen)
	return netip.PrefixFrom(fromU32(u32(n.SubnetMin)+uint32(i)*step), n.SubnetLen)
}

// Contains reports whether s is a subnet this config may hand out (of either family).
func (n Network) Contains(s netip.Prefix) bool {
	if s.Addr().Is6() {
		return n.HasV6() && s.Bits() == n.IPv6SubnetLen && s.Masked() == s && !s.Addr().Is4In6() &&
			n.IPv6Network.Contains(s.Addr()) && s.Addr() != n.IPv6Network.Addr()
	}
	return n.HasV4() && s.Bits() == n.SubnetLen && s.Masked() == s &&
		s.Addr().Compare(n.SubnetMin) >= 0 && s.Addr().Compare(n.SubnetMax) <= 0
}

// Subnets6 is the number of IPv6 node subnets the config can hand out (all of ipv6Network
// but its first subnet), capped at 2^62.
func (n Network) Subnets6() uint64 {
	if !n.HasV6() {
		return 0
	}
	return 1<<min(n.IPv6SubnetLen-n.IPv6Network.Bits(), 62) - 1
}

// Subnet6At returns the i-th IPv6 subnet, i < Subnets6().
func (n Network) Subnet6At(i uint64) netip.Prefix {
	b := n.IPv6Network.Addr().As16()
	hi, lo := binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])
	// Add (i+1) << (128-len): skip the first subnet.
	shift := uint(128 - n.IPv6SubnetLen)
	v := i + 1
	var addHi, addLo uint64
	if shift >= 64 {
		addHi = v << (shift - 64)
	} else {
		addLo = v << shift
		if shift > 0 {
			addHi = v >> (64 - shift)
		}
	}
	lo, carry := bits.Add64(lo, addLo, 0)
	hi, _ = bits.Add64(hi, addHi, carry)
	binary.BigEndian.PutUint64(b[:8], hi)
	binary.BigEndian.PutUint64(b[8:], lo)
	return netip.PrefixFrom(netip.AddrFrom16(b), n.IPv6SubnetLen)
}

func nextSubnet(p netip.Prefix) netip.Addr {
	return fromU32(u32(p.Addr()) + uint32(1)<<(32-p.Bits()))
}

func lastSubnet(network netip.Prefix, l int) netip.Addr {
	last := u32(network.Addr()) | (uint32(1)<<(32-network.Bits()) - 1)
	return netip.PrefixFrom(fromU32(last), l).Masked().Addr()
}

func u32(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

func fromU32(v uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

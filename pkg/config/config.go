// Package config is the cluster-wide network configuration that every agent reads from the
// store (etcd key <prefix>/config): the pod network, how it is cut into node subnets, and
// the backend. Validate rejects anything an agent could not safely act on, naming the field.
package config

import (
	"bytes"
	"encoding/json"
	"fmt"
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
)

// Network is the cluster network configuration.
type Network struct {
	// Network is the whole pod network, e.g. 10.244.0.0/16.
	Network netip.Prefix `json:"network"`
	// SubnetLen is the prefix length of each node's subnet (default 24).
	SubnetLen int `json:"subnetLen,omitempty"`
	// SubnetMin and SubnetMax bound the subnets handed out (default: the whole network,
	// except its first subnet, which is easy to confuse with the network address).
	SubnetMin netip.Addr `json:"subnetMin,omitzero"`
	SubnetMax netip.Addr `json:"subnetMax,omitzero"`
	Backend   Backend    `json:"backend"`
	// MTU overrides the pod MTU; 0 derives it from the underlay.
	MTU int `json:"mtu,omitempty"`
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
	if n.SubnetLen == 0 {
		n.SubnetLen = 24
	}
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
	if !n.Network.IsValid() || n.SubnetLen <= n.Network.Bits() || n.SubnetLen > 30 {
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

// Validate checks the config; the error names the first bad field.
func (n Network) Validate() error {
	if !n.Network.IsValid() {
		return fieldErr("network", "missing or not a CIDR prefix")
	}
	if !n.Network.Addr().Is4() {
		return fieldErr("network", "%s: only IPv4 is supported", n.Network)
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
	step := uint32(1) << (32 - n.SubnetLen)
	lo, hi := u32(n.SubnetMin), u32(n.SubnetMax)
	return int((hi-lo)/step) + 1
}

// SubnetAt returns the i-th subnet between SubnetMin and SubnetMax.
func (n Network) SubnetAt(i int) netip.Prefix {
	step := uint32(1) << (32 - n.SubnetLen)
	return netip.PrefixFrom(fromU32(u32(n.SubnetMin)+uint32(i)*step), n.SubnetLen)
}

// Contains reports whether s is a subnet this config may hand out.
func (n Network) Contains(s netip.Prefix) bool {
	return s.Bits() == n.SubnetLen && s.Masked() == s &&
		s.Addr().Compare(n.SubnetMin) >= 0 && s.Addr().Compare(n.SubnetMax) <= 0
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

// Package netipx converts between the net/netip types netagent uses inside and the net
// types of the netlink library, at the kernel boundary; and has compact forms of the
// net/netip types for the keys of big maps (AddrKey, PrefixKey).
package netipx

import (
	"net"
	"net/netip"
	"strings"
)

// IPNet converts a prefix for netlink.
func IPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// Prefix converts a netlink prefix (IPv4-mapped addresses unmapped); false for nil or
// invalid input.
func Prefix(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}

// Join prints prefixes separated by commas.
func Join(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

// AddrKey is a netip.Addr without its zone as a plain value: 17 bytes and no pointer, where
// a netip.Addr is 24 bytes with one. It is for the keys and values of big maps (the kernel
// mirrors hold tens of thousands of entries): their slots are a third smaller, and the
// garbage collector need not scan maps without pointers. The zero AddrKey is the invalid one.
type AddrKey struct {
	a   [16]byte // an IPv4 address in the first 4
	len uint8    // 0: invalid, 4 or 16
}

// AddrKeyOf is a as an AddrKey (its zone dropped).
func AddrKeyOf(a netip.Addr) AddrKey {
	switch {
	case a.Is4():
		var out AddrKey
		*(*[4]byte)(out.a[:4]) = a.As4()
		out.len = 4
		return out
	case a.Is6():
		return AddrKey{a: a.As16(), len: 16}
	}
	return AddrKey{}
}

// Addr is a as a netip.Addr.
func (a AddrKey) Addr() netip.Addr {
	switch a.len {
	case 4:
		return netip.AddrFrom4([4]byte(a.a[:4]))
	case 16:
		return netip.AddrFrom16(a.a)
	}
	return netip.Addr{}
}

// PrefixKey is a netip.Prefix as a plain value (see AddrKey): 18 bytes instead of 32.
type PrefixKey struct {
	addr AddrKey
	bits uint8 // netip.Prefix.Bits()+1; 0: invalid
}

// PrefixKeyOf is p as a PrefixKey.
func PrefixKeyOf(p netip.Prefix) PrefixKey {
	if !p.IsValid() {
		return PrefixKey{}
	}
	return PrefixKey{AddrKeyOf(p.Addr()), uint8(p.Bits() + 1)}
}

// Prefix is p as a netip.Prefix.
func (p PrefixKey) Prefix() netip.Prefix {
	if p.bits == 0 {
		return netip.Prefix{}
	}
	return netip.PrefixFrom(p.addr.Addr(), int(p.bits)-1)
}

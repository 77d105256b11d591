package netipx

import (
	"net/netip"
	"testing"
	"unsafe"
)

// AddrKey and PrefixKey round-trip every kind of address and prefix, and tell apart what
// netip does (an IPv4 address from its IPv4-mapped IPv6 form, a prefix by its length).
func TestCompactRoundTrip(t *testing.T) {
	addrs := []netip.Addr{{}, netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("0.0.0.0"),
		netip.MustParseAddr("::ffff:192.0.2.1"), netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("::")}
	seen := map[AddrKey]netip.Addr{}
	for _, a := range addrs {
		c := AddrKeyOf(a)
		if got := c.Addr(); got != a {
			t.Errorf("AddrKeyOf(%v).Addr() = %v", a, got)
		}
		if o, dup := seen[c]; dup {
			t.Errorf("AddrKeyOf(%v) = AddrKeyOf(%v)", a, o)
		}
		seen[c] = a
	}
	if got := AddrKeyOf(netip.MustParseAddr("fe80::1%eth0")).Addr(); got != netip.MustParseAddr("fe80::1") {
		t.Errorf("a zoned address = %v, want it without its zone", got)
	}
	prefixes := []netip.Prefix{{}, netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("10.0.0.0/24"),
		netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("fd00::/64"), netip.MustParsePrefix("fd00::/128"),
		netip.MustParsePrefix("::/0"), netip.MustParsePrefix("::ffff:10.0.0.0/104")}
	seenP := map[PrefixKey]netip.Prefix{}
	for _, p := range prefixes {
		c := PrefixKeyOf(p)
		if got := c.Prefix(); got != p {
			t.Errorf("PrefixKeyOf(%v).Prefix() = %v", p, got)
		}
		if o, dup := seenP[c]; dup {
			t.Errorf("PrefixKeyOf(%v) = PrefixKeyOf(%v)", p, o)
		}
		seenP[c] = p
	}
	if s := unsafe.Sizeof(PrefixKey{}); s > 18 {
		t.Errorf("a PrefixKey is %d bytes, want at most 18", s)
	}
}

package netipx

import (
	"net/netip"
	"testing"
	"unsafe"
)

// AddrKey and PrefixKey round-trip every kind of address and prefix, and tell apart what
// netip does (an IPv4 address from its IPv4-mapped IPv6 form, a prefix by its length).
func TestKeys(t *testing.T) {
	roundTrips(t, []netip.Addr{{}, netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("0.0.0.0"),
		netip.MustParseAddr("::ffff:192.0.2.1"), netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("::")},
		AddrKeyOf, AddrKey.Addr)
	roundTrips(t, []netip.Prefix{{}, netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("10.0.0.0/24"),
		netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("fd00::/64"), netip.MustParsePrefix("fd00::/128"),
		netip.MustParsePrefix("::/0"), netip.MustParsePrefix("::ffff:10.0.0.0/104")},
		PrefixKeyOf, PrefixKey.Prefix)
	if got := AddrKeyOf(netip.MustParseAddr("fe80::1%eth0")).Addr(); got != netip.MustParseAddr("fe80::1") {
		t.Errorf("a zoned address = %v, want it without its zone", got)
	}
	if s := unsafe.Sizeof(PrefixKey{}); s > 18 {
		t.Errorf("a PrefixKey is %d bytes, want at most 18", s)
	}
}

// roundTrips checks that back(key(v)) is v for each of vs, and that no two have one key.
func roundTrips[V, K comparable](t *testing.T, vs []V, key func(V) K, back func(K) V) {
	t.Helper()
	seen := map[K]V{}
	for _, v := range vs {
		k := key(v)
		if got := back(k); got != v {
			t.Errorf("%v round-trips to %v", v, got)
		}
		if o, dup := seen[k]; dup {
			t.Errorf("%v and %v have the same key", v, o)
		}
		seen[k] = v
	}
}

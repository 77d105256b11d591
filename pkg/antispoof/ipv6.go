package antispoof

import (
	"fmt"
	"net"
	"net/netip"

	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/bridge"
)

// IPv6: a pod with an IPv6 address has entries in a second set, @pods6 (in-port . IPv6
// source . source MAC): one for its address and one for its link-local address (the one
// bridge.LinkLocal derives from its MAC, which the plugin assigns). The chain accepts
//
//   - IPv6 whose (in-port . source . source MAC) is in @pods6;
//   - neighbour discovery only when it cannot poison a neighbour's cache: a neighbour
//     advertisement's target, a solicitation's or advertisement's source, and any
//     link-layer address option in it must be the pod's own (each checked against
//     @pods6), and the message must carry at most that one option in an IPv6 header with
//     no extension headers; router advertisements and redirects from pods are dropped.
//
// Everything else IPv6 from a pod is dropped. A pod without an IPv6 address has no @pods6
// entry, so its IPv6 is dropped as before, and counted as before in "not-ipv4": its kernel
// still sends link-local and unspecified-source (::) IPv6 (duplicate address detection,
// MLD, router solicitations), which is no spoofing. So IPv6 from a link-local or
// unspecified source that is not the pod's own counts there too, also for pods with IPv6
// (where it is a spoofed link-local address); the rest counts as spoofed IPv6 or spoofed
// NDP. The plugin adds every IPv6 address without DAD, so a pod it wired never needs the
// unspecified source.

// Names in the kernel.
const (
	Set6 = "pods6"

	CounterIPv6 = "spoofed-ipv6" // IPv6 with a source IP or MAC that is not the pod's
	CounterNDP  = "spoofed-ndp"  // neighbour discovery the pod may not send (foreign target or link-layer address, RA, redirect)
)

const (
	setID6  = 0x6e62
	keyLen6 = ifnameLen + 16 + 8
	// Registers of the IPv6 concatenation: name in NFT_REG_1, the address in NFT_REG_2,
	// the MAC right after it: NFT_REG_3, which is NFT_REG32_08 and what the kernel lists.
	regMAC6 = 3
)

// ICMPv6 neighbour discovery types (RFC 4861).
const (
	ndRouterSolicit = 133
	ndRedirect      = 137
	ndNeighSolicit  = 135
	ndNeighAdvert   = 136
)

// EntriesFor is every entry of a pod attachment with host veth hostVeth and addresses ips
// (the first one decides the MAC, as bridge.PodMAC does for the plugin): one per address,
// and the link-local address's when the pod has IPv6.
func EntriesFor(hostVeth string, ips ...netip.Addr) []Entry {
	if len(ips) == 0 {
		return nil
	}
	mac := bridge.PodMAC(ips[0])
	out := make([]Entry, 0, len(ips)+1)
	v6 := false
	for _, ip := range ips {
		out = append(out, Entry{HostVeth: hostVeth, IP: ip, MAC: mac})
		v6 = v6 || ip.Is6()
	}
	if v6 {
		out = append(out, Entry{HostVeth: hostVeth, IP: bridge.LinkLocal(mac).Addr(), MAC: mac})
	}
	return out
}

func (e Entry) key6() ([]byte, error) {
	if e.IP.Is4In6() || e.IP.Zone() != "" {
		return nil, fmt.Errorf("entry %s: not a plain IPv6 address", e)
	}
	k := make([]byte, keyLen6)
	copy(k, e.HostVeth)
	ip := e.IP.As16()
	copy(k[ifnameLen:], ip[:])
	copy(k[ifnameLen+16:], e.MAC)
	return k, nil
}

func entryFromKey6(k []byte) Entry {
	n := 0
	for n < ifnameLen && k[n] != 0 {
		n++
	}
	ip, _ := netip.AddrFromSlice(k[ifnameLen : ifnameLen+16])
	mac := make(net.HardwareAddr, 6)
	copy(mac, k[ifnameLen+16:ifnameLen+22])
	return Entry{HostVeth: string(k[:n]), IP: ip, MAC: mac}
}

func set6Msg() msg { return setMsgOf(Set6, setID6, 8, 16) }

// elementMsgs adds or deletes keys, each in its family's set: one message per set.
func elementMsgs(typ uint16, keys [][]byte) []msg {
	var k4, k6 [][]byte
	for _, k := range keys {
		if len(k) == keyLen6 {
			k6 = append(k6, k)
		} else {
			k4 = append(k4, k)
		}
	}
	var out []msg
	if len(k4) > 0 {
		out = append(out, elementMsg(typ, k4))
	}
	if len(k6) > 0 {
		out = append(out, setElementMsg(Set6, setID6, typ, k6))
	}
	return out
}

// ensure6Msgs create the IPv6 set and counters (part of ensureMsgs, before the rules that
// use them).
func ensure6Msgs() []msg {
	return []msg{set6Msg(), counterMsg(CounterIPv6), counterMsg(CounterNDP)}
}

func inPods6() expression {
	return expression{"lookup", []attr{str(unix.NFTA_LOOKUP_SET, Set6), u32(unix.NFTA_LOOKUP_SREG, regName)}}
}

func notInPods6() expression {
	return expression{"lookup", []attr{str(unix.NFTA_LOOKUP_SET, Set6), u32(unix.NFTA_LOOKUP_SREG, regName), u32(unix.NFTA_LOOKUP_FLAGS, unix.NFT_LOOKUP_F_INV)}}
}

// mask ands register 1's first n bytes with m.
func mask(n uint32, m []byte) expression {
	return expression{"bitwise", []attr{
		u32(unix.NFTA_BITWISE_SREG, 1), u32(unix.NFTA_BITWISE_DREG, 1), u32(unix.NFTA_BITWISE_LEN, n),
		nest(unix.NFTA_BITWISE_MASK, raw(unix.NFTA_DATA_VALUE, m)),
		nest(unix.NFTA_BITWISE_XOR, raw(unix.NFTA_DATA_VALUE, make([]byte, n))),
	}}
}

func th(offset, n, dreg uint32) expression {
	return load(unix.NFT_PAYLOAD_TRANSPORT_HEADER, offset, n, dreg)
}

func l4proto() expression {
	return expression{"meta", []attr{u32(unix.NFTA_META_DREG, 1), u32(unix.NFTA_META_KEY, unix.NFT_META_L4PROTO)}}
}

// The IPv6 header offsets the rules read (no extension headers: ICMPv6 at 40).
const (
	ip6PayloadLen = 4
	ip6NextHdr    = 6
	ip6Src        = 8
	ip6ICMP       = 40
)

// ndp matches an ICMPv6 message of type typ and length n directly after the IPv6 header.
func ndp(typ uint8, n uint16) []expression {
	return concat(etherType(unix.ETH_P_IPV6), []expression{
		netLoad(ip6NextHdr, 1, 1), cmp(unix.NFT_CMP_EQ, 1, []byte{unix.IPPROTO_ICMPV6}),
		netLoad(ip6ICMP, 1, 1), cmp(unix.NFT_CMP_EQ, 1, []byte{typ}),
		netLoad(ip6PayloadLen, 2, 1), cmp(unix.NFT_CMP_EQ, 1, []byte{byte(n >> 8), byte(n)}),
	})
}

// ownSource checks (in-port . IPv6 source . source MAC) against @pods6.
func ownSource() []expression {
	return []expression{iifname(), netLoad(ip6Src, 16, regIP), linkLoad(6, 6, regMAC6), inPods6()}
}

// option matches a link-layer address option of type typ (1 source, 2 target) at ICMPv6
// offset off and checks its MAC, with the address in NFT_REG_2, against @pods6.
func option(typ uint8, off uint32) []expression {
	return []expression{
		netLoad(ip6ICMP+off, 2, 1), cmp(unix.NFT_CMP_EQ, 1, []byte{typ, 1}),
		iifname(), netLoad(ip6ICMP+off+2, 6, regMAC6), inPods6(),
	}
}

// rules6 are the IPv6 rules of the chain, in order (see the comment at the top).
func rules6() []rule {
	accept, drop := verdict(nfAccept), verdict(nfDrop)
	target := []expression{netLoad(ip6ICMP+8, 16, regIP), inPods6()} // after ownSource: name and MAC still loaded
	return []rule{
		// The common case first (the chain runs for every frame a pod sends): anything but
		// ICMPv6 from the pod's own address and MAC. It accepts nothing the rules below
		// would drop: they single out ICMPv6 (neighbour discovery) and sources not in the
		// set. A packet whose headers do not parse has no l4proto and falls through.
		{"IPv6 other than ICMPv6 from the pod's own address and MAC", concat(etherType(unix.ETH_P_IPV6), []expression{
			l4proto(), cmp(unix.NFT_CMP_NEQ, 1, []byte{unix.IPPROTO_ICMPV6}),
		}, ownSource(), []expression{accept})},
		{"NA for the pod's own address", concat(ndp(ndNeighAdvert, 24), ownSource(), target, []expression{accept})},
		{"NA for the pod's own address and MAC", concat(ndp(ndNeighAdvert, 32), ownSource(), target, option(2, 24), []expression{accept})},
		{"NS from the pod's own address", concat(ndp(ndNeighSolicit, 24), ownSource(), []expression{accept})},
		{"NS from the pod's own address and MAC", concat(ndp(ndNeighSolicit, 32), ownSource(), option(1, 24), []expression{accept})},
		{"RS from the pod's own address", concat(ndp(ndRouterSolicit, 8), ownSource(), []expression{accept})},
		{"RS from the pod's own address and MAC", concat(ndp(ndRouterSolicit, 16), ownSource(), option(1, 8), []expression{accept})},
		{"IPv6 from a link-local source not the pod's", concat(etherType(unix.ETH_P_IPV6), []expression{
			netLoad(ip6Src, 2, 1), mask(2, []byte{0xff, 0xc0}), cmp(unix.NFT_CMP_EQ, 1, []byte{0xfe, 0x80}),
			iifname(), netLoad(ip6Src, 16, regIP), linkLoad(6, 6, regMAC6), notInPods6(),
			count(CounterOther), drop,
		})},
		{"IPv6 from the unspecified source", concat(etherType(unix.ETH_P_IPV6), []expression{
			netLoad(ip6Src, 16, 1), cmp(unix.NFT_CMP_EQ, 1, make([]byte, 16)),
			count(CounterOther), drop,
		})},
		// Any other neighbour discovery, extension headers or not.
		{"spoofed NDP", concat(etherType(unix.ETH_P_IPV6), []expression{
			l4proto(), cmp(unix.NFT_CMP_EQ, 1, []byte{unix.IPPROTO_ICMPV6}),
			th(0, 1, 1), cmp(unix.NFT_CMP_GTE, 1, []byte{ndRouterSolicit}), cmp(unix.NFT_CMP_LTE, 1, []byte{ndRedirect}),
			count(CounterNDP), drop,
		})},
		{"IPv6 from the pod's own address and MAC", concat(etherType(unix.ETH_P_IPV6), ownSource(), []expression{accept})},
		{"spoofed IPv6", concat(etherType(unix.ETH_P_IPV6), []expression{count(CounterIPv6), drop})},
	}
}

package antispoof

import (
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/bridge"
	"github.com/netagent/netagent/pkg/nlattr"
)

// The rule set, as the nftables messages that install it. `nft list table bridge netagent`
// shows it as (the test compares this exactly):
//
//	set pods { type ifname . ipv4_addr . ether_addr }
//	chain prerouting {
//		type filter hook prerouting priority filter; policy accept;
//		iifname != "na*" accept
//		iifname . ip saddr . ether saddr @pods accept
//		arp htype 1 arp ptype ip arp hlen 6 arp plen 4 iifname . arp saddr ip . ether saddr @pods iifname . arp saddr ip . arp saddr ether @pods accept
//		ether type ip counter name "spoofed-ipv4" drop
//		ether type arp counter name "spoofed-arp" drop
//		counter name "not-ipv4" drop
//	}
//
// Accepting what is known and then dropping the rest of a kind (rather than dropping what
// is unknown) fails closed: a frame too short for a field makes the accept rule not match,
// so it is dropped.

// Kernel constants golang.org/x/sys/unix does not define (linux/netfilter/nf_tables.h,
// linux/netfilter.h).
const (
	nftSetConcat      = 0x80 // NFT_SET_CONCAT
	nftaSetDescConcat = 2    // NFTA_SET_DESC_CONCAT
	nftaSetFieldLen   = 1    // NFTA_SET_FIELD_LEN
	nfBrPreRouting    = 0    // NF_BR_PRE_ROUTING
	nfDrop, nfAccept  = 0, 1 // NF_DROP, NF_ACCEPT

	priorityFilter = 0xffffff38 // -200 (NF_BR_PRI_FILTER_BRIDGED) as the kernel's u32
)

// setID is the set's transaction-local ID (the library uses one as well, and the element
// messages carry it, so they equal the library's byte for byte; the kernel finds the set
// by name).
const setID = 0x6e61

// The element key is the concatenation ifname . ipv4_addr . ether_addr, each field padded
// to 4 bytes as the kernel's registers are: 16 + 4 + 8 bytes.
const (
	ifnameLen = 16
	keyLen    = ifnameLen + 4 + 8
)

// Registers as nft allocates them for the concatenation: the 16-byte interface name in
// NFT_REG_1, the IPv4 address right after it (NFT_REG_2), the MAC after that (NFT_REG32_05).
const (
	regName = 1
	regIP   = 2
	regMAC  = 13
)

func tableMsg() msg {
	return msg{typ: unix.NFT_MSG_NEWTABLE, flags: unix.NLM_F_CREATE, attrs: []attr{str(unix.NFTA_TABLE_NAME, Table), u32(unix.NFTA_TABLE_FLAGS, 0)}}
}

// chainAttrs describe the base chain: bridge prerouting, priority filter (-200), accept.
func chainAttrs() []attr {
	return []attr{
		str(unix.NFTA_CHAIN_TABLE, Table),
		str(unix.NFTA_CHAIN_NAME, Chain),
		nest(unix.NFTA_CHAIN_HOOK, u32(unix.NFTA_HOOK_HOOKNUM, nfBrPreRouting), u32(unix.NFTA_HOOK_PRIORITY, priorityFilter)),
		u32(unix.NFTA_CHAIN_POLICY, nfAccept),
		str(unix.NFTA_CHAIN_TYPE, "filter"),
	}
}

func setMsg() msg { return setMsgOf(Set, setID, 7, 4) }

// setMsgOf creates the set name (transaction ID id) of keys ifname . address . ether_addr,
// where the address has nft type number addrType and addrLen bytes.
func setMsgOf(name string, id, addrType, addrLen uint32) msg {
	field := func(n uint32) attr { return nest(unix.NFTA_LIST_ELEM, u32(nftaSetFieldLen, n)) }
	return msg{typ: unix.NFT_MSG_NEWSET, flags: unix.NLM_F_CREATE, attrs: []attr{
		str(unix.NFTA_SET_TABLE, Table),
		str(unix.NFTA_SET_NAME, name),
		u32(unix.NFTA_SET_FLAGS, nftSetConcat),
		// nft's type numbers (ifname 41, ipv4_addr 7 or ipv6_addr 8, ether_addr 9), 6 bits
		// each, so that `nft list` can print the type.
		u32(unix.NFTA_SET_KEY_TYPE, 41<<12|addrType<<6|9),
		u32(unix.NFTA_SET_KEY_LEN, ifnameLen+addrLen+8),
		u32(unix.NFTA_SET_ID, id),
		nest(unix.NFTA_SET_DESC, nest(nftaSetDescConcat, field(ifnameLen), field(addrLen), field(6))),
	}}
}

func counterMsg(name string) msg {
	return msg{typ: unix.NFT_MSG_NEWOBJ, flags: unix.NLM_F_CREATE, attrs: []attr{
		str(unix.NFTA_OBJ_TABLE, Table),
		str(unix.NFTA_OBJ_NAME, name),
		u32(unix.NFTA_OBJ_TYPE, unix.NFT_OBJECT_COUNTER),
		nest(unix.NFTA_OBJ_DATA),
	}}
}

// elementMsg adds (unix.NFT_MSG_NEWSETELEM) or deletes (unix.NFT_MSG_DELSETELEM) the
// elements keys of the set.
func elementMsg(typ uint16, keys [][]byte) msg { return setElementMsg(Set, setID, typ, keys) }

// setElementMsg is elementMsg for the set named set with transaction ID id.
func setElementMsg(set string, id uint32, typ uint16, keys [][]byte) msg {
	els := make([]attr, len(keys))
	for i, k := range keys {
		els[i] = nest(uint16(i+1), nest(unix.NFTA_SET_ELEM_KEY, raw(unix.NFTA_DATA_VALUE, k)))
	}
	return msg{typ: typ, flags: unix.NLM_F_CREATE, attrs: []attr{
		str(unix.NFTA_SET_ELEM_LIST_SET, set),
		u32(unix.NFTA_SET_ELEM_LIST_SET_ID, id),
		str(unix.NFTA_SET_ELEM_LIST_TABLE, Table),
		nest(unix.NFTA_SET_ELEM_LIST_ELEMENTS, els...),
	}}
}

// expression is one nftables expression: its name and its attributes.
type expression struct {
	name  string
	attrs []attr
}

func (e expression) attr() attr {
	return nest(unix.NFTA_LIST_ELEM, str(unix.NFTA_EXPR_NAME, e.name), nest(unix.NFTA_EXPR_DATA, e.attrs...))
}

func load(base, offset, n, dreg uint32) expression {
	return expression{"payload", []attr{
		u32(unix.NFTA_PAYLOAD_DREG, dreg), u32(unix.NFTA_PAYLOAD_BASE, base),
		u32(unix.NFTA_PAYLOAD_OFFSET, offset), u32(unix.NFTA_PAYLOAD_LEN, n),
	}}
}

func linkLoad(offset, n, dreg uint32) expression {
	return load(unix.NFT_PAYLOAD_LL_HEADER, offset, n, dreg)
}
func netLoad(offset, n, dreg uint32) expression {
	return load(unix.NFT_PAYLOAD_NETWORK_HEADER, offset, n, dreg)
}

func cmp(op, sreg uint32, data []byte) expression {
	return expression{"cmp", []attr{
		u32(unix.NFTA_CMP_SREG, sreg), u32(unix.NFTA_CMP_OP, op), nest(unix.NFTA_CMP_DATA, raw(unix.NFTA_DATA_VALUE, data)),
	}}
}

func iifname() expression {
	return expression{"meta", []attr{u32(unix.NFTA_META_DREG, regName), u32(unix.NFTA_META_KEY, unix.NFT_META_IIFNAME)}}
}

func inPods() expression {
	return expression{"lookup", []attr{str(unix.NFTA_LOOKUP_SET, Set), u32(unix.NFTA_LOOKUP_SREG, regName)}}
}

func verdict(code uint32) expression {
	return expression{"immediate", []attr{
		u32(unix.NFTA_IMMEDIATE_DREG, unix.NFT_REG_VERDICT),
		nest(unix.NFTA_IMMEDIATE_DATA, nest(unix.NFTA_DATA_VERDICT, u32(unix.NFTA_VERDICT_CODE, code))),
	}}
}

func count(name string) expression {
	return expression{"objref", []attr{u32(unix.NFTA_OBJREF_IMM_TYPE, unix.NFT_OBJECT_COUNTER), str(unix.NFTA_OBJREF_IMM_NAME, name)}}
}

func etherType(t uint16) []expression {
	return []expression{linkLoad(12, 2, 1), cmp(unix.NFT_CMP_EQ, 1, []byte{byte(t >> 8), byte(t)})}
}

// rule is one rule of the chain; its comment identifies it in the kernel and in nft list.
type rule struct {
	comment string
	exprs   []expression
}

func concat(parts ...[]expression) []expression {
	var out []expression
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// rules is the chain, in order. (A function, not a variable: the plugin builds it only
// when it installs the rule set, not at every start.)
func rules() []rule {
	iifname, inPods, accept, drop := iifname(), inPods(), verdict(nfAccept), verdict(nfDrop)
	return append([]rule{
		{"not from a pod", []expression{
			iifname, cmp(unix.NFT_CMP_NEQ, regName, []byte(bridge.HostVethPrefix)), accept,
		}},
		{"IPv4 from the pod's own address and MAC", concat(etherType(unix.ETH_P_IP), []expression{
			iifname,
			netLoad(12, 4, regIP),  // ip saddr
			linkLoad(6, 6, regMAC), // ether saddr
			inPods,
			accept,
		})},
		{"ARP from the pod's own address and MAC", concat(etherType(unix.ETH_P_ARP), []expression{
			// Ethernet/IPv4 ARP only: htype 1, ptype 0x0800, hlen 6, plen 4.
			netLoad(0, 6, 1), cmp(unix.NFT_CMP_EQ, 1, []byte{0, 1, 8, 0, 6, 4}),
			iifname,
			netLoad(14, 4, regIP),  // arp saddr ip
			linkLoad(6, 6, regMAC), // ether saddr
			inPods,
			netLoad(8, 6, regMAC), // arp saddr ether
			inPods,
			accept,
		})},
		{"spoofed IPv4", concat(etherType(unix.ETH_P_IP), []expression{count(CounterIPv4), drop})},
		{"spoofed ARP", concat(etherType(unix.ETH_P_ARP), []expression{count(CounterARP), drop})},
	}, append(rules6(),
		rule{"neither IPv4, ARP nor IPv6", []expression{count(CounterOther), drop}})...)
}

const commentPrefix = "netagent antispoof v1: "

// userData is the rule's comment as nft writes it: type 0 (comment), length, the string
// with its NUL.
func (r rule) userData() []byte {
	s := commentPrefix + r.comment + "\x00"
	return append([]byte{0, byte(len(s))}, s...)
}

func (r rule) exprAttrs() []attr {
	out := make([]attr, len(r.exprs))
	for i, e := range r.exprs {
		out[i] = e.attr()
	}
	return out
}

// ensureMsgs install the rule set: table, chain, set and counters are created if absent (a
// create of an existing object changes nothing, counters keep their values; the table's
// and chain's settings are put back), and the chain's rules are rewritten whole.
func ensureMsgs() []msg {
	ms := []msg{
		tableMsg(),
		{typ: unix.NFT_MSG_NEWCHAIN, flags: unix.NLM_F_CREATE, attrs: chainAttrs()},
		setMsg(),
		counterMsg(CounterIPv4), counterMsg(CounterARP), counterMsg(CounterOther),
		{typ: unix.NFT_MSG_DELRULE, attrs: []attr{str(unix.NFTA_RULE_TABLE, Table), str(unix.NFTA_RULE_CHAIN, Chain)}},
	}
	ms = append(ms, ensure6Msgs()...)
	for _, r := range rules() {
		ms = append(ms, msg{typ: unix.NFT_MSG_NEWRULE, flags: unix.NLM_F_CREATE | unix.NLM_F_APPEND, attrs: []attr{
			str(unix.NFTA_RULE_TABLE, Table),
			str(unix.NFTA_RULE_CHAIN, Chain),
			nest(unix.NFTA_RULE_EXPRESSIONS, r.exprAttrs()...),
			raw(unix.NFTA_RULE_USERDATA, r.userData()),
		}})
	}
	return ms
}

// intact reports whether the table, chain and rules are as ensureMsgs writes them: the
// table not dormant, the chain's hook, priority, policy and type, and every rule with every
// attribute we write. Any error reading them counts as "no": rewriting is always safe.
func intact(c *conn) bool {
	t, err := c.dump(unix.NFT_MSG_GETTABLE, false, []attr{str(unix.NFTA_TABLE_NAME, Table)})
	if err != nil || len(t) != 1 || !nlattr.Contains(t[0], tableMsg().attrs) {
		return false
	}
	ch, err := c.dump(unix.NFT_MSG_GETCHAIN, false, []attr{str(unix.NFTA_CHAIN_TABLE, Table), str(unix.NFTA_CHAIN_NAME, Chain)})
	if err != nil || len(ch) != 1 || !nlattr.Contains(ch[0], chainAttrs()) {
		return false
	}
	got, err := c.dump(unix.NFT_MSG_GETRULE, true, []attr{str(unix.NFTA_RULE_TABLE, Table), str(unix.NFTA_RULE_CHAIN, Chain)})
	return err == nil && rulesEqual(got, rules())
}

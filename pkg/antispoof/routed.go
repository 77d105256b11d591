package antispoof

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/bridge"
	"github.com/netagent/netagent/pkg/nlattr"
)

// Routed pods (the plugin's podInterface "routed"): the pod's host veth is not a bridge
// port, so the bridge chain never sees its frames. Each such veth gets a base chain of its
// own in the netdev-family table "netagent", hooked to the veth's ingress, named after the
// veth. Its rules name the pod's addresses as constants, so a packet costs a few compares
// and no lookup, and only the pod's own packets pay it (an ip6 prerouting chain with a
// reverse-path check, tried first, cost every forwarded packet a route lookup and took
// back what leaving the bridge gained: BENCHMARKS.md).
//
// What the chain lets through, from the pod's own addresses only (IPv4, IPv6 and the IPv6
// link-local one bridge.LinkLocal derives from its MAC):
//
//   - IPv4, and Ethernet/IPv4 ARP whose sender IP is the pod's;
//   - IPv6, where neighbour discovery is limited to what cannot mislead the node: router
//     and neighbour solicitations, and neighbour advertisements whose target is the pod's
//     own address. Router advertisements, redirects and advertisements for any other
//     target are dropped. (The veth is a point-to-point link to the node, which routes to
//     the pod over it through a permanent neighbour entry, so even an advertisement that got
//     through could not take another pod's traffic; dropping it keeps the rule simple to
//     state: a pod cannot answer for another pod's address.)
//
// Everything else is counted in the table's counters (the bridge table's names) and
// dropped. MACs are not checked: on a point-to-point link a foreign source MAC misleads
// nobody. The chain's policy is accept, as the bridge chain's: a chain someone flushed
// loses the protection until the plugin's next ADD or the agent's repair, not the pod's
// connectivity. (A pod's own IPv6 that no rule drops is accepted by that policy.)

// RoutedTable is the netdev-family table of the routed pods' chains.
const RoutedTable = "netagent"

const nfNetdevPriorityFilter = 0

// Routed describes one routed pod attachment's chain: the host veth and the pod's
// addresses (at most one per family).
type Routed struct {
	HostVeth string
	IPs      []netip.Addr
}

func (r Routed) validate() error {
	if err := bridge.ValidIfName(r.HostVeth); err != nil {
		return fmt.Errorf("host veth: %w", err)
	}
	var v4, v6 int
	for _, ip := range r.IPs {
		switch {
		case ip.Is4():
			v4++
		case ip.Is6() && !ip.Is4In6() && ip.Zone() == "" && !ip.IsLinkLocalUnicast():
			v6++
		default:
			return fmt.Errorf("pod address %s: not a plain IPv4 or global IPv6 address", ip)
		}
	}
	if v4+v6 == 0 || v4 > 1 || v6 > 1 {
		return fmt.Errorf("pod addresses %v: want one or two, at most one per family", r.IPs)
	}
	return nil
}

func (r Routed) addrs() (v4, v6, ll netip.Addr) {
	for _, ip := range r.IPs {
		if ip.Is4() {
			v4 = ip
		} else {
			v6 = ip
		}
	}
	if v6.IsValid() {
		ll = bridge.LinkLocal(bridge.PodMAC(r.IPs[0])).Addr()
	}
	return v4, v6, ll
}

func routedMsg(typ, flags uint16, attrs ...attr) msg {
	return msg{typ: typ, flags: flags, attrs: attrs, fam: unix.NFPROTO_NETDEV}
}

func routedChainAttrs(veth string) []attr {
	return []attr{
		str(unix.NFTA_CHAIN_TABLE, RoutedTable),
		str(unix.NFTA_CHAIN_NAME, veth),
		nest(unix.NFTA_CHAIN_HOOK,
			u32(unix.NFTA_HOOK_HOOKNUM, unix.NF_NETDEV_INGRESS),
			u32(unix.NFTA_HOOK_PRIORITY, nfNetdevPriorityFilter),
			str(unix.NFTA_HOOK_DEV, veth)),
		u32(unix.NFTA_CHAIN_POLICY, nfAccept),
		str(unix.NFTA_CHAIN_TYPE, "filter"),
	}
}

// protocol matches the frame's ethertype (skb->protocol).
func protocol(t uint16) []expression {
	return []expression{meta(unix.NFT_META_PROTOCOL), cmp(unix.NFT_CMP_EQ, 1, []byte{byte(t >> 8), byte(t)})}
}

// meta loads the packet's meta key into register 1.
func meta(key uint32) expression {
	return expression{"meta", []attr{u32(unix.NFTA_META_DREG, 1), u32(unix.NFTA_META_KEY, key)}}
}

// routedRules are the chain's rules for r, in order (see the comment at the top). A
// dual-stack pod's IPv6 rules come after the other ethertypes are dropped, so they need
// no ethertype test of their own, and what passes them is left to the chain's policy
// (accept): the kernel's cost of a chain is per expression, paid by every ADD.
func routedRules(r Routed) []rule {
	v4, v6, ll := r.addrs()
	accept, drop := verdict(nfAccept), verdict(nfDrop)
	var out []rule
	if v6.IsValid() {
		b6 := v6.As16()
		// The common case first: the pod's data.
		out = append(out, rule{"IPv6 other than ICMPv6 from the pod's own address", concat(protocol(unix.ETH_P_IPV6), []expression{
			netLoad(ip6Src, 16, 1), cmp(unix.NFT_CMP_EQ, 1, b6[:]),
			l4proto(), cmp(unix.NFT_CMP_NEQ, 1, []byte{unix.IPPROTO_ICMPV6}),
			accept,
		})})
	}
	if v4.IsValid() {
		b4 := v4.As4()
		out = append(out,
			rule{"IPv4 from the pod's own address", concat(protocol(unix.ETH_P_IP), []expression{
				netLoad(12, 4, 1), cmp(unix.NFT_CMP_EQ, 1, b4[:]), accept,
			})},
			rule{"ARP from the pod's own address", concat(protocol(unix.ETH_P_ARP), []expression{
				netLoad(0, 6, 1), cmp(unix.NFT_CMP_EQ, 1, []byte{0, 1, 8, 0, 6, 4}),
				netLoad(14, 4, 1), cmp(unix.NFT_CMP_EQ, 1, b4[:]), accept,
			})},
			rule{"spoofed IPv4", concat(protocol(unix.ETH_P_IP), []expression{count(CounterIPv4), drop})},
			rule{"spoofed ARP", concat(protocol(unix.ETH_P_ARP), []expression{count(CounterARP), drop})},
		)
	}
	if !v6.IsValid() {
		// An IPv4-only pod's kernel still sends link-local IPv6 (MLD, router
		// solicitations): not spoofing, so counted with the other ethertypes.
		return append(out, rule{"anything else", []expression{count(CounterOther), drop}})
	}
	b6, bl := v6.As16(), ll.As16()
	icmp := []expression{l4proto(), cmp(unix.NFT_CMP_EQ, 1, []byte{unix.IPPROTO_ICMPV6})}
	return append(out,
		rule{"anything else than IPv6", []expression{
			meta(unix.NFT_META_PROTOCOL), cmp(unix.NFT_CMP_NEQ, 1, []byte{unix.ETH_P_IPV6 >> 8, unix.ETH_P_IPV6 & 0xff}),
			count(CounterOther), drop,
		}},
		// From here on, IPv6 only.
		rule{"IPv6 from a source not the pod's", []expression{
			netLoad(ip6Src, 16, 1), cmp(unix.NFT_CMP_NEQ, 1, b6[:]), cmp(unix.NFT_CMP_NEQ, 1, bl[:]),
			count(CounterIPv6), drop,
		}},
		rule{"NA for another address than the pod's", concat(icmp, []expression{
			th(0, 1, 1), cmp(unix.NFT_CMP_EQ, 1, []byte{ndNeighAdvert}),
			th(8, 16, 1), cmp(unix.NFT_CMP_NEQ, 1, b6[:]), cmp(unix.NFT_CMP_NEQ, 1, bl[:]),
			count(CounterNDP), drop,
		})},
		// Left of neighbour discovery: RS, NS and the NAs above pass; RA and redirects
		// are dropped.
		rule{"RA or redirect", concat(icmp, []expression{
			th(0, 1, 1), cmp(unix.NFT_CMP_GTE, 1, []byte{ndRouterSolicit + 1}), cmp(unix.NFT_CMP_LTE, 1, []byte{ndRedirect}),
			cmp(unix.NFT_CMP_NEQ, 1, []byte{ndNeighSolicit}), cmp(unix.NFT_CMP_NEQ, 1, []byte{ndNeighAdvert}),
			count(CounterNDP), drop,
		})},
	)
}

// routedTableAttrs are the table's attributes as we write them: no flags, so not dormant
// (a dormant table unhooks every chain in it, and writing it with these wakes it).
func routedTableAttrs() []attr {
	return []attr{str(unix.NFTA_TABLE_NAME, RoutedTable), u32(unix.NFTA_TABLE_FLAGS, 0)}
}

func routedBaseMsgs() []msg {
	ms := []msg{routedMsg(unix.NFT_MSG_NEWTABLE, unix.NLM_F_CREATE, routedTableAttrs()...)}
	for _, name := range []string{CounterIPv4, CounterARP, CounterIPv6, CounterNDP, CounterOther} {
		ms = append(ms, routedMsg(unix.NFT_MSG_NEWOBJ, unix.NLM_F_CREATE,
			str(unix.NFTA_OBJ_TABLE, RoutedTable), str(unix.NFTA_OBJ_NAME, name),
			u32(unix.NFTA_OBJ_TYPE, unix.NFT_OBJECT_COUNTER), nest(unix.NFTA_OBJ_DATA)))
	}
	return ms
}

func routedChainMsgs(r Routed) []msg {
	ms := []msg{
		routedMsg(unix.NFT_MSG_NEWCHAIN, unix.NLM_F_CREATE, routedChainAttrs(r.HostVeth)...),
		routedMsg(unix.NFT_MSG_DELRULE, 0, str(unix.NFTA_RULE_TABLE, RoutedTable), str(unix.NFTA_RULE_CHAIN, r.HostVeth)),
	}
	for _, ru := range routedRules(r) {
		ms = append(ms, routedMsg(unix.NFT_MSG_NEWRULE, unix.NLM_F_CREATE|unix.NLM_F_APPEND,
			str(unix.NFTA_RULE_TABLE, RoutedTable), str(unix.NFTA_RULE_CHAIN, r.HostVeth),
			nest(unix.NFTA_RULE_EXPRESSIONS, ru.exprAttrs()...),
			raw(unix.NFTA_RULE_USERDATA, ru.userData())))
	}
	return ms
}

func routedDelMsgs(veth string) []msg {
	return []msg{
		routedMsg(unix.NFT_MSG_DELRULE, 0, str(unix.NFTA_RULE_TABLE, RoutedTable), str(unix.NFTA_RULE_CHAIN, veth)),
		routedMsg(unix.NFT_MSG_DELCHAIN, 0, str(unix.NFTA_CHAIN_TABLE, RoutedTable), str(unix.NFTA_CHAIN_NAME, veth)),
	}
}

// AddRouted installs r's chain (and the table and its counters where missing), in one
// transaction; an existing chain of the veth gets r's rules instead of its own. The veth
// must exist. Call it before the veth is up, so no frame passes unchecked.
func AddRouted(ctx context.Context, r Routed) error {
	if err := r.validate(); err != nil {
		return err
	}
	c, err := dial(ctx)
	if err != nil {
		return err
	}
	defer c.close()
	err = c.transact(append(routedBaseMsgs(), routedChainMsgs(r)...))
	if err != nil && !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.EINVAL) {
		// A chain of this name left hooked to an earlier veth of the same name (an
		// interrupted ADD or DEL) cannot take the new one: replace it.
		if derr := c.transact(routedDelMsgs(r.HostVeth)); derr == nil {
			err = c.transact(append(routedBaseMsgs(), routedChainMsgs(r)...))
		}
	}
	if err != nil {
		return fmt.Errorf("install anti-spoofing chain netdev %s %s for %v: %w", RoutedTable, r.HostVeth, r.IPs, err)
	}
	return nil
}

// DeleteRouted removes the chain of hostVeth; a chain or table that is not there is not
// an error.
func DeleteRouted(ctx context.Context, hostVeth string) error {
	c, err := dial(ctx)
	if isAbsent(err) {
		return nil
	}
	if err != nil {
		return err
	}
	defer c.close()
	if err := c.transact(routedDelMsgs(hostVeth)); err != nil && !isAbsent(err) {
		return fmt.Errorf("remove anti-spoofing chain netdev %s %s: %w", RoutedTable, hostVeth, err)
	}
	return nil
}

// RoutedChains lists the chains of the table (each named after its host veth); none when
// the table is absent.
func RoutedChains(ctx context.Context) ([]string, error) {
	c, err := dial(ctx)
	if err != nil {
		return nil, err
	}
	defer c.close()
	bodies, err := c.dumpFam(unix.NFPROTO_NETDEV, unix.NFT_MSG_GETCHAIN, true, []attr{str(unix.NFTA_CHAIN_TABLE, RoutedTable)})
	if isAbsent(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list chains of netdev %s: %w", RoutedTable, err)
	}
	var out []string
	for name := range byName(bodies, unix.NFTA_CHAIN_TABLE, unix.NFTA_CHAIN_NAME) {
		out = append(out, name)
	}
	return out, nil
}

// byName groups dumped chains or rules of the routed table by chain name: table and name
// are the attribute types of their table and (their) chain name.
func byName(bodies [][]byte, table, name uint16) map[string][][]byte {
	out := map[string][][]byte{}
	for _, b := range bodies {
		as := nlattr.Parse(b)
		if t, _ := nlattr.Get(as, table); string(t) != RoutedTable+"\x00" {
			continue
		}
		if n, ok := nlattr.Get(as, name); ok && len(n) > 1 {
			out[string(n[:len(n)-1])] = append(out[string(n[:len(n)-1])], b)
		}
	}
	return out
}

// RoutedIntact reports whether r's chain is in the kernel as AddRouted writes it: in a
// table that is not dormant, hooked to the veth's ingress with r's rules, every attribute
// we write.
func RoutedIntact(ctx context.Context, r Routed) (bool, error) {
	if err := r.validate(); err != nil {
		return false, err
	}
	c, err := dial(ctx)
	if err != nil {
		return false, err
	}
	defer c.close()
	if ok, err := routedTableIntact(c); !ok || err != nil {
		return false, err
	}
	ch, err := c.dumpFam(unix.NFPROTO_NETDEV, unix.NFT_MSG_GETCHAIN, false, []attr{str(unix.NFTA_CHAIN_TABLE, RoutedTable), str(unix.NFTA_CHAIN_NAME, r.HostVeth)})
	if isAbsent(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if len(ch) != 1 || !nlattr.Contains(ch[0], routedChainAttrs(r.HostVeth)) {
		return false, nil
	}
	got, err := c.dumpFam(unix.NFPROTO_NETDEV, unix.NFT_MSG_GETRULE, true, []attr{str(unix.NFTA_RULE_TABLE, RoutedTable), str(unix.NFTA_RULE_CHAIN, r.HostVeth)})
	if err != nil {
		return false, err
	}
	return rulesEqual(got, routedRules(r)), nil
}

// routedTableIntact reports whether the table is there as routedBaseMsgs writes it (not
// dormant); absent is false, without an error.
func routedTableIntact(c *conn) (bool, error) {
	t, err := c.dumpFam(unix.NFPROTO_NETDEV, unix.NFT_MSG_GETTABLE, false, []attr{str(unix.NFTA_TABLE_NAME, RoutedTable)})
	if isAbsent(err) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return len(t) == 1 && nlattr.Contains(t[0], routedTableAttrs()), nil
}

// rulesEqual reports whether the dumped rules got are want, in order, with every attribute
// we write.
func rulesEqual(got [][]byte, want []rule) bool {
	if len(got) != len(want) {
		return false
	}
	for i, r := range want {
		if !nlattr.Contains(got[i], []attr{raw(unix.NFTA_RULE_USERDATA, r.userData())}) {
			return false
		}
		exprs, _ := nlattr.Get(nlattr.Parse(got[i]), unix.NFTA_RULE_EXPRESSIONS)
		list := nlattr.Parse(exprs)
		if len(list) != len(r.exprs) {
			return false
		}
		for j, e := range r.exprs {
			if !nlattr.Contains(list[j].Data, e.attr().Nested) {
				return false
			}
		}
	}
	return true
}

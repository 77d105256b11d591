// Package antispoof lets a pod send only with its own IPv4 address and MAC: frames that
// enter the node bridge from a pod's host veth with any other source are dropped and
// counted.
//
// Design: one node-level rule set, in the bridge-family nftables table "netagent", that
// never changes as pods come and go. Its base chain (bridge prerouting, priority filter)
// looks at frames arriving from our host veths (the name prefix bridge.HostVethPrefix)
// and accepts
//
//   - IPv4 whose (in-port . source IP . source MAC) is in the set @pods,
//   - ARP for Ethernet/IPv4 whose (in-port . sender IP . source MAC) and
//     (in-port . sender IP . sender MAC) are both in @pods;
//
// every other frame from a pod is dropped and counted in one of three named counters:
// spoofed IPv4, spoofed ARP, and neither IPv4 nor ARP. Frames from other ports (the
// uplink, veths that are not ours) are not touched.
//
// A pod is then one set element: ADD adds it, DEL removes it, each one netlink
// transaction of one message. This is why a set and not per-pod chains or rules: a pod
// costs one hash-set element whatever the number of pods; a packet costs one hash lookup
// (two for ARP) whatever the number of pods; and nothing is executed per pod (the plugin
// talks netlink directly). Changing a base chain or its rules is also far dearer here: the
// kernel waits for an RCU grace period (~13 ms on the test machine, against ~0.1 ms for an
// element). When ADD finds no table or set (the first pod on a node, or after `nft flush
// ruleset`), it installs the whole rule set with its element in one transaction, so a
// packet sees either no rules or all of them.
//
// The agent keeps the set equal to the IPAM store (Sync, SyncDataDir), so an agent
// restart, a lost DEL or an admin's `nft flush ruleset` is repaired on its next pass. A
// flushed ruleset loses protection until then, not connectivity: with no table there is
// no rule to drop anything.
//
// What is covered: IPv4 and ARP from pods attached by netagent-cni (host veths named
// na<hash>), on every bridge of the node's network namespace. What is not:
//
//   - IPv6 and every other ethertype from pods is dropped. netagent is IPv4 only, and an
//     unfiltered IPv6 would let a pod spoof link-local traffic and send router
//     advertisements to its neighbours. What breaks: IPv6 (link-local included) between
//     pods on one node, and pods speaking raw Ethernet protocols or VLAN-tagged frames.
//   - A pod cannot add addresses of its own (a VIP that keepalived moves, a secondary IP):
//     only the address IPAM gave it is let through.
//   - ARP probes with sender IP 0.0.0.0 (duplicate address detection) are dropped; Linux
//     does not send them for a configured address.
//   - Docker route-mode containers and anything else whose veth netagent-cni did not
//     create: their ports do not carry our prefix and are not filtered.
//   - Traffic the node itself sends into the bridge (it does not pass bridge prerouting).
//
// Everything here works in the network namespace of the calling thread.
package antispoof

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"

	"github.com/netagent/netagent/pkg/bridge"
)

// Names in the kernel, for operators and tests (`nft list table bridge netagent`).
const (
	Table = "netagent"
	Chain = "prerouting"
	Set   = "pods"

	CounterIPv4  = "spoofed-ipv4" // IPv4 with a source IP or MAC that is not the pod's
	CounterARP   = "spoofed-arp"  // ARP with a sender IP or MAC that is not the pod's, or not Ethernet/IPv4
	CounterOther = "not-ipv4"     // neither IPv4 nor ARP (IPv6, VLAN-tagged, other ethertypes)
)

// ErrNotInstalled means the table is not in the kernel (no pod was added yet, the agent has
// not synced, or someone removed it).
var ErrNotInstalled = errors.New("anti-spoofing table bridge " + Table + " is not installed")

// Entry is one pod attachment allowed to send: the pod's frames arrive on HostVeth and must
// carry IP and MAC as their source.
type Entry struct {
	HostVeth string
	IP       netip.Addr
	MAC      net.HardwareAddr
}

// EntryFor is the entry of a pod attachment with host veth hostVeth and address ip: its MAC
// is the one bridge.PodMAC derives from the address, as the plugin gives it.
func EntryFor(hostVeth string, ip netip.Addr) Entry {
	return Entry{HostVeth: hostVeth, IP: ip, MAC: bridge.PodMAC(ip)}
}

func (e Entry) String() string { return fmt.Sprintf("%s %s %s", e.HostVeth, e.IP, e.MAC) }

// The element key is the concatenation ifname . ipv4_addr . ether_addr, each field padded
// to 4 bytes as the kernel's registers are: 16 + 4 + 8 bytes.
const (
	ifnameLen = 16
	keyLen    = ifnameLen + 4 + 8
)

func (e Entry) key() ([]byte, error) {
	if e.HostVeth == "" || len(e.HostVeth) >= ifnameLen {
		return nil, fmt.Errorf("entry %s: bad interface name %q", e, e.HostVeth)
	}
	if !e.IP.Is4() {
		return nil, fmt.Errorf("entry %s: not an IPv4 address", e)
	}
	if len(e.MAC) != 6 {
		return nil, fmt.Errorf("entry %s: not an Ethernet MAC", e)
	}
	k := make([]byte, keyLen)
	copy(k, e.HostVeth)
	ip := e.IP.As4()
	copy(k[ifnameLen:], ip[:])
	copy(k[ifnameLen+4:], e.MAC)
	return k, nil
}

func entryFromKey(k []byte) (Entry, bool) {
	if len(k) != keyLen {
		return Entry{}, false
	}
	n := 0
	for n < ifnameLen && k[n] != 0 {
		n++
	}
	ip, _ := netip.AddrFromSlice(k[ifnameLen : ifnameLen+4])
	mac := make(net.HardwareAddr, 6)
	copy(mac, k[ifnameLen+4:ifnameLen+10])
	return Entry{HostVeth: string(k[:n]), IP: ip, MAC: mac}, true
}

// The objects of the rule set.
var (
	table   = &nftables.Table{Name: Table, Family: nftables.TableFamilyBridge}
	keyType = nftables.MustConcatSetType(nftables.TypeIFName, nftables.TypeIPAddr, nftables.TypeEtherAddr)
	chain   = &nftables.Chain{
		Table: table, Name: Chain, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRef(-200),
		Policy: ref(nftables.ChainPolicyAccept),
	}
	counters = []string{CounterIPv4, CounterARP, CounterOther}
)

func ref[T any](v T) *T { return &v }

// podsSet describes the set. It carries a fixed transaction-local ID: AddSet would
// otherwise take one from a package counter of nftables that is not safe for concurrent
// use (rules refer to the set by name; the ID only has to be unique within a transaction).
func podsSet() *nftables.Set {
	return &nftables.Set{ID: 0x6e61, Table: table, Name: Set, Concatenation: true, KeyType: keyType}
}

// Registers as nft allocates them for the concatenation: the 16-byte interface name in
// NFT_REG_1, the IPv4 address right after it (NFT_REG_2), the MAC after that (NFT_REG32_05).
const (
	regName = 1
	regIP   = 2
	regMAC  = 13
)

// rule is one rule of the chain; its comment identifies it in the kernel (and in nft list).
type rule struct {
	comment string
	exprs   []expr.Any
}

const commentPrefix = "netagent antispoof v1: "

func etherType(t uint16) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseLLHeader, Offset: 12, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{byte(t >> 8), byte(t)}},
	}
}

func load(base expr.PayloadBase, off, n, reg uint32) expr.Any {
	return &expr.Payload{DestRegister: reg, Base: base, Offset: off, Len: n}
}

func concat(exprs ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, e := range exprs {
		out = append(out, e...)
	}
	return out
}

var (
	iifname = &expr.Meta{Key: expr.MetaKeyIIFNAME, Register: regName}
	inPods  = &expr.Lookup{SourceRegister: regName, SetName: Set}
	accept  = &expr.Verdict{Kind: expr.VerdictAccept}
	drop    = &expr.Verdict{Kind: expr.VerdictDrop}
)

func count(name string) expr.Any { return &expr.Objref{Type: int(nftables.ObjTypeCounter), Name: name} }

// rules is the chain, in order. Accepting what is known and then dropping the rest of a
// kind (instead of dropping what is unknown) fails closed: a frame too short for a field
// load makes its accept rule not match, so it is dropped.
var rules = []rule{
	{"not from a pod", []expr.Any{
		iifname,
		&expr.Cmp{Op: expr.CmpOpNeq, Register: regName, Data: []byte(bridge.HostVethPrefix)},
		accept,
	}},
	{"IPv4 from the pod's own address and MAC", concat(etherType(0x0800), []expr.Any{
		iifname,
		load(expr.PayloadBaseNetworkHeader, 12, 4, regIP), // ip saddr
		load(expr.PayloadBaseLLHeader, 6, 6, regMAC),      // ether saddr
		inPods,
		accept,
	})},
	{"ARP from the pod's own address and MAC", concat(etherType(0x0806), []expr.Any{
		// Ethernet/IPv4 ARP only: htype 1, ptype 0x0800, hlen 6, plen 4.
		load(expr.PayloadBaseNetworkHeader, 0, 6, 1),
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0, 1, 8, 0, 6, 4}},
		iifname,
		load(expr.PayloadBaseNetworkHeader, 14, 4, regIP), // arp saddr ip
		load(expr.PayloadBaseLLHeader, 6, 6, regMAC),      // ether saddr
		inPods,
		load(expr.PayloadBaseNetworkHeader, 8, 6, regMAC), // arp saddr ether
		inPods,
		accept,
	})},
	{"spoofed IPv4", concat(etherType(0x0800), []expr.Any{count(CounterIPv4), drop})},
	{"spoofed ARP", concat(etherType(0x0806), []expr.Any{count(CounterARP), drop})},
	{"neither IPv4 nor ARP", []expr.Any{count(CounterOther), drop}},
}

func (r rule) userData() []byte {
	return userdata.AppendString(nil, userdata.TypeComment, commentPrefix+r.comment)
}

// ensure queues the whole rule set: table, chain, set and counters are created if absent
// (a create of an existing object changes nothing, counters keep their values), the chain's
// rules are rewritten. In one transaction with whatever else is queued.
func ensure(c *nftables.Conn, set *nftables.Set) {
	c.AddTable(table)
	c.AddChain(chain)
	_ = c.AddSet(set, nil) // errors only for anonymous sets
	for _, n := range counters {
		c.AddObj(&nftables.CounterObj{Table: table, Name: n})
	}
	c.FlushChain(chain)
	for _, r := range rules {
		c.AddRule(&nftables.Rule{Table: table, Chain: chain, Exprs: r.exprs, UserData: r.userData()})
	}
}

func conn(ctx context.Context) (*nftables.Conn, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	c, err := nftables.New(nftables.AsLasting())
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	return c, nil
}

// Add adds e, installing the whole rule set first when the table or set is missing (the
// first pod on a node, or after `nft flush ruleset`). Adding an entry that is there is not
// an error.
//
// The common case is one transaction holding one element. Re-creating the chain and its
// rules on every call would repair more (a flushed chain, an edited rule), but on this
// kernel any change to a base chain or its rules waits for an RCU grace period, ~13 ms,
// more than the rest of an ADD; that repair is Sync's, which the agent runs.
func Add(ctx context.Context, e Entry) error {
	k, err := e.key()
	if err != nil {
		return err
	}
	c, err := conn(ctx)
	if err != nil {
		return err
	}
	defer c.CloseLasting()
	set := podsSet()
	el := []nftables.SetElement{{Key: k}}
	if err := c.SetAddElements(set, el); err != nil {
		return err
	}
	err = c.Flush()
	if errors.Is(err, syscall.ENOENT) {
		// No table or no set: install everything and the element, in one transaction.
		ensure(c, set)
		if err = c.SetAddElements(set, el); err != nil {
			return err
		}
		err = c.Flush()
	}
	if err != nil {
		return fmt.Errorf("add anti-spoofing entry %s: %w", e, err)
	}
	return nil
}

// Delete removes entries; an entry (or table) that is not there is not an error, and
// neither is a kernel without nftables (there is nothing to remove).
func Delete(ctx context.Context, entries ...Entry) error {
	if len(entries) == 0 {
		return nil
	}
	c, err := conn(ctx)
	if err != nil {
		return err
	}
	defer c.CloseLasting()
	err = deleteKeys(c, entries)
	if isAbsent(err) && len(entries) > 1 {
		// One missing element fails the whole transaction: remove them one by one.
		var errs []error
		for _, e := range entries {
			if err := deleteKeys(c, []Entry{e}); !isAbsent(err) {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	}
	if isAbsent(err) {
		return nil
	}
	return err
}

func deleteKeys(c *nftables.Conn, entries []Entry) error {
	els := make([]nftables.SetElement, 0, len(entries))
	for _, e := range entries {
		k, err := e.key()
		if err != nil {
			return err
		}
		els = append(els, nftables.SetElement{Key: k})
	}
	if err := c.SetDeleteElements(podsSet(), els); err != nil {
		return err
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("delete anti-spoofing entries %v: %w", entries, err)
	}
	return nil
}

// isAbsent reports whether err says the table, set or element does not exist, or that the
// kernel has no nftables at all.
func isAbsent(err error) bool {
	return errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.EPROTONOSUPPORT) || errors.Is(err, syscall.EAFNOSUPPORT)
}

// DeleteVeth removes every entry of hostVeth (for a DEL that has no record of the address).
func DeleteVeth(ctx context.Context, hostVeth string) error {
	all, err := List(ctx)
	if errors.Is(err, ErrNotInstalled) || isAbsent(err) {
		return nil
	}
	if err != nil {
		return err
	}
	var mine []Entry
	for _, e := range all {
		if e.HostVeth == hostVeth {
			mine = append(mine, e)
		}
	}
	return Delete(ctx, mine...)
}

// List returns the entries in the kernel; ErrNotInstalled when the table or set is absent.
func List(ctx context.Context) ([]Entry, error) {
	c, err := conn(ctx)
	if err != nil {
		return nil, err
	}
	defer c.CloseLasting()
	return list(c)
}

func list(c *nftables.Conn) ([]Entry, error) {
	// GetSetByName reports a missing table or set as ENOENT; GetSetElements does not.
	if _, err := c.GetSetByName(table, Set); err != nil {
		if isAbsent(err) {
			return nil, ErrNotInstalled
		}
		return nil, fmt.Errorf("read set %s: %w", Set, err)
	}
	els, err := c.GetSetElements(podsSet())
	if err != nil {
		return nil, fmt.Errorf("read set %s: %w", Set, err)
	}
	out := make([]Entry, 0, len(els))
	for _, el := range els {
		if e, ok := entryFromKey(el.Key); ok {
			out = append(out, e)
		}
	}
	return out, nil
}

// Has reports whether e is in the kernel's set (false when the table is absent).
func Has(ctx context.Context, e Entry) (bool, error) {
	all, err := List(ctx)
	if errors.Is(err, ErrNotInstalled) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	for _, x := range all {
		if x.equal(e) {
			return true, nil
		}
	}
	return false, nil
}

func (e Entry) equal(o Entry) bool {
	return e.HostVeth == o.HostVeth && e.IP == o.IP && string(e.MAC) == string(o.MAC)
}

// Count is one counter's value.
type Count struct{ Packets, Bytes uint64 }

// Counts are the drop counters: frames from pods dropped by kind.
type Counts struct {
	SpoofedIPv4 Count // IPv4 whose source IP or MAC is not the pod's
	SpoofedARP  Count // ARP whose sender IP or MAC is not the pod's, or not Ethernet/IPv4
	NotIPv4     Count // neither IPv4 nor ARP (IPv6, VLAN-tagged, ...): not spoofing as such
}

// Counters reads the drop counters; ErrNotInstalled when the table is absent.
func Counters(ctx context.Context) (Counts, error) {
	c, err := conn(ctx)
	if err != nil {
		return Counts{}, err
	}
	defer c.CloseLasting()
	if _, err := c.GetSetByName(table, Set); isAbsent(err) {
		return Counts{}, ErrNotInstalled
	}
	objs, err := c.GetObjects(table)
	if err != nil {
		return Counts{}, fmt.Errorf("read counters: %w", err)
	}
	var out Counts
	for _, o := range objs {
		co, ok := o.(*nftables.CounterObj)
		if !ok {
			continue
		}
		v := Count{Packets: co.Packets, Bytes: co.Bytes}
		switch co.Name {
		case CounterIPv4:
			out.SpoofedIPv4 = v
		case CounterARP:
			out.SpoofedARP = v
		case CounterOther:
			out.NotIPv4 = v
		}
	}
	return out, nil
}

// Dropped is the number of spoofed frames (IPv4 and ARP) dropped so far, and their bytes.
func Dropped(ctx context.Context) (packets, bytes uint64, err error) {
	c, err := Counters(ctx)
	if err != nil {
		return 0, 0, err
	}
	return c.SpoofedIPv4.Packets + c.SpoofedARP.Packets, c.SpoofedIPv4.Bytes + c.SpoofedARP.Bytes, nil
}

// Remove deletes the table with everything in it (for `netagent cleanup`); absent is fine.
func Remove(ctx context.Context) error {
	c, err := conn(ctx)
	if err != nil {
		return err
	}
	defer c.CloseLasting()
	c.DelTable(table)
	if err := c.Flush(); err != nil && !isAbsent(err) {
		return fmt.Errorf("remove table bridge %s: %w", Table, err)
	}
	return nil
}

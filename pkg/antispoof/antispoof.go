// Package antispoof lets a pod send only with its own IP addresses and MAC: frames that
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
//   - IPv6 and neighbour discovery checked the same way against @pods6 (see ipv6.go);
//
// every other frame from a pod is dropped and counted in one of five named counters:
// spoofed IPv4, spoofed ARP, spoofed IPv6, spoofed NDP, and none of these. Frames from other ports (the
// uplink, veths that are not ours) are not touched.
//
// A pod is then one set element: ADD adds it, DEL removes it, each one netlink
// transaction of one message. This is why a set and not per-pod chains or rules: a pod
// costs one hash-set element whatever the number of pods; a packet costs one hash lookup
// (two for ARP) whatever the number of pods; nothing is executed per pod (no nft or
// iptables process: netlink from the plugin itself, see nl.go); and a change to a base
// chain or its rules is far dearer: the kernel holds such a transaction for what looks
// like an RCU grace period, as it does one that removes an element (see cmd/cni-plugin's
// DEL for how that is hidden) but not one that adds an element.
//
// Who writes what: the plugin adds and removes elements; when its ADD finds no table or
// set (the first pod on a node, or after `nft flush ruleset`), it installs the whole rule
// set together with the entries of every pod in its address store, in one transaction, so
// a packet sees no rules or all of them and no existing pod is cut off. The agent keeps
// the set equal to the address stores and the rules as written (SyncDataDir), so an agent
// restart, a lost DEL, a flushed chain or an edited rule is repaired on its next pass; an
// element is removed only together with its address record, under the store's lock, which
// SyncDataDir holds too, so the two cannot race into a stale or a missing entry. A flushed
// ruleset loses protection until the next ADD or sync, not connectivity: with no table
// there is no rule to drop anything.
//
// What is covered: IPv4 and ARP from pods attached by netagent-cni (host veths named
// na<hash>), on every bridge of the node's network namespace. What is not:
//
//   - Every other ethertype from pods is dropped, and so is IPv6 from pods without an
//     IPv6 address (IPv4-only networks): unfiltered IPv6 would let a pod spoof link-local
//     traffic and send router advertisements to its neighbours. What breaks: pods
//     speaking raw Ethernet protocols or VLAN-tagged frames.
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
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/bridge"
	"github.com/netagent/netagent/pkg/nlattr"
)

// Names in the kernel, for operators and tests (`nft list table bridge netagent`).
const (
	Table = "netagent"
	Chain = "prerouting"
	Set   = "pods"

	CounterIPv4  = "spoofed-ipv4" // IPv4 with a source IP or MAC that is not the pod's
	CounterARP   = "spoofed-arp"  // ARP with a sender IP or MAC that is not the pod's, or not Ethernet/IPv4
	CounterOther = "not-ipv4"     // neither IPv4, ARP nor IPv6 (VLAN-tagged, other ethertypes); the name predates IPv6
)

// ErrNotInstalled means the table or set is not in the kernel (no pod was added yet, the
// agent has not synced, or someone removed it).
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

func (e Entry) equal(o Entry) bool {
	return e.HostVeth == o.HostVeth && e.IP == o.IP && string(e.MAC) == string(o.MAC)
}

func (e Entry) key() ([]byte, error) {
	if e.HostVeth == "" || len(e.HostVeth) >= ifnameLen {
		return nil, fmt.Errorf("entry %s: bad interface name %q", e, e.HostVeth)
	}
	if len(e.MAC) != 6 {
		return nil, fmt.Errorf("entry %s: not an Ethernet MAC", e)
	}
	if e.IP.Is6() {
		return e.key6()
	}
	if !e.IP.Is4() {
		return nil, fmt.Errorf("entry %s: not an IP address", e)
	}
	k := make([]byte, keyLen)
	copy(k, e.HostVeth)
	ip := e.IP.As4()
	copy(k[ifnameLen:], ip[:])
	copy(k[ifnameLen+4:], e.MAC)
	return k, nil
}

func entryFromKey(k []byte) (Entry, bool) {
	if len(k) == keyLen6 {
		return entryFromKey6(k), true
	}
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

func keys(entries []Entry) ([][]byte, error) {
	out := make([][]byte, 0, len(entries))
	for _, e := range entries {
		k, err := e.key()
		if err != nil {
			return nil, err
		}
		out = append(out, k)
	}
	return out, nil
}

// isAbsent reports whether err says the table, set or element does not exist, or that the
// kernel has no nftables at all.
func isAbsent(err error) bool {
	return errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.EPROTONOSUPPORT) || errors.Is(err, syscall.EAFNOSUPPORT)
}

// Add adds entries to the sets (a pod's: see EntriesFor): one transaction of one message
// per set. Adding an entry that is there is not an error. When the table or set is
// missing (the first pod on a node, or
// after `nft flush ruleset`) it returns ErrNotInstalled and changes nothing: the caller
// then installs the rule set with Install, together with the entries of the other pods it
// knows of, or a fresh rule set would cut them off.
//
// Add neither checks nor rewrites the chain: the kernel holds any transaction that changes
// a base chain or its rules for what looks like an RCU grace period, longer than the rest
// of an ADD. A chain flushed or edited by hand is repaired by Sync, which the agent runs.
func Add(ctx context.Context, entries ...Entry) error {
	ks, err := keys(entries)
	if err != nil || len(ks) == 0 {
		return err
	}
	c, err := dial(ctx)
	if err != nil {
		return err
	}
	defer c.close()
	err = c.transact(elementMsgs(unix.NFT_MSG_NEWSETELEM, ks))
	if errors.Is(err, syscall.ENOENT) {
		return ErrNotInstalled
	}
	if err != nil {
		return fmt.Errorf("add anti-spoofing entries %v: %w", entries, err)
	}
	return nil
}

// Install writes the rule set (table, chain and rules, set, counters) where it is missing
// or not as this package writes it, and adds entries, in one transaction, so a packet sees
// either the old state or all of the new one. It removes nothing.
func Install(ctx context.Context, entries []Entry) error {
	_, _, err := sync(ctx, func() []Entry { return entries }, false, nil)
	return err
}

// Delete removes entries; an entry (or table) that is not there is not an error, and
// neither is a kernel without nftables (there is nothing to remove).
func Delete(ctx context.Context, entries ...Entry) error {
	if len(entries) == 0 {
		return nil
	}
	ks, err := keys(entries)
	if err != nil {
		return err
	}
	c, err := dial(ctx)
	if isAbsent(err) {
		return nil
	}
	if err != nil {
		return err
	}
	defer c.close()
	err = c.transact(elementMsgs(unix.NFT_MSG_DELSETELEM, ks))
	if isAbsent(err) && len(ks) > 1 {
		// One missing element fails the whole transaction: remove them one by one.
		var errs []error
		for i, k := range ks {
			if err := c.transact(elementMsgs(unix.NFT_MSG_DELSETELEM, [][]byte{k})); err != nil && !isAbsent(err) {
				errs = append(errs, fmt.Errorf("delete anti-spoofing entry %s: %w", entries[i], err))
			}
		}
		return errors.Join(errs...)
	}
	if err != nil && !isAbsent(err) {
		return fmt.Errorf("delete anti-spoofing entries %v: %w", entries, err)
	}
	return nil
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
	c, err := dial(ctx)
	if err != nil {
		return nil, err
	}
	defer c.close()
	return list(c)
}

func list(c *conn) ([]Entry, error) {
	bodies, err := c.dump(unix.NFT_MSG_GETSETELEM, true, []attr{str(unix.NFTA_SET_ELEM_LIST_TABLE, Table), str(unix.NFTA_SET_ELEM_LIST_SET, Set)})
	if errors.Is(err, syscall.ENOENT) {
		return nil, ErrNotInstalled
	}
	if err != nil {
		return nil, fmt.Errorf("read set %s: %w", Set, err)
	}
	// A rule set from before IPv6 has no @pods6 (and is not intact: Install and Sync
	// rewrite it): it holds no IPv6 entries.
	b6, err := c.dump(unix.NFT_MSG_GETSETELEM, true, []attr{str(unix.NFTA_SET_ELEM_LIST_TABLE, Table), str(unix.NFTA_SET_ELEM_LIST_SET, Set6)})
	if err != nil && !errors.Is(err, syscall.ENOENT) {
		return nil, fmt.Errorf("read set %s: %w", Set6, err)
	}
	bodies = append(bodies, b6...)
	var out []Entry
	for _, b := range bodies {
		els, _ := nlattr.Get(nlattr.Parse(b), unix.NFTA_SET_ELEM_LIST_ELEMENTS)
		for _, el := range nlattr.Parse(els) {
			k, _ := nlattr.Get(nlattr.Parse(el.Data), unix.NFTA_SET_ELEM_KEY)
			v, _ := nlattr.Get(nlattr.Parse(k), unix.NFTA_DATA_VALUE)
			if e, ok := entryFromKey(v); ok {
				out = append(out, e)
			}
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

// Count is one counter's value.
type Count struct{ Packets, Bytes uint64 }

// Counts are the drop counters: frames from pods dropped, by kind.
type Counts struct {
	SpoofedIPv4 Count // IPv4 whose source IP or MAC is not the pod's
	SpoofedARP  Count // ARP whose sender IP or MAC is not the pod's, or not Ethernet/IPv4
	SpoofedIPv6 Count // IPv6 whose source IP or MAC is not the pod's (all IPv6 of a pod without IPv6)
	SpoofedNDP  Count // neighbour discovery with a foreign target or link-layer address, RA, redirect
	NotIPv4     Count // neither IPv4, ARP nor IPv6 (VLAN-tagged, ...): not spoofing as such
}

// Counters reads the drop counters; ErrNotInstalled when the table is absent.
func Counters(ctx context.Context) (Counts, error) {
	c, err := dial(ctx)
	if err != nil {
		return Counts{}, err
	}
	defer c.close()
	// The bridge table's counters and the routed pods' (routed.go), summed.
	bodies, err := c.dump(unix.NFT_MSG_GETOBJ, true, []attr{str(unix.NFTA_OBJ_TABLE, Table), u32(unix.NFTA_OBJ_TYPE, unix.NFT_OBJECT_COUNTER)})
	if err != nil && !isAbsent(err) {
		return Counts{}, fmt.Errorf("read counters: %w", err)
	}
	routed, err := c.dumpFam(unix.NFPROTO_NETDEV, unix.NFT_MSG_GETOBJ, true, []attr{str(unix.NFTA_OBJ_TABLE, RoutedTable), u32(unix.NFTA_OBJ_TYPE, unix.NFT_OBJECT_COUNTER)})
	if err != nil && !isAbsent(err) {
		return Counts{}, fmt.Errorf("read counters: %w", err)
	}
	var out Counts
	found := 0
	add := func(dst *Count, v Count) {
		dst.Packets, dst.Bytes, found = dst.Packets+v.Packets, dst.Bytes+v.Bytes, found+1
	}
	for _, b := range append(bodies, routed...) {
		as := nlattr.Parse(b)
		if t, _ := nlattr.Get(as, unix.NFTA_OBJ_TABLE); string(t) != Table+"\x00" {
			continue
		}
		name, _ := nlattr.Get(as, unix.NFTA_OBJ_NAME)
		data, _ := nlattr.Get(as, unix.NFTA_OBJ_DATA)
		d := nlattr.Parse(data)
		var v Count
		if p, ok := nlattr.Get(d, unix.NFTA_COUNTER_PACKETS); ok && len(p) == 8 {
			v.Packets = binary.BigEndian.Uint64(p)
		}
		if b, ok := nlattr.Get(d, unix.NFTA_COUNTER_BYTES); ok && len(b) == 8 {
			v.Bytes = binary.BigEndian.Uint64(b)
		}
		switch string(name) {
		case CounterIPv4 + "\x00":
			add(&out.SpoofedIPv4, v)
		case CounterARP + "\x00":
			add(&out.SpoofedARP, v)
		case CounterOther + "\x00":
			add(&out.NotIPv4, v)
		case CounterIPv6 + "\x00":
			add(&out.SpoofedIPv6, v)
		case CounterNDP + "\x00":
			add(&out.SpoofedNDP, v)
		}
	}
	if found == 0 {
		return Counts{}, ErrNotInstalled
	}
	return out, nil
}

// Dropped is the number of spoofed frames (IPv4, ARP, IPv6 and NDP) dropped so far, and
// their bytes.
func Dropped(ctx context.Context) (packets, bytes uint64, err error) {
	c, err := Counters(ctx)
	if err != nil {
		return 0, 0, err
	}
	for _, x := range []Count{c.SpoofedIPv4, c.SpoofedARP, c.SpoofedIPv6, c.SpoofedNDP} {
		packets, bytes = packets+x.Packets, bytes+x.Bytes
	}
	return packets, bytes, nil
}

// Remove deletes the tables (bridge, and the routed pods' netdev one) with everything in them (for `netagent cleanup`); absent is fine.
func Remove(ctx context.Context) error {
	c, err := dial(ctx)
	if isAbsent(err) {
		return nil
	}
	if err != nil {
		return err
	}
	defer c.close()
	err = c.transact([]msg{{typ: unix.NFT_MSG_DELTABLE, attrs: []attr{str(unix.NFTA_TABLE_NAME, Table)}}})
	if err != nil && !isAbsent(err) {
		return fmt.Errorf("remove table bridge %s: %w", Table, err)
	}
	err = c.transact([]msg{routedMsg(unix.NFT_MSG_DELTABLE, 0, str(unix.NFTA_TABLE_NAME, RoutedTable))})
	if err != nil && !isAbsent(err) {
		return fmt.Errorf("remove table netdev %s: %w", RoutedTable, err)
	}
	return nil
}

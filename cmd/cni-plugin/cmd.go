package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/antispoof"
	"github.com/netagent/netagent/pkg/bridge"
	"github.com/netagent/netagent/pkg/hostport"
	"github.com/netagent/netagent/pkg/ipam"
	"github.com/netagent/netagent/pkg/nldump"
	"github.com/netagent/netagent/pkg/subnetfile"
)

// extra is what the plugin keeps per attachment in the IPAM record, for DEL, CHECK and GC.
// Gateway and Prefix are the first family's (IPv4, or IPv6 for IPv6 only); Gateway6 and
// Prefix6 the IPv6 ones of a dual-stack attachment.
type extra struct {
	HostVeth string `json:"hostVeth"`
	Bridge   string `json:"bridge"`
	Gateway  string `json:"gateway,omitempty"`
	Prefix   int    `json:"prefix"`
	Gateway6 string `json:"gateway6,omitempty"`
	Prefix6  int    `json:"prefix6,omitempty"`
	MTU      int    `json:"mtu"`
	Ports    int    `json:"ports,omitempty"`
	Routed   bool   `json:"routed,omitempty"` // podInterface routed: no bridge (Bridge is empty)
}

// ErrAgentNotReady means the subnet file did not appear in time.
var errAgentNotReady = errors.New("netagent is not ready")

// pools resolves the address ranges, IPv4 first: IPv4 from the config, else from the
// agent's subnet file (waiting up to wait for it to appear), and IPv6 from the config. It
// also returns the agent's MTU (0 if unknown).
func (c *netConf) pools(wait time.Duration) ([]ipam.Range, int, error) {
	subnet := c.subnet
	agentMTU := 0
	if c.v4FromFile {
		info, err := readSubnetFile(c.SubnetFile, wait)
		if err != nil {
			return nil, 0, err
		}
		subnet, agentMTU = info.Subnet, info.MTU
		c.network = info.Network
	}
	var out []ipam.Range
	if subnet.IsValid() {
		r, err := ipam.NewRange(subnet, c.start, c.end, c.gw)
		if err != nil {
			return nil, 0, types.NewError(types.ErrInvalidNetworkConfig, "invalid address range", err.Error())
		}
		out = append(out, r)
	}
	if c.subnet6.IsValid() {
		r, err := ipam.NewRange(c.subnet6, netip.Addr{}, netip.Addr{}, c.gw6)
		if err != nil {
			return nil, 0, types.NewError(types.ErrInvalidNetworkConfig, "invalid IPv6 address range", err.Error())
		}
		out = append(out, r)
	}
	return out, agentMTU, nil
}

// ifAddr is one address of a pod interface and its gateway, for one family.
type ifAddr struct {
	addr netip.Prefix
	gw   netip.Addr
}

// pod is the wiring of an attachment with addrs (one or two, IPv4 first).
func pod(podNS netns.NsHandle, ifName, hostVeth string, addrs []ifAddr, defGW bool, mtu int, hairpin bool) bridge.Pod {
	p := bridge.Pod{NetnsFd: int(podNS), IfName: ifName, HostVeth: hostVeth, Addr: addrs[0].addr, MTU: mtu, Hairpin: hairpin}
	if defGW {
		p.Gateway = addrs[0].gw
	}
	if len(addrs) > 1 {
		p.Addr6 = addrs[1].addr
		if defGW {
			p.Gateway6 = addrs[1].gw
		}
	}
	return p
}

// gateway6 is the bridge's IPv6 gateway address of a dual-stack attachment (else invalid).
func gateway6(addrs []ifAddr) netip.Prefix {
	if len(addrs) < 2 {
		return netip.Prefix{}
	}
	return netip.PrefixFrom(addrs[1].gw, addrs[1].addr.Bits())
}

func readSubnetFile(path string, wait time.Duration) (subnetfile.Info, error) {
	deadline := time.Now().Add(wait)
	for {
		info, err := subnetfile.Read(path)
		if err == nil {
			return info, nil
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return subnetfile.Info{}, types.NewError(types.ErrInvalidNetworkConfig, "bad subnet file from netagent", err.Error())
		}
		if time.Now().After(deadline) {
			return subnetfile.Info{}, types.NewError(types.ErrTryAgainLater, errAgentNotReady.Error(),
				fmt.Sprintf("subnet file %s does not exist after waiting %s: is netagent running on this node? (or set \"subnet\" in the CNI config)", path, wait))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func openStore(c *netConf) (*ipam.Store, error) {
	s, err := ipam.Open(filepath.Join(c.DataDir, c.Name))
	if err != nil {
		return nil, cniError(types.ErrIOFailure, "open address store", err)
	}
	return s, nil
}

func checkIfName(name string) error {
	if err := bridge.ValidIfName(name); err != nil {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "invalid CNI_IFNAME", err.Error())
	}
	return nil
}

// undo collects rollback steps of a half-done ADD; run executes them newest first.
type undo []func() error

func (u *undo) push(f func() error) { *u = append(*u, f) }

func (u undo) run(cause error) error {
	errs := []error{cause}
	for i := len(u) - 1; i >= 0; i-- {
		if err := u[i](); err != nil {
			errs = append(errs, fmt.Errorf("rollback: %w", err))
		}
	}
	return errors.Join(errs...)
}

func cmdAdd(args *skel.CmdArgs) (err error) {
	c, err := parseConfig(args.StdinData)
	if err != nil {
		return err
	}
	if err := checkIfName(args.IfName); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	podNS, err := netns.GetFromPath(args.Netns)
	if err != nil {
		return types.NewError(types.ErrUnknownContainer, "open pod network namespace", fmt.Sprintf("%s: %v", args.Netns, err))
	}
	defer podNS.Close()

	store, err := openStore(c)
	if err != nil {
		return err
	}
	key := ipam.Key{ContainerID: args.ContainerID, IfName: args.IfName}
	x := extra{HostVeth: bridge.HostVethName(args.ContainerID, args.IfName), Bridge: c.Bridge, Ports: len(c.RuntimeConfig.PortMappings), Routed: c.routed}
	if c.routed {
		x.Bridge = ""
	}

	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	defer h.Close()
	if err := refuseLive(h, podNS, store, key, x.HostVeth); err != nil {
		return err
	}

	var rollback undo
	defer func() {
		// A panic after the address was taken would otherwise leave err nil and skip the
		// rollback (skel does not recover): turn it into an error so the address is freed.
		if p := recover(); p != nil {
			err = fmt.Errorf("panic: %v", p)
		}
		if err != nil {
			err = cniError(types.ErrInternal, "add pod network", rollback.run(err))
		}
	}()
	pn, err := bridge.OpenPodNS(podNS) // one visit to the pod's namespace for the whole ADD
	if err != nil {
		return err
	}
	defer pn.Close()

	// 1. The addresses: our own store, or the delegated IPAM plugin (recorded in our store
	// too, so DEL, CHECK and GC know the attachment).
	var addrs []ifAddr
	mtu := c.MTU
	var dns types.DNS = c.DNS
	if c.delegateIPAM {
		res, derr := invoke.DelegateAdd(ctx, c.IPAM.Type, args.StdinData, nil)
		if derr != nil {
			return derr
		}
		rollback.push(func() error { return invoke.DelegateDel(ctx, c.IPAM.Type, args.StdinData, nil) })
		// The delegate answers in the config's version (a 0.3.1 or 0.4.0 result for
		// flannel-era conflists): convert, never assert the type.
		ipamRes, cerr := current.NewResultFromResult(res)
		if cerr != nil {
			return types.NewError(types.ErrDecodingFailure, "convert IPAM result", cerr.Error())
		}
		addrs, err = fromIPAMResult(ipamRes)
		if err != nil {
			return err
		}
		if len(ipamRes.DNS.Nameservers) > 0 {
			dns = ipamRes.DNS
		}
		mtu = c.mtu(0)
		x.setAddrs(addrs, mtu)
		xb, _ := json.Marshal(x)
		rec := ipam.Record{Key: key, IP: addrs[0].addr.Addr(), Netns: args.Netns, Extra: xb}
		if len(addrs) > 1 {
			rec.IP6 = addrs[1].addr.Addr()
		}
		err = store.Update(func(tx *ipam.Tx) error { return tx.Put(rec) })
	} else {
		rngs, agentMTU, perr := c.pools(c.wait)
		if perr != nil {
			return perr
		}
		mtu = c.mtu(agentMTU)
		for _, r := range rngs {
			addrs = append(addrs, ifAddr{addr: netip.PrefixFrom(r.Subnet.Addr(), r.Subnet.Bits()), gw: r.Gateway})
		}
		x.setAddrs(addrs, mtu)
		xb, _ := json.Marshal(x)
		var rec ipam.Record
		err = store.Update(func(tx *ipam.Tx) error {
			var aerr error
			rec, aerr = tx.AllocateEach(rngs, key, ipam.Record{Netns: args.Netns, Extra: xb})
			if aerr == nil && string(rec.Extra) != string(xb) {
				tx.SetExtra(key, xb) // a repeated ADD: keep the newest facts
			}
			return aerr
		})
		if errors.Is(err, ipam.ErrExhausted) {
			return types.NewError(types.ErrTryAgainLater, "address pool exhausted", err.Error())
		}
		for i := range addrs {
			ip := rec.V4()
			if addrs[i].gw.Is6() {
				ip = rec.V6()
			}
			addrs[i].addr = netip.PrefixFrom(ip, addrs[i].addr.Bits())
		}
	}
	if err != nil {
		return cniError(types.ErrIOFailure, "record address", err)
	}
	ips := make([]netip.Addr, len(addrs))
	for i, a := range addrs {
		ips[i] = a.addr.Addr()
	}
	if c.routed {
		rollback.push(func() error { return release(ctx, store, key, nil) })
		return addRouted(ctx, h, c, args, podNS, pn, x, addrs, mtu, dns, &rollback)
	}
	spoof := antispoof.EntriesFor(x.HostVeth, ips...)
	rollback.push(func() error { return release(ctx, store, key, spoof) })

	// 2. The bridge and the veth.
	if err := enableForwarding(ips); err != nil {
		return err
	}
	br, err := bridge.Ensure(h, c.Bridge, netip.PrefixFrom(addrs[0].gw, addrs[0].addr.Bits()), mtu)
	if err != nil {
		return err
	}
	if gw6 := gateway6(addrs); gw6.IsValid() {
		if err := bridge.EnsureGateway(h, br, gw6); err != nil {
			return err
		}
	}
	wired, err := bridge.Add(h, br, pn, pod(podNS, args.IfName, x.HostVeth, addrs, c.defGW, mtu, c.hairpin))
	if err != nil {
		return err
	}
	rollback.push(func() error { return bridge.Del(h, x.HostVeth) })

	// 3. Anti-spoofing: the pod may send only from its own addresses and MAC. Undone by the
	// release above (the entries go with the addresses, under the store's lock).
	if err := antispoof.Add(ctx, spoof...); errors.Is(err, antispoof.ErrNotInstalled) {
		// The first pod on this node, or the table was removed (`nft flush ruleset`):
		// install the rule set with the entries of every pod recorded here, or a fresh
		// rule set would cut the others off until the agent's next sync.
		if err := store.View(func(tx *ipam.Tx) error {
			return antispoof.Install(ctx, antispoof.FromRecords(tx.Records()))
		}); err != nil {
			return err
		}
	} else if err != nil {
		return err
	}

	// 4. Host ports, only for pods that publish some, in each family the pod has.
	if err := addHostPorts(ctx, c, args, addrs, &rollback); err != nil {
		return err
	}

	// 5. Last, the host end goes up: from here on the attachment is live (see refuseLive).
	if err := bridge.Up(h, pn, wired, x.HostVeth, args.IfName); err != nil {
		return err
	}
	if err := bridge.Usable(pn, wired); err != nil {
		return err
	}

	return addResult{
		cniVersion: c.CNIVersion,
		bridge:     c.Bridge, bridgeMAC: br.Attrs().HardwareAddr.String(),
		hostVeth: x.HostVeth, hostMAC: wired.HostMAC.String(),
		ifName: args.IfName, podMAC: wired.PodMAC.String(), netns: args.Netns,
		addrs: addrs, defaultRoute: c.defGW, dns: dns,
	}.print()
}

// addRouted wires a routed pod (podInterface "routed"): steps 2 to 5 of cmdAdd without the
// bridge, with the pod's own anti-spoofing chain, and the node's routes to the pod last.
func addRouted(ctx context.Context, h *netlink.Handle, c *netConf, args *skel.CmdArgs, podNS netns.NsHandle, pn *bridge.PodNS, x extra, addrs []ifAddr, mtu int, dns types.DNS, rollback *undo) error {
	ips := addrsOf(addrs)
	if err := enableForwarding(ips); err != nil {
		return err
	}
	for _, a := range addrs {
		if !a.inSubnet() {
			continue // a delegated IPAM's host prefix: no node subnet to hold or refuse
		}
		if err := bridge.EnsureUnreachable(h, a.addr.Masked()); err != nil {
			return err
		}
		if err := bridge.EnsureNodeAddr(h, a.gw); err != nil {
			return err
		}
	}
	routed := routedAddrs(addrs)
	p := pod(podNS, args.IfName, x.HostVeth, routed, true, mtu, false)
	wired, err := bridge.AddRouted(h, pn, p)
	if err != nil {
		return err
	}
	rollback.push(func() error { return bridge.Del(h, x.HostVeth) })
	r := antispoof.Routed{HostVeth: x.HostVeth, IPs: ips}
	if err := antispoof.AddRouted(ctx, r); err != nil {
		return err
	}
	rollback.push(func() error { return antispoof.DeleteRouted(ctx, x.HostVeth) })
	if err := addHostPorts(ctx, c, args, addrs, rollback); err != nil {
		return err
	}
	if err := bridge.Up(h, pn, wired, x.HostVeth, args.IfName); err != nil {
		return err
	}
	if err := bridge.RouteRouted(h, wired, p); err != nil {
		return err
	}
	if err := bridge.Usable(pn, wired); err != nil {
		return err
	}
	return addResult{
		cniVersion: c.CNIVersion,
		hostVeth:   x.HostVeth, hostMAC: wired.HostMAC.String(),
		ifName: args.IfName, podMAC: wired.PodMAC.String(), netns: args.Netns,
		addrs: routed, defaultRoute: true, dns: dns,
	}.print()
}

// enableForwarding turns on forwarding for the families of ips (IPv4 first).
func enableForwarding(ips []netip.Addr) error {
	return bridge.EnsureForwarding(ips[len(ips)-1].Is6())
}

// addHostPorts publishes the pod's host ports (none for most pods) in each family it has;
// addrs carry the node subnet's prefix length (the masquerade of hairpin traffic uses it).
func addHostPorts(ctx context.Context, c *netConf, args *skel.CmdArgs, addrs []ifAddr, rollback *undo) error {
	if len(c.RuntimeConfig.PortMappings) == 0 {
		return nil
	}
	tag := hostport.Tag(args.ContainerID, args.IfName)
	for _, a := range addrs {
		t, err := hostport.NewFamily(hostport.DefaultLock, a.addr.Addr().Is6())
		if err != nil {
			return err
		}
		rollback.push(func() error { return t.Del(ctx, tag) })
		if err := t.Add(ctx, tag, a.addr.Addr(), a.addr.Masked(), c.RuntimeConfig.PortMappings); err != nil {
			return fmt.Errorf("host ports: %w", err)
		}
	}
	return nil
}

// inSubnet reports whether a is an address of a subnet with its gateway in it (not a host
// prefix a delegated IPAM plugin returned, whose derived "gateway" is merely the next
// address, maybe another pod's).
func (a ifAddr) inSubnet() bool {
	return a.addr.Bits() < a.addr.Addr().BitLen() && a.addr.Masked().Contains(a.gw) && a.gw != a.addr.Addr()
}

// routedAddrs are a routed pod's interface addresses: host prefixes, via the routed
// gateways.
func routedAddrs(addrs []ifAddr) []ifAddr {
	out := make([]ifAddr, len(addrs))
	for i, a := range addrs {
		gw := bridge.RoutedGateway4
		if a.addr.Addr().Is6() {
			gw = bridge.RoutedGateway6
		}
		out[i] = ifAddr{addr: netip.PrefixFrom(a.addr.Addr(), a.addr.Addr().BitLen()), gw: gw}
	}
	return out
}

// setAddrs records the addresses' prefix lengths and gateways and the MTU.
func (x *extra) setAddrs(addrs []ifAddr, mtu int) {
	x.Gateway, x.Prefix, x.MTU = addrs[0].gw.String(), addrs[0].addr.Bits(), mtu
	if len(addrs) > 1 {
		x.Gateway6, x.Prefix6 = addrs[1].gw.String(), addrs[1].addr.Bits()
	}
}

// gateways are the recorded gateways with their subnets' prefix lengths (those of an
// older record that are not there, left out).
func (x extra) gateways() []netip.Prefix {
	var out []netip.Prefix
	for _, g := range []struct {
		addr string
		bits int
	}{{x.Gateway, x.Prefix}, {x.Gateway6, x.Prefix6}} {
		if a, err := netip.ParseAddr(g.addr); err == nil && g.bits > 0 && g.bits < a.BitLen() {
			out = append(out, netip.PrefixFrom(a, g.bits))
		}
	}
	return out
}

// refuseLive fails an ADD of an attachment that is already live: the spec requires an
// error when the interface exists, and rebuilding it would break the pod's connections.
// An attachment an interrupted ADD left half-built is not live, and ADD rebuilds it.
func refuseLive(h *netlink.Handle, podNS netns.NsHandle, store *ipam.Store, key ipam.Key, hostVeth string) error {
	host, err := bridge.Lookup(h, hostVeth)
	if err != nil || host == nil {
		return err
	}
	var rec ipam.Record
	if err := store.View(func(tx *ipam.Tx) error { rec, _ = tx.Get(key); return nil }); err != nil {
		return cniError(types.ErrIOFailure, "read address store", err)
	}
	live, err := bridge.Live(h, podNS, host, key.IfName, rec.IP)
	if err != nil {
		return err
	}
	if live {
		return types.NewError(types.ErrInternal, "interface already exists",
			fmt.Sprintf("%s is live in the container (host veth %s, address %s): DEL it before adding it again", key.IfName, hostVeth, rec.IP))
	}
	return nil
}

// fromIPAMResult is the first IPv4 and the first IPv6 address of a result, IPv4 first, with
// their gateways (the subnet's first address when the result names none).
func fromIPAMResult(res *current.Result) ([]ifAddr, error) {
	var v4, v6 *ifAddr
	for _, ipc := range res.IPs {
		a, ok := netip.AddrFromSlice(ipc.Address.IP)
		if !ok {
			continue
		}
		a = a.Unmap()
		ones, bits := ipc.Address.Mask.Size()
		if bits != a.BitLen() && !(bits == 128 && a.Is4() && ones >= 96) {
			continue
		}
		if bits == 128 && a.Is4() {
			ones -= 96
		}
		p := netip.PrefixFrom(a, ones)
		gw, ok := netip.AddrFromSlice(ipc.Gateway)
		if !ok || gw.Unmap().Is4() != a.Is4() {
			gw = p.Masked().Addr().Next()
		}
		dst := &v4
		if a.Is6() {
			dst = &v6
		}
		if *dst == nil {
			*dst = &ifAddr{addr: p, gw: gw.Unmap()}
		}
	}
	var out []ifAddr
	for _, a := range []*ifAddr{v4, v6} {
		if a != nil {
			out = append(out, *a)
		}
	}
	if len(out) == 0 {
		return nil, errors.New("the result has no IP address")
	}
	return out, nil
}

// release undoes the address and the anti-spoofing entry of a failed ADD, together under
// the store's lock: the agent's antispoof.SyncDataDir holds that lock while it makes the
// set equal to the records, so it cannot see the record without the entry and put the
// entry back. A failure to remove the entry keeps the record, for the runtime's DEL.
func release(ctx context.Context, store *ipam.Store, key ipam.Key, spoof []antispoof.Entry) error {
	return store.Update(func(tx *ipam.Tx) error {
		if err := antispoof.Delete(ctx, spoof...); err != nil {
			return err
		}
		tx.Release(key)
		return nil
	})
}

func recordExtra(rec ipam.Record) extra {
	var x extra
	_ = json.Unmarshal(rec.Extra, &x)
	return x
}

func cmdDel(args *skel.CmdArgs) error {
	c, err := parseConfigForDel(args.StdinData)
	if err != nil {
		return err
	}
	if err := checkIfName(args.IfName); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	store, err := openStore(c)
	if err != nil {
		return err
	}
	key := ipam.Key{ContainerID: args.ContainerID, IfName: args.IfName}
	var rec ipam.Record
	var found bool
	if err := store.View(func(tx *ipam.Tx) error { rec, found = tx.Get(key); return nil }); err != nil {
		return cniError(types.ErrIOFailure, "read address store", err)
	}
	x := recordExtra(rec)
	if x.HostVeth == "" {
		x.HostVeth = bridge.HostVethName(args.ContainerID, args.IfName)
	}
	// Kernel state first, the address last: an address must not be handed out again while
	// a veth still carries it.
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	defer h.Close()
	// The host veth and the pod's anti-spoofing entry go at the same time: removing either
	// makes the kernel wait (an RCU grace period). Started just after the veth's removal,
	// the entry's wait overlaps the veth's and DEL takes as long as the veth alone; started
	// first or together, the veth's removal waits behind it (BENCHMARKS.md, CNI plugin).
	// The agent's sync may put the entry back before the address is released below; an
	// entry whose veth is gone matches no frame, and its next sync removes it.
	spoofDone := make(chan error, 1)
	go func() {
		time.Sleep(time.Millisecond)
		switch {
		case found && x.Routed:
			spoofDone <- antispoof.DeleteRouted(ctx, x.HostVeth)
		case found:
			spoofDone <- antispoof.Delete(ctx, antispoof.EntriesFor(x.HostVeth, rec.Addrs()...)...)
		default:
			// No record, so no address to name the entry by (a repeated DEL, or one after
			// a failed ADD), nor a mode: whatever entry or chain the host veth has.
			spoofDone <- errors.Join(antispoof.DeleteVeth(ctx, x.HostVeth), antispoof.DeleteRouted(ctx, x.HostVeth))
		}
	}()
	if err := bridge.Del(h, x.HostVeth); err != nil {
		<-spoofDone
		return err
	}
	if err := <-spoofDone; err != nil {
		return err
	}
	if found && x.Ports > 0 {
		for _, ip := range rec.Addrs() {
			t, err := hostport.NewFamily(hostport.DefaultLock, ip.Is6())
			if err != nil {
				return err
			}
			if err := t.Del(ctx, hostport.Tag(args.ContainerID, args.IfName)); err != nil {
				return fmt.Errorf("remove host ports: %w", err)
			}
		}
	}
	if c.delegateIPAM {
		if err := invoke.DelegateDel(ctx, c.IPAM.Type, args.StdinData, nil); err != nil {
			return err
		}
	}
	if !found {
		return nil
	}
	if err := store.Update(func(tx *ipam.Tx) error { tx.Release(key); return nil }); err != nil {
		return cniError(types.ErrIOFailure, "release address", err)
	}
	return nil
}

func cmdCheck(args *skel.CmdArgs) error {
	c, err := parseConfig(args.StdinData)
	if err != nil {
		return err
	}
	if err := checkIfName(args.IfName); err != nil {
		return err
	}
	if c.PrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "CHECK needs prevResult", "the runtime passed no previous result")
	}
	prev, err := current.NewResultFromResult(c.PrevResult)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, "decode prevResult", err.Error())
	}
	addrs, err := fromIPAMResult(prev)
	if err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "prevResult has no address", err.Error())
	}
	if c.delegateIPAM {
		if err := invoke.DelegateCheck(context.Background(), c.IPAM.Type, args.StdinData, nil); err != nil {
			return err
		}
	}
	store, err := openStore(c)
	if err != nil {
		return err
	}
	key := ipam.Key{ContainerID: args.ContainerID, IfName: args.IfName}
	var rec ipam.Record
	var found bool
	if err := store.View(func(tx *ipam.Tx) error { rec, found = tx.Get(key); return nil }); err != nil {
		return cniError(types.ErrIOFailure, "read address store", err)
	}
	if !found {
		return fmt.Errorf("no address is recorded for %s", key)
	}
	if got, want := rec.Addrs(), addrsOf(addrs); !slices.Equal(got, want) {
		return fmt.Errorf("recorded addresses %v differ from the previous result's %v", got, want)
	}
	x := recordExtra(rec)
	podNS, err := netns.GetFromPath(args.Netns)
	if err != nil {
		return types.NewError(types.ErrUnknownContainer, "open pod network namespace", fmt.Sprintf("%s: %v", args.Netns, err))
	}
	defer podNS.Close()
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	defer h.Close()
	if x.Routed {
		p := pod(podNS, args.IfName, x.HostVeth, routedAddrs(addrs), true, x.MTU, false)
		if err := bridge.CheckRouted(h, p); err != nil {
			return fmt.Errorf("check %s: %w", key, err)
		}
		for _, gw := range x.gateways() {
			if err := bridge.CheckRoutedNode(h, gw); err != nil {
				return fmt.Errorf("check %s: %w", key, err)
			}
		}
		if ok, err := antispoof.RoutedIntact(context.Background(), antispoof.Routed{HostVeth: x.HostVeth, IPs: rec.Addrs()}); err != nil {
			return fmt.Errorf("check %s: %w", key, err)
		} else if !ok {
			return fmt.Errorf("check %s: anti-spoofing chain %s of table netdev %s is missing or not as written", key, x.HostVeth, antispoof.RoutedTable)
		}
	} else {
		p := pod(podNS, args.IfName, x.HostVeth, addrs, c.defGW, x.MTU, false)
		if err := bridge.Check(h, c.Bridge, netip.PrefixFrom(addrs[0].gw, addrs[0].addr.Bits()), gateway6(addrs), p); err != nil {
			return fmt.Errorf("check %s: %w", key, err)
		}
	}
	for _, e := range bridgeEntries(x, rec) {
		if ok, err := antispoof.Has(context.Background(), e); err != nil {
			return fmt.Errorf("check %s: %w", key, err)
		} else if !ok {
			return fmt.Errorf("check %s: anti-spoofing entry (%s) is missing from bridge table %s", key, e, antispoof.Table)
		}
	}
	if x.Ports > 0 {
		for _, ip := range rec.Addrs() {
			t, err := hostport.NewFamily(hostport.DefaultLock, ip.Is6())
			if err != nil {
				return err
			}
			tags, err := t.Tags()
			if err != nil {
				return err
			}
			if !slices.Contains(tags, hostport.Tag(args.ContainerID, args.IfName)) {
				return fmt.Errorf("check %s: %s host port rules are missing from %s", key, t.Family(), hostport.Chain)
			}
		}
	}
	return nil
}

// bridgeEntries are the bridge anti-spoofing entries of a bridged attachment (none for a
// routed one, which has its own chain).
func bridgeEntries(x extra, rec ipam.Record) []antispoof.Entry {
	if x.Routed {
		return nil
	}
	return antispoof.EntriesFor(x.HostVeth, rec.Addrs()...)
}

func addrsOf(addrs []ifAddr) []netip.Addr {
	out := make([]netip.Addr, len(addrs))
	for i, a := range addrs {
		out[i] = a.addr.Addr()
	}
	return out
}

func cmdGC(args *skel.CmdArgs) error {
	c, err := parseConfig(args.StdinData)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	valid := map[ipam.Key]bool{}
	validVeth := map[string]bool{}
	for _, a := range c.ValidAttachments {
		valid[ipam.Key{ContainerID: a.ContainerID, IfName: a.IfName}] = true
		validVeth[bridge.HostVethName(a.ContainerID, a.IfName)] = true
	}
	store, err := openStore(c)
	if err != nil {
		return err
	}
	var stale []ipam.Record
	want := map[string][]antispoof.Entry{} // the anti-spoofing entries of each valid attachment, by host veth
	if err := store.View(func(tx *ipam.Tx) error {
		for _, r := range tx.Records() {
			if !valid[r.Key] {
				stale = append(stale, r)
				continue
			}
			want[recordVeth(r)] = antispoof.EntriesFor(recordVeth(r), r.Addrs()...)
		}
		return nil
	}); err != nil {
		return cniError(types.ErrIOFailure, "read address store", err)
	}
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	defer h.Close()
	var errs []error
	released := map[ipam.Key][]antispoof.Entry{}
	for _, r := range stale {
		veth := recordVeth(r)
		if err := bridge.Del(h, veth); err != nil {
			errs = append(errs, err)
			continue
		}
		if recordExtra(r).Routed {
			if err := antispoof.DeleteRouted(ctx, veth); err != nil {
				errs = append(errs, err)
				continue
			}
		}
		if c.delegateIPAM {
			// The delegate's GC may do nothing (host-local's does not): release the
			// attachment there by the DEL the runtime would have sent.
			if err := delegateDelFor(ctx, c.IPAM.Type, args.StdinData, r); err != nil {
				errs = append(errs, err)
				continue
			}
		}
		released[r.Key] = antispoof.EntriesFor(veth, r.Addrs()...)
	}
	// Veths on our bridge that no valid attachment owns (an ADD killed before it recorded
	// anything cannot leave one: the address is recorded first, but be thorough).
	veths, err := bridge.Veths(h, c.Bridge)
	if err != nil {
		errs = append(errs, err)
	}
	for _, v := range veths {
		if len(v) == len(bridge.HostVethName("", "")) && v[:len(bridge.HostVethPrefix)] == bridge.HostVethPrefix && !validVeth[v] {
			if err := bridge.Del(h, v); err != nil {
				errs = append(errs, err)
			}
		}
	}
	for _, v6 := range []bool{false, true} {
		if t, err := hostport.NewFamily(hostport.DefaultLock, v6); err == nil {
			if _, err := t.Retain(ctx, func(tag string) bool {
				id, ifn, ok := hostport.ParseTag(tag)
				return ok && valid[ipam.Key{ContainerID: id, IfName: ifn}]
			}); err != nil {
				errs = append(errs, err)
			}
		} else if len(stale) > 0 && (!v6 || c.subnet6.IsValid()) {
			errs = append(errs, err)
		}
	}
	if len(released) > 0 {
		// Entries and addresses go together under the store's lock (see release).
		if err := store.Update(func(tx *ipam.Tx) error {
			var all []antispoof.Entry
			for _, es := range released {
				all = append(all, es...)
			}
			if err := antispoof.Delete(ctx, all...); err != nil {
				return err
			}
			for k := range released {
				tx.Release(k)
			}
			return nil
		}); err != nil {
			errs = append(errs, err)
		}
	}
	if err := gcEntries(ctx, h, c.Bridge, want); err != nil {
		errs = append(errs, err)
	}
	if err := gcRoutedChains(ctx, h, validVeth); err != nil {
		errs = append(errs, err)
	}
	if c.delegateIPAM {
		if err := invoke.DelegateGC(ctx, c.IPAM.Type, args.StdinData, nil); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return cniError(types.ErrInternal, "garbage collection incomplete", err)
	}
	return nil
}

// delegateDelFor runs the delegated IPAM plugin's DEL for the attachment of record r (not
// the one in this process's environment, which GC does not have).
func delegateDelFor(ctx context.Context, plugin string, stdin []byte, r ipam.Record) error {
	path, err := invoke.FindInPath(plugin, filepath.SplitList(os.Getenv("CNI_PATH")))
	if err != nil {
		return fmt.Errorf("find IPAM plugin %s: %w", plugin, err)
	}
	a := &invoke.Args{Command: "DEL", ContainerID: r.ContainerID, NetNS: r.Netns, IfName: r.IfName, Path: os.Getenv("CNI_PATH")}
	if err := invoke.ExecPluginWithoutResult(ctx, path, stdin, a, nil); err != nil {
		return fmt.Errorf("release %s in IPAM plugin %s: %w", r.Key, plugin, err)
	}
	return nil
}

// recordVeth is the host veth of a record: as recorded, else as derived from its key.
func recordVeth(r ipam.Record) string {
	if x := recordExtra(r); x.HostVeth != "" {
		return x.HostVeth
	}
	return bridge.HostVethName(r.ContainerID, r.IfName)
}

// gcEntries removes anti-spoofing entries that no valid attachment of this network owns:
// an entry of a valid attachment's veth that is not one of its entries (an old address),
// and an entry of any other veth that is gone or sits on this network's bridge. Entries of
// veths on other bridges belong to other networks, whose GC is not ours.
func gcEntries(ctx context.Context, h *netlink.Handle, bridgeName string, want map[string][]antispoof.Entry) error {
	entries, err := antispoof.List(ctx)
	if errors.Is(err, antispoof.ErrNotInstalled) {
		return nil
	}
	if err != nil {
		return err
	}
	links, err := nldump.Retry(h.LinkList)
	if err != nil {
		return fmt.Errorf("list links: %w", err)
	}
	master := map[string]int{}
	brIndex := -1
	for _, l := range links {
		master[l.Attrs().Name] = l.Attrs().MasterIndex
		if l.Attrs().Name == bridgeName {
			brIndex = l.Attrs().Index
		}
	}
	var drop []antispoof.Entry
	for _, e := range entries {
		if w, ok := want[e.HostVeth]; ok {
			if !slices.ContainsFunc(w, func(w antispoof.Entry) bool { return w.String() == e.String() }) {
				drop = append(drop, e)
			}
			continue
		}
		if m, exists := master[e.HostVeth]; !exists || m == brIndex {
			drop = append(drop, e)
		}
	}
	return antispoof.Delete(ctx, drop...)
}

// gcRoutedChains removes the routed pods' anti-spoofing chains whose host veth is gone and
// that no valid attachment owns (an ADD or DEL interrupted between the veth and the chain).
// A chain whose veth exists and is not ours may be another network's: its GC decides.
func gcRoutedChains(ctx context.Context, h *netlink.Handle, validVeth map[string]bool) error {
	chains, err := antispoof.RoutedChains(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, ch := range chains {
		if validVeth[ch] {
			continue
		}
		if l, err := bridge.Lookup(h, ch); err != nil || l != nil {
			continue
		}
		if err := antispoof.DeleteRouted(ctx, ch); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func cmdStatus(args *skel.CmdArgs) error {
	c, err := parseConfig(args.StdinData)
	if err != nil {
		return err
	}
	notReady := func(why string) error { return types.NewError(50, "plugin not available", why) }
	if c.delegateIPAM {
		if err := invoke.DelegateStatus(context.Background(), c.IPAM.Type, args.StdinData, nil); err != nil {
			return err
		}
	}
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return notReady(fmt.Sprintf("netlink: %v", err))
	}
	defer h.Close()
	if !c.routed {
		if err := bridge.Status(h, c.Bridge); err != nil {
			return notReady(err.Error())
		}
	}
	if c.delegateIPAM {
		return nil
	}
	rngs, _, err := c.pools(0)
	if err != nil {
		return notReady(err.Error())
	}
	store, err := openStore(c)
	if err != nil {
		return notReady(err.Error())
	}
	var exhausted string
	if err := store.View(func(tx *ipam.Tx) error {
		for _, r := range rngs {
			if used := tx.Used(r); used >= r.Size() && exhausted == "" {
				exhausted = fmt.Sprintf("address pool %s-%s is exhausted (%d of %d in use)", r.Start, r.End, used, r.Size())
			}
		}
		return nil
	}); err != nil {
		return notReady(err.Error())
	}
	if exhausted != "" {
		return notReady(exhausted)
	}
	return nil
}

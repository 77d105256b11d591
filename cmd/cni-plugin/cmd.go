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
type extra struct {
	HostVeth string `json:"hostVeth"`
	Bridge   string `json:"bridge"`
	Gateway  string `json:"gateway,omitempty"`
	Prefix   int    `json:"prefix"`
	MTU      int    `json:"mtu"`
	Ports    int    `json:"ports,omitempty"`
}

// ErrAgentNotReady means the subnet file did not appear in time.
var errAgentNotReady = errors.New("netagent is not ready")

// pool resolves the address range: from the config, else from the agent's subnet file
// (waiting up to wait for it to appear). It also returns the agent's MTU (0 if unknown).
func (c *netConf) pool(wait time.Duration) (ipam.Range, int, error) {
	subnet := c.subnet
	agentMTU := 0
	if !subnet.IsValid() {
		info, err := readSubnetFile(c.SubnetFile, wait)
		if err != nil {
			return ipam.Range{}, 0, err
		}
		subnet, agentMTU = info.Subnet, info.MTU
		c.network = info.Network
	}
	r, err := ipam.NewRange(subnet, c.start, c.end, c.gw)
	if err != nil {
		return ipam.Range{}, 0, types.NewError(types.ErrInvalidNetworkConfig, "invalid address range", err.Error())
	}
	return r, agentMTU, nil
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
	x := extra{HostVeth: bridge.HostVethName(args.ContainerID, args.IfName), Bridge: c.Bridge, Ports: len(c.RuntimeConfig.PortMappings)}

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

	// 1. An address: our own store, or the delegated IPAM plugin (recorded in our store
	// too, so DEL, CHECK and GC know the attachment).
	var addr netip.Prefix
	var gw netip.Addr
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
		addr, gw, err = fromIPAMResult(ipamRes)
		if err != nil {
			return err
		}
		if len(ipamRes.DNS.Nameservers) > 0 {
			dns = ipamRes.DNS
		}
		mtu = c.mtu(0)
		x.Gateway, x.Prefix, x.MTU = gw.String(), addr.Bits(), mtu
		xb, _ := json.Marshal(x)
		err = store.Update(func(tx *ipam.Tx) error {
			return tx.Put(ipam.Record{Key: key, IP: addr.Addr(), Netns: args.Netns, Extra: xb})
		})
	} else {
		rng, agentMTU, perr := c.pool(c.wait)
		if perr != nil {
			return perr
		}
		mtu = c.mtu(agentMTU)
		gw = rng.Gateway
		x.Gateway, x.Prefix, x.MTU = gw.String(), rng.Subnet.Bits(), mtu
		xb, _ := json.Marshal(x)
		var rec ipam.Record
		err = store.Update(func(tx *ipam.Tx) error {
			var aerr error
			rec, aerr = tx.Allocate(rng, key, ipam.Record{Netns: args.Netns, Extra: xb})
			if aerr == nil && string(rec.Extra) != string(xb) {
				tx.SetExtra(key, xb) // a repeated ADD: keep the newest facts
			}
			return aerr
		})
		if errors.Is(err, ipam.ErrExhausted) {
			return types.NewError(types.ErrTryAgainLater, "address pool exhausted", err.Error())
		}
		addr = netip.PrefixFrom(rec.IP, rng.Subnet.Bits())
	}
	if err != nil {
		return cniError(types.ErrIOFailure, "record address", err)
	}
	entry := antispoof.EntryFor(x.HostVeth, addr.Addr())
	rollback.push(func() error { return release(ctx, store, key, entry) })

	// 2. The bridge and the veth.
	if err := bridge.EnableForwarding(); err != nil {
		return err
	}
	gwPrefix := netip.PrefixFrom(gw, addr.Bits())
	br, err := bridge.Ensure(h, c.Bridge, gwPrefix, mtu)
	if err != nil {
		return err
	}
	routeGW := netip.Addr{}
	if c.defGW {
		routeGW = gw
	}
	wired, err := bridge.Add(h, br, bridge.Pod{
		NetnsFd: int(podNS), IfName: args.IfName, HostVeth: x.HostVeth,
		Addr: addr, Gateway: routeGW, MTU: mtu, Hairpin: c.hairpin,
	})
	if err != nil {
		return err
	}
	rollback.push(func() error { return bridge.Del(h, x.HostVeth) })

	// 3. Anti-spoofing: the pod may send only from its own address and MAC. Undone by the
	// release above (the entry goes with the address, under the store's lock).
	if err := antispoof.Add(ctx, entry); errors.Is(err, antispoof.ErrNotInstalled) {
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

	// 4. Host ports, only for pods that publish some.
	if len(c.RuntimeConfig.PortMappings) > 0 {
		t, err := hostport.New(hostport.DefaultLock)
		if err != nil {
			return err
		}
		tag := hostport.Tag(args.ContainerID, args.IfName)
		rollback.push(func() error { return t.Del(ctx, tag) })
		if err := t.Add(ctx, tag, addr.Addr(), addr.Masked(), c.RuntimeConfig.PortMappings); err != nil {
			return fmt.Errorf("host ports: %w", err)
		}
	}

	// 5. Last, the host end goes up: from here on the attachment is live (see refuseLive).
	if err := bridge.Up(h, podNS, wired, x.HostVeth, args.IfName); err != nil {
		return err
	}

	return addResult{
		cniVersion: c.CNIVersion,
		bridge:     c.Bridge, bridgeMAC: br.Attrs().HardwareAddr.String(),
		hostVeth: x.HostVeth, hostMAC: wired.HostMAC.String(),
		ifName: args.IfName, podMAC: wired.PodMAC.String(), netns: args.Netns,
		addr: addr, gw: gw, defaultRoute: c.defGW, dns: dns,
	}.print()
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

// fromIPAMResult is the first IPv4 address of a result and its gateway (the subnet's
// first address when the result names none).
func fromIPAMResult(res *current.Result) (netip.Prefix, netip.Addr, error) {
	for _, ipc := range res.IPs {
		a, ok := netip.AddrFromSlice(ipc.Address.IP)
		if !ok || !a.Unmap().Is4() {
			continue
		}
		a = a.Unmap()
		ones, _ := ipc.Address.Mask.Size()
		p := netip.PrefixFrom(a, ones)
		gw, ok := netip.AddrFromSlice(ipc.Gateway)
		if !ok {
			gw = p.Masked().Addr().Next()
		}
		return p, gw.Unmap(), nil
	}
	return netip.Prefix{}, netip.Addr{}, errors.New("IPAM plugin returned no IPv4 address")
}

// release undoes the address and the anti-spoofing entry of a failed ADD, together under
// the store's lock: the agent's antispoof.SyncDataDir holds that lock while it makes the
// set equal to the records, so it cannot see the record without the entry and put the
// entry back. A failure to remove the entry keeps the record, for the runtime's DEL.
func release(ctx context.Context, store *ipam.Store, key ipam.Key, entry antispoof.Entry) error {
	return store.Update(func(tx *ipam.Tx) error {
		if err := antispoof.Delete(ctx, entry); err != nil {
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
		if found {
			spoofDone <- antispoof.Delete(ctx, antispoof.EntryFor(x.HostVeth, rec.IP))
		} else {
			// No record, so no address to name the entry by (a repeated DEL, or one after
			// a failed ADD): whatever entry the host veth has.
			spoofDone <- antispoof.DeleteVeth(ctx, x.HostVeth)
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
		t, err := hostport.New(hostport.DefaultLock)
		if err != nil {
			return err
		}
		if err := t.Del(ctx, hostport.Tag(args.ContainerID, args.IfName)); err != nil {
			return fmt.Errorf("remove host ports: %w", err)
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
	addr, gw, err := fromIPAMResult(prev)
	if err != nil {
		return err
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
	if rec.IP != addr.Addr() {
		return fmt.Errorf("recorded address %s differs from the previous result's %s", rec.IP, addr.Addr())
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
	routeGW := netip.Addr{}
	if c.defGW {
		routeGW = gw
	}
	if err := bridge.Check(h, c.Bridge, netip.PrefixFrom(gw, addr.Bits()), bridge.Pod{
		NetnsFd: int(podNS), IfName: args.IfName, HostVeth: x.HostVeth,
		Addr: addr, Gateway: routeGW, MTU: x.MTU,
	}); err != nil {
		return fmt.Errorf("check %s: %w", key, err)
	}
	entry := antispoof.EntryFor(x.HostVeth, rec.IP)
	if ok, err := antispoof.Has(context.Background(), entry); err != nil {
		return fmt.Errorf("check %s: %w", key, err)
	} else if !ok {
		return fmt.Errorf("check %s: anti-spoofing entry (%s) is missing from set %s of bridge table %s", key, entry, antispoof.Set, antispoof.Table)
	}
	if x.Ports > 0 {
		t, err := hostport.New(hostport.DefaultLock)
		if err != nil {
			return err
		}
		tags, err := t.Tags()
		if err != nil {
			return err
		}
		want := hostport.Tag(args.ContainerID, args.IfName)
		for _, tag := range tags {
			if tag == want {
				return nil
			}
		}
		return fmt.Errorf("check %s: host port rules are missing from %s", key, hostport.Chain)
	}
	return nil
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
	want := map[string]antispoof.Entry{} // the anti-spoofing entry of each valid attachment, by host veth
	if err := store.View(func(tx *ipam.Tx) error {
		for _, r := range tx.Records() {
			if !valid[r.Key] {
				stale = append(stale, r)
				continue
			}
			e := antispoof.EntryFor(recordVeth(r), r.IP)
			want[e.HostVeth] = e
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
	released := map[ipam.Key]antispoof.Entry{}
	for _, r := range stale {
		veth := recordVeth(r)
		if err := bridge.Del(h, veth); err != nil {
			errs = append(errs, err)
			continue
		}
		if c.delegateIPAM {
			// The delegate's GC may do nothing (host-local's does not): release the
			// attachment there by the DEL the runtime would have sent.
			if err := delegateDelFor(ctx, c.IPAM.Type, args.StdinData, r); err != nil {
				errs = append(errs, err)
				continue
			}
		}
		released[r.Key] = antispoof.EntryFor(veth, r.IP)
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
	if t, err := hostport.New(hostport.DefaultLock); err == nil {
		if _, err := t.Retain(ctx, func(tag string) bool {
			id, ifn, ok := hostport.ParseTag(tag)
			return ok && valid[ipam.Key{ContainerID: id, IfName: ifn}]
		}); err != nil {
			errs = append(errs, err)
		}
	} else if len(stale) > 0 {
		errs = append(errs, err)
	}
	if len(released) > 0 {
		// Entries and addresses go together under the store's lock (see release).
		if err := store.Update(func(tx *ipam.Tx) error {
			var entries []antispoof.Entry
			for _, e := range released {
				entries = append(entries, e)
			}
			if err := antispoof.Delete(ctx, entries...); err != nil {
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
// an entry of a valid attachment's veth that is not its entry (an old address), and an
// entry of any other veth that is gone or sits on this network's bridge. Entries of veths
// on other bridges belong to other networks, whose GC is not ours.
func gcEntries(ctx context.Context, h *netlink.Handle, bridgeName string, want map[string]antispoof.Entry) error {
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
			if w.String() != e.String() {
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
	if err := bridge.Status(h, c.Bridge); err != nil {
		return notReady(err.Error())
	}
	if c.delegateIPAM {
		return nil
	}
	rng, _, err := c.pool(0)
	if err != nil {
		return notReady(err.Error())
	}
	store, err := openStore(c)
	if err != nil {
		return notReady(err.Error())
	}
	var used int
	if err := store.View(func(tx *ipam.Tx) error { used = tx.Used(rng); return nil }); err != nil {
		return notReady(err.Error())
	}
	if used >= rng.Size() {
		return notReady(fmt.Sprintf("address pool %s-%s is exhausted (%d of %d in use)", rng.Start, rng.End, used, rng.Size()))
	}
	return nil
}

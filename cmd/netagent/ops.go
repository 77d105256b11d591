package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	iofs "io/fs"
	"log/slog"
	"maps"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/netagent/netagent/pkg/agent"
	"github.com/netagent/netagent/pkg/antispoof"
	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/doctor"
	"github.com/netagent/netagent/pkg/lease/etcdstore"
	"github.com/netagent/netagent/pkg/nat"
	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/pkg/route"
	"github.com/netagent/netagent/pkg/subnetfile"
	"github.com/netagent/netagent/pkg/vxguard"
	"github.com/netagent/netagent/pkg/vxlan"
	"github.com/netagent/netagent/pkg/wgguard"
)

func cmdConfig(ctx context.Context, args []string, stdout io.Writer) error {
	const usage = "usage: netagent config get|set [flags]\n\n  get  print the network config stored in etcd\n  set  validate and store a network config (flags, or --file)\n\nRun `netagent config set -h` for the flags."
	if len(args) > 0 && isHelp(args[0]) {
		_, err := fmt.Fprintln(stdout, usage)
		return err
	}
	if len(args) == 0 || (args[0] != "get" && args[0] != "set") {
		return errors.New(usage)
	}
	fs := flag.NewFlagSet("config "+args[0], flag.ContinueOnError)
	var ef etcdFlags
	ef.register(fs)
	file := fs.String("file", "", "set: read the whole config from this JSON file ('-' for stdin)")
	network := fs.String("network", "", "set: cluster pod network, e.g. 10.244.0.0/16")
	subnetLen := fs.Int("subnet-len", 0, "set: prefix length of each node's subnet (default 24)")
	subnetMin := fs.String("subnet-min", "", "set: first subnet to hand out")
	subnetMax := fs.String("subnet-max", "", "set: last subnet to hand out")
	backend := fs.String("backend", "", "set: host-gw, vxlan, hybrid or wireguard (default vxlan)")
	vni := fs.Int("vni", 0, "set: VXLAN network identifier (default 1)")
	port := fs.Int("port", 0, "set: VXLAN UDP port (default 8472), or WireGuard's listen port (default 51820)")
	psk := fs.String("psk-file", "", "set: wireguard: a pre-shared key file (base64, mode 0600 or 0400) at this path on every node")
	mtu := fs.Int("mtu", 0, "set: pod MTU override (default: derived from the underlay)")
	network6 := fs.String("ipv6-network", "", "set: cluster IPv6 pod network, e.g. fd00:10:244::/48 (with --network: dual-stack; alone: IPv6-only)")
	subnetLen6 := fs.Int("ipv6-subnet-len", 0, "set: prefix length of each node's IPv6 subnet (default 64)")
	masq6 := fs.Bool("ipv6-masquerade", true, "set: masquerade IPv6 pod egress (false for a routable IPv6 prefix)")
	group(fs, "Network config (set)", "file", "network", "subnet-len", "subnet-min", "subnet-max", "backend", "vni", "port", "psk-file", "mtu",
		"ipv6-network", "ipv6-subnet-len", "ipv6-masquerade")
	group(fs, "etcd", etcdFlagNames...)
	if err := parse(fs, args[1:]); err != nil {
		return err
	}
	cli, err := ef.client()
	if err != nil {
		return err
	}
	defer cli.Close()
	st := ef.store(cli, time.Minute, nil)
	ctx, cancel := context.WithTimeout(ctx, oneShot)
	defer cancel()
	if args[0] == "get" {
		n, _, err := st.Config(ctx)
		if err != nil {
			return ef.explain(ctx, err)
		}
		b, _ := json.MarshalIndent(n, "", "  ")
		_, err = fmt.Fprintf(stdout, "%s\n", b)
		return err
	}
	var raw []byte
	switch *file {
	case "":
		m := map[string]any{"network": *network, "backend": map[string]any{"type": *backend}}
		if *subnetLen != 0 {
			m["subnetLen"] = *subnetLen
		}
		if *subnetMin != "" {
			m["subnetMin"] = *subnetMin
		}
		if *subnetMax != "" {
			m["subnetMax"] = *subnetMax
		}
		b := m["backend"].(map[string]any)
		if set(fs, "vni") { // given as 0 it is rejected, not taken for the default
			b["vni"] = *vni
		}
		if set(fs, "port") {
			b["port"] = *port
		}
		if *psk != "" {
			b["pskFile"] = *psk
		}
		if *mtu != 0 {
			m["mtu"] = *mtu
		}
		if *network6 != "" {
			m["ipv6Network"] = *network6
		}
		if *subnetLen6 != 0 {
			m["ipv6SubnetLen"] = *subnetLen6
		}
		if set(fs, "ipv6-masquerade") {
			m["ipv6Masquerade"] = *masq6
		}
		raw, _ = json.Marshal(m)
	case "-":
		if raw, err = io.ReadAll(os.Stdin); err != nil {
			return err
		}
	default:
		if raw, err = os.ReadFile(*file); err != nil {
			return err
		}
	}
	n, err := config.Parse(raw)
	if err != nil {
		return fmt.Errorf("invalid config: %w", err)
	}
	if err := st.SetConfig(ctx, n); err != nil {
		return ef.explain(ctx, err)
	}
	b, _ := json.MarshalIndent(n, "", "  ")
	_, err = fmt.Fprintf(stdout, "%s\n", b)
	return err
}

func cmdStatus(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	addr := fs.String("addr", "127.0.0.1:9476", "the agent's --listen address")
	asJSON := fs.Bool("json", false, "print JSON")
	cniConfDir := fs.String("cni-conf-dir", "/etc/cni/net.d", "CNI config directory, read for the node's IPv6 pod subnet (empty: skip)")
	if err := parse(fs, args); err != nil {
		return err
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+*addr+"/status", nil)
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		return fmt.Errorf("ask the agent at %s: %w (is `netagent run` running in this network namespace?)", *addr, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("agent: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	if *asJSON {
		_, err = stdout.Write(body)
		return err
	}
	var st agent.Status
	if err := json.Unmarshal(body, &st); err != nil {
		return err
	}
	return printStatus(stdout, st, cniIPv6(*cniConfDir))
}

// cniIPv6 describes the IPv6 pod subnet that the node's CNI config gives netagent-cni, ""
// when there is none (an IPv4-only network, or no netagent config to read).
func cniIPv6(dir string) string {
	if dir == "" {
		return ""
	}
	c, err := doctor.ReadCNIConfig(dir)
	if err != nil || !c.Netagent || c.IPv6Subnet == "" {
		return ""
	}
	return fmt.Sprintf("IPv6 subnet %s (from %s)", c.IPv6Subnet, c.Path)
}

// printStatus prints the agent's status; ipv6 is a line on the node's IPv6 pod subnet
// ("" for none).
func printStatus(w io.Writer, st agent.Status, ipv6 string) error {
	ready := "no"
	if st.Ready {
		ready = "yes"
	}
	pods := ""
	if st.PodInterface != "" {
		pods = "  pods " + st.PodInterface
	}
	if st.Subnet == "" && st.Subnet6 != "" { // IPv6 only: no IPv4 fields to show
		fmt.Fprintf(w, "node %s  backend %s  pod MTU %d%s  ready %s\n", st.Node, st.Backend, st.PodMTU, pods, ready)
	} else {
		fmt.Fprintf(w, "node %s  subnet %s  network %s  backend %s  public IP %s  pod MTU %d%s  ready %s\n",
			st.Node, st.Subnet, st.Network, st.Backend, st.PublicIP, st.PodMTU, pods, ready)
	}
	switch {
	case st.Subnet6 != "": // the agent's own word
		fmt.Fprintf(w, "IPv6 subnet %s  network %s  public IP %s\n", st.Subnet6, st.Network6, cmp.Or(st.PublicIP6, "none"))
	case ipv6 != "":
		fmt.Fprintln(w, ipv6)
	}
	if s := st.Store; s != nil && s.State != "connected" {
		fmt.Fprintf(w, "store %s since %s (%s ago): %s\n", s.State, s.Since.UTC().Format(time.RFC3339), time.Since(s.Since).Round(time.Second), s.Error)
	}
	for k, v := range st.Errors {
		fmt.Fprintf(w, "error (%s): %s\n", k, v)
	}
	if g := st.WireGuard; g != nil {
		fmt.Fprintf(w, "wireguard %s  %s (%s)  port %d  public key %s\n", g.Device, g.Implementation, g.Reason, g.Port, g.PublicKey)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	if st.WireGuard != nil {
		fmt.Fprintln(tw, "\nPEER\tSUBNET\tPUBLIC IP\tMODE\tROUTE\tWG PEER\tHANDSHAKE\tRX\tTX\tNOTE")
	} else {
		fmt.Fprintln(tw, "\nPEER\tSUBNET\tPUBLIC IP\tMODE\tROUTE\tFDB\tNEIGH\tNOTE")
	}
	yn := func(b *bool) string {
		switch {
		case b == nil:
			return "-"
		case *b:
			return "ok"
		}
		return "MISSING"
	}
	for _, p := range st.Peers {
		r := "ok"
		if !p.Route {
			r = "MISSING"
			if p.Mode == "unreachable" {
				r = "-"
			}
		}
		if st.WireGuard != nil {
			hs := "-"
			switch a := p.WGHandshakeAge; {
			case a != nil && *a < 0:
				hs = "never"
			case a != nil:
				hs = (time.Duration(*a * float64(time.Second))).Round(time.Second).String() + " ago"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\n", p.Node, p.Subnet, p.PublicIP, p.Mode, r, yn(p.WG), hs, p.WGRxBytes, p.WGTxBytes, p.Reason)
			continue
		}
		// Both families' subnets and addresses (dual stack), each where it has one.
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Node, joinSet(p.Subnet, p.Subnet6), joinSet(p.PublicIP, p.PublicIP6), p.Mode, r, yn(p.FDB), yn(p.Neigh), p.Reason)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(st.IgnoredLeases) > 0 {
		fmt.Fprintln(w, "\nIGNORED LEASES")
		for _, k := range slices.Sorted(maps.Keys(st.IgnoredLeases)) {
			fmt.Fprintf(w, "%s: %s\n", k, st.IgnoredLeases[k])
		}
	}
	return nil
}

// joinSet joins the non-empty ones of xs with a comma.
func joinSet(xs ...string) string {
	return strings.Join(slices.DeleteFunc(xs, func(x string) bool { return x == "" }), ",")
}

func cmdLeave(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("leave", flag.ContinueOnError)
	var ef etcdFlags
	ef.register(fs)
	host, _ := os.Hostname()
	node := fs.String("node-name", host, "the node whose lease to release")
	if err := parse(fs, args); err != nil {
		return err
	}
	return ef.with(ctx, func(ctx context.Context, st *etcdstore.Store) error {
		subnets, err := st.Leave(ctx, *node)
		if err != nil {
			return err
		}
		var names []string
		for _, s := range subnets {
			names = append(names, s.String())
		}
		_, err = fmt.Fprintf(stdout, "released %s of %s\n", strings.Join(names, ", "), *node)
		return err
	})
}

func cmdReserve(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("reserve", flag.ContinueOnError)
	var ef etcdFlags
	ef.register(fs)
	node := fs.String("node-name", "", "node to pin the subnet to")
	subnet := fs.String("subnet", "", "the subnet, e.g. 10.244.9.0/24")
	force := fs.Bool("force", false, "reserve a subnet other than the one the node holds or last held: the node moves to it at its next "+
		"restart, and its existing pods keep addresses in the old subnet, unreachable until they are recreated (drain the node first)")
	if err := parse(fs, args); err != nil {
		return err
	}
	p, err := netip.ParsePrefix(*subnet)
	if err != nil || *node == "" {
		return fmt.Errorf("--node-name and --subnet (a CIDR prefix) are required")
	}
	return ef.with(ctx, func(ctx context.Context, st *etcdstore.Store) error {
		if err := st.Reserve(ctx, *node, p, *force); err != nil {
			return fmt.Errorf("--subnet %s for --node-name %s: %w", p, *node, err)
		}
		msg := fmt.Sprintf("reserved %s for %s\n", p, *node)
		if *force {
			msg += "forced: if the node held another subnet it moves at its next restart; recreate its pods after that\n"
		}
		_, err = io.WriteString(stdout, msg)
		return err
	})
}

// cleanupFlags are `netagent cleanup`'s flags (a separate type so a test can parse the
// cleanup DaemonSet's arguments with the real parser).
type cleanupFlags struct {
	subnetFile string
	cniConf    string
	cniBin     string
	wgDevice   string
}

func newCleanupFlags() (*flag.FlagSet, *cleanupFlags) {
	fs := flag.NewFlagSet("cleanup", flag.ContinueOnError)
	f := &cleanupFlags{}
	fs.StringVar(&f.subnetFile, "subnet-file", subnetfile.DefaultPath, "subnet file to remove")
	fs.StringVar(&f.cniConf, "cni-conf", "/etc/cni/net.d/10-netagent.conflist", "conflist to remove")
	fs.StringVar(&f.wgDevice, "wireguard-device", plan.DefaultWGDev, "WireGuard device to remove (the private key in --state-dir stays: it is the node's identity)")
	fs.StringVar(&f.cniBin, "cni-bin", "", "plugin binary to remove, e.g. /opt/cni/bin/"+cniBinName+" (empty: keep it)")
	return fs, f
}

func cmdCleanup(ctx context.Context, args []string, stdout io.Writer) error {
	fs, f := newCleanupFlags()
	if err := parse(fs, args); err != nil {
		return err
	}
	var errs []error
	h, err := netlink.NewHandle()
	if err != nil {
		return err
	}
	defer h.Close()
	if st, err := route.New(h, slog.New(slog.DiscardHandler)).Sync(nil); err != nil {
		errs = append(errs, err)
	} else {
		fmt.Fprintf(stdout, "removed %d routes\n", st.Deleted)
	}
	gone, err := vxlan.New(h, slog.New(slog.DiscardHandler)).Prune("")
	if err != nil {
		errs = append(errs, err)
	}
	for _, name := range gone {
		fmt.Fprintf(stdout, "removed vxlan device %s\n", name)
	}
	if err := nat.New(nat.Exec{}).Remove(ctx); err != nil {
		errs = append(errs, err)
	} else {
		fmt.Fprintln(stdout, "removed NAT and FORWARD chains")
	}
	if err := vxguard.Remove(); err != nil {
		errs = append(errs, err)
	} else {
		fmt.Fprintln(stdout, "removed the VXLAN allow-list (nftables tables ip and ip6 netagent)")
	}
	if err := wgguard.Remove(); err != nil {
		errs = append(errs, err)
	} else {
		fmt.Fprintln(stdout, "removed the WireGuard underlay guard (nftables table ip netagent-wg)")
	}
	// The WireGuard device: deleting the link stops a userspace device's daemon too.
	if l, err := h.LinkByName(f.wgDevice); err == nil {
		if err := h.LinkDel(l); err != nil {
			errs = append(errs, fmt.Errorf("delete wireguard device %s: %w", f.wgDevice, err))
		} else {
			fmt.Fprintf(stdout, "removed wireguard device %s\n", f.wgDevice)
		}
	}
	if err := antispoof.Remove(ctx); err != nil {
		errs = append(errs, err)
	} else {
		fmt.Fprintln(stdout, "removed the pod anti-spoofing rules (nftables table bridge netagent)")
	}
	for _, p := range []string{f.cniConf, f.subnetFile, f.cniBin} {
		if p == "" {
			continue
		}
		if err := os.Remove(p); err != nil && !errors.Is(err, iofs.ErrNotExist) {
			errs = append(errs, err)
		} else if err == nil {
			fmt.Fprintf(stdout, "removed %s\n", filepath.Clean(p))
		}
	}
	return errors.Join(errs...)
}

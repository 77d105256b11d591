// Command netagent-bench-floor is the CNI benchmark's floor plugin: a Go CNI plugin that
// does the kernel work of an attachment (barework) and prints a result, and nothing else —
// no IPAM (the pod's address comes from CNI_ARGS: IDX, or the number a K8S_POD_NAME ends
// in, which is how the CRI benchmark names its sandboxes), no checks, no host-side state. The
// benchmark times whole pods with it next to netagent-cni and the reference chain: what it
// scores is the best any plugin that is a Go program exec'd once per pod can score here.
// It is a measuring stick, never an installed plugin.
package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/netagent/netagent/test/bench/barework"
)

type conf struct {
	types.NetConf
	Bridge     string       `json:"bridge"`
	Subnet     netip.Prefix `json:"subnet"`
	IPv6Subnet netip.Prefix `json:"ipv6Subnet"` // optional: dual stack
}

func load(args *skel.CmdArgs) (conf, int, error) {
	var c conf
	if err := json.Unmarshal(args.StdinData, &c); err != nil {
		return c, 0, fmt.Errorf("config: %w", err)
	}
	for _, kv := range strings.Split(args.Args, ";") {
		if v, ok := strings.CutPrefix(kv, "IDX="); ok {
			idx, err := strconv.Atoi(v)
			return c, idx, err
		}
	}
	for _, kv := range strings.Split(args.Args, ";") {
		if v, ok := strings.CutPrefix(kv, "K8S_POD_NAME="); ok {
			digits := strings.TrimLeft(v, "abcdefghijklmnopqrstuvwxyz-")
			idx, err := strconv.Atoi(digits)
			return c, idx, err
		}
	}
	return c, 0, fmt.Errorf("CNI_ARGS has neither IDX nor K8S_POD_NAME")
}

func hostVeth(idx int) string { return fmt.Sprintf("fv%d", idx) }

func add(args *skel.CmdArgs) error {
	c, idx, err := load(args)
	if err != nil {
		return err
	}
	subnets := []netip.Prefix{c.Subnet}
	if c.IPv6Subnet.IsValid() {
		subnets = append(subnets, c.IPv6Subnet)
	}
	var addrs []netip.Prefix
	for _, s := range subnets {
		a, err := barework.Addr(s, idx)
		if err != nil {
			return err
		}
		addrs = append(addrs, a)
	}
	l, err := barework.Attach(args.Netns, c.Bridge, hostVeth(idx), args.IfName, addrs...)
	if err != nil {
		return err
	}
	zero := 0
	res := &current.Result{
		CNIVersion: c.CNIVersion,
		Interfaces: []*current.Interface{{Name: args.IfName, Mac: l.Attrs().HardwareAddr.String(), Sandbox: args.Netns}},
	}
	for _, a := range addrs {
		res.IPs = append(res.IPs, &current.IPConfig{Interface: &zero, Address: net.IPNet{IP: a.Addr().AsSlice(), Mask: net.CIDRMask(a.Bits(), a.Addr().BitLen())},
			Gateway: barework.Gateway(a.Masked()).AsSlice()})
	}
	return types.PrintResult(res, c.CNIVersion)
}

func del(args *skel.CmdArgs) error {
	_, idx, err := load(args)
	if err != nil {
		return err
	}
	return barework.Detach(hostVeth(idx))
}

func check(*skel.CmdArgs) error { return fmt.Errorf("the benchmark's floor plugin has no CHECK") }

func main() {
	skel.PluginMainFuncs(skel.CNIFuncs{Add: add, Del: del, Check: check}, version.All, "netagent-bench-floor")
}

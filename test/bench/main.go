// Command bench measures netagent against the reference implementations it replaces.
//
// # README
//
//	go run ./test/bench cni [flags]        (as root)
//
// The cni command times our CNI plugin, netagent-cni (./cmd/cni-plugin), against the chain
// flannel's CNI config delegates to: bridge ("isGateway": true, "ipMasq": true) with
// host-local IPAM, followed by portmap. The reference binaries and loopback are built from
// github.com/containernetworking/plugins at -ref-version (default v1.10.0, through a
// throw-away module file) and everything is driven through libcni, as a container runtime
// drives it: AddNetworkList and DelNetworkList, with a result cache, exec'ing one process
// per plugin. By default (-pod) a timed ADD or DEL is a whole pod as containerd's CRI does
// it: the loopback network too (its ADD concurrent with the pod network's, as go-cni does,
// its DEL after), and runtimeConfig.portMappings always passed (empty for these pods).
// -pod=false times the pod network's conflist alone, as earlier figures did. Network
// namespace creation stays untimed here; the CRI benchmark in test/containerd
// (TestCRINetworkShare) measures inside the runtime, netns handling included.
//
// -family dual makes every chain dual stack: ours with ipv6Subnet, the reference's
// host-local with an IPv4 and an IPv6 range, the floor plugin and the bare work with an
// IPv6 address and default route too; a sixth chain, ours on an IPv4-only network
// ("ours4"), runs interleaved with them, and the report adds ours/ours4 (target ≤ 1.15)
// to the ratios to the reference. After the sequential ADDs every chain's first pod is
// checked to have exactly the addresses its family asks for.
//
// Nothing touches the root network namespace. Each chain gets its own "node" namespace
// (its own bridge, subnet, iptables) and every plugin call is made from an OS thread locked
// inside that namespace, so the plugin processes libcni starts inherit it. Pod namespaces
// are created before anything is timed, reused across phases (their teardown runs in a
// kernel work queue and would otherwise bleed into the next phase's timings) and removed at
// the end; ^C or an error removes every namespace too, and a run that was killed outright
// leaves names that the next run's netns.Sweep removes.
//
// What is measured, with the chains interleaved so machine noise hits both alike:
//
//  1. Sequential ADD latency of -n pods (p50/p90/p99), alternating ours, ref, ours...
//  2. Sequential DEL latency of those pods.
//  3. Parallel ADD throughput (pods/s) of batches of -pods pods with -conc workers, each
//     chain -rounds times per concurrency in ABBA order.
//
// After every phase all pods are deleted and the node is checked for leaks: veths, IPAM
// records, libcni cache entries and (for the reference) CNI iptables chains. A third
// column, "bare", does the kernel work alone from this process through netlink (a veth pair
// into the pod namespace on a bridge, address, link up, default route; DEL removes the
// veth): the floor any plugin pays, for context.
//
// Output is a table on stdout with PASS/MISS against the targets (ADD p50 ratio ≤ 0.15,
// parallel throughput ratio ≥ 6, DEL p50 ratio ≤ 0.1); -markdown FILE also writes a block
// for BENCHMARKS.md with the command line, date, kernel, nproc and load average. A note
// follows when a target is below what the bare kernel work alone takes (deleting a veth
// waits for RCU grace periods: tens of milliseconds on some kernels), and when namespaces
// of other processes existed during the run.
//
// Reading the numbers: on a small shared machine absolute times move by ±30% from run to
// run and the ratios by ±15%; run with nothing else busy (the load average is recorded for
// that reason), and compare ratios from one run, never across runs.
//
// Caveats: the default kube-flannel deployment runs flanneld with --ip-masq, and flannel's
// CNI plugin then passes "ipMasq": false to bridge; -ref-ipmasq=false measures that
// (cheaper) reference. The reference plugins import modules (go-nft, knftables, ...) that
// go.sum does not list, because netagent itself never imports them; they are built against
// a throw-away copy of go.mod and go.sum (-modfile), so the repository's files are never
// changed, though go may need to download those modules once.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
)

const usage = `usage: go run ./test/bench COMMAND [flags]

commands:
  cni    time netagent-cni against bridge+host-local+portmap through libcni (needs root)

run "go run ./test/bench cni -h" for the flags.
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "cni":
		err = runCNI(os.Args[2:])
	case "-h", "-help", "--help", "help":
		fmt.Print(usage)
		return
	default:
		fmt.Fprintf(os.Stderr, "bench: unknown command %q\n\n%s", os.Args[1], usage)
		os.Exit(2)
	}
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/netagent/netagent/pkg/lab"
)

const labUsage = `usage: netagent lab up|status|check|down|kubectl [flags]

  up       build a cluster in network namespaces: switch, nodes running netagent, etcd, pods
           (--scenario kubernetes: a real Kubernetes cluster with netagent as its DaemonSet)
  status   each node's lease and peers
  check    run the connectivity matrix again
  kubectl  run kubectl against a kubernetes lab: netagent lab kubectl -- get pods -A
  down     remove everything the lab created (also after a crash)`

// The lab is a subcommand rather than a binary of its own: it runs this very executable
// as every node's agent, so a lab always exercises the agent that ships, and anyone with
// the release binary can try it. What it adds is small and links no test code (the lab's
// namespace helpers are pkg/lab/netns; scripts/test.sh checks that no testing package is
// linked).
func cmdLab(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) > 0 && isHelp(args[0]) {
		_, err := fmt.Fprintln(stdout, labUsage+"\n\nRun `netagent lab up -h` for the flags.")
		return err
	}
	if len(args) == 0 {
		return errors.New(labUsage)
	}
	fs := flag.NewFlagSet("lab "+args[0], flag.ContinueOnError)
	dir := fs.String("dir", "/run/netagent-lab", "lab state, logs and etcd data")
	prefix := fs.String("prefix", "nalab-", "network namespace name prefix")
	nodes := fs.Int("nodes", 3, "up: number of nodes")
	remote := fs.Int("remote", -1, "up: nodes on a second underlay subnet behind a router (default: 1 for hybrid and vxlan with 3+ nodes, else 0)")
	backend := fs.String("backend", "vxlan", "up: host-gw, vxlan, hybrid or wireguard (encrypted; needs netagent-wireguard beside this binary)")
	pods := fs.Int("pods-per-node", 2, "up: pods per node")
	family := fs.String("ip-family", "ipv4", "up: ipv4, ipv6 (an IPv6 underlay from 2001:db8::/32 and IPv6 pods only) or dual")
	podIface := fs.String("pod-interface", "", "up: how the plugin wires pods: routed (host routes over each pod's veth, no bridge) or bridge (default: the agents' default, auto: routed on the lab's new nodes)")
	cniBin := fs.String("cni-bin-dir", "", "directory with netagent-cni (default: beside this binary)")
	picture := fs.String("picture", "", "up, status: also write the topology as an SVG picture to this file")
	scenario := fs.String("scenario", "cni", "up: cni (agents + CNI pods), docker (Docker hosts: a dockerd per node on its lease, netagent route-mode, containers) or kubernetes (kube-apiserver, controller-manager, scheduler, and containerd, kubelet, kube-proxy per node; netagent's DaemonSet from --manifests)")
	kubeBin := fs.String("kube-bin", "/var/cache/netagent/kubernetes/v1.34.4/bin", "up, kubernetes: the Kubernetes binaries (scripts/k8s-build.sh builds them)")
	manifests := fs.String("manifests", "", "up, kubernetes: the kustomize directory to apply (default: manifests/kube beside this binary's bin/)")
	imageScript := fs.String("image-script", "", "up, kubernetes: the image assembly script (default: scripts/image-rootfs.sh beside this binary's bin/)")
	if err := parse(fs, args[1:]); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	if *cniBin == "" {
		*cniBin = filepath.Dir(self)
	}
	start := time.Now()
	logf := func(format string, a ...any) {
		fmt.Fprintf(stdout, "[%7s] %s\n", time.Since(start).Round(time.Millisecond), fmt.Sprintf(format, a...))
	}
	opt := lab.Options{Prefix: *prefix, Dir: *dir, Netagent: self, CNIBinDir: *cniBin, Log: logf}
	repo := filepath.Dir(filepath.Dir(self))
	switch args[0] {
	case "kubectl":
		l, err := lab.Load(*dir, opt)
		if err != nil {
			return err
		}
		if l.K8s == nil {
			return fmt.Errorf("the lab in %s is not a kubernetes lab (lab up --scenario kubernetes)", *dir)
		}
		cmd := l.Kubectl(ctx, fs.Args()...)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, stdout, os.Stderr
		return cmd.Run()
	case "up":
		if _, err := os.Stat(filepath.Join(*dir, "lab.json")); err == nil {
			return fmt.Errorf("a lab is already up in %s (netagent lab down first)", *dir)
		}
		if _, err := os.Stat(filepath.Join(*cniBin, "netagent-cni")); err != nil {
			return fmt.Errorf("netagent-cni not found in %s (build it there or pass --cni-bin-dir)", *cniBin)
		}
		if wg := filepath.Join(filepath.Dir(self), "netagent-wireguard"); *backend == "wireguard" {
			if _, err := os.Stat(wg); err != nil {
				return fmt.Errorf("--backend wireguard: %s not found (go build -o %s ./cmd/netagent-wireguard)", wg, filepath.Dir(self))
			}
		}
		if *remote < 0 {
			*remote = 0
			if *nodes >= 3 && *backend != "host-gw" {
				*remote = 1
			}
		}
		opt.Nodes, opt.Remote, opt.Backend, opt.PodsPerNode, opt.IPFamily = *nodes, *remote, *backend, *pods, *family
		opt.PodInterface = *podIface
		if *podIface != "" && *podIface != "bridge" && *scenario == "docker" {
			return fmt.Errorf("--pod-interface %s: Docker hosts wire containers with Docker's bridge (route mode)", *podIface)
		}
		if *family != "ipv4" && *scenario != "cni" && !(*family == "dual" && *scenario == "kubernetes") {
			return fmt.Errorf("--ip-family %s: only the cni scenario has IPv6 so far (and kubernetes dual stack)", *family)
		}
		switch *scenario {
		case "cni":
		case "docker":
			if _, err := exec.LookPath("dockerd"); err != nil {
				return errors.New("--scenario docker needs dockerd (apt-get install docker.io)")
			}
			opt.RouteMode = true
		case "kubernetes":
			ko := &lab.KubernetesOptions{
				KubeBin: *kubeBin, Manifests: *manifests, ImageScript: *imageScript,
				Etcd: filepath.Join(*cniBin, "netagent-etcd"), CNI: filepath.Join(*cniBin, "netagent-cni"), Loopback: filepath.Join(*cniBin, "loopback"),
			}
			if ko.Manifests == "" {
				ko.Manifests = filepath.Join(repo, "manifests", "kube")
			}
			if ko.ImageScript == "" {
				ko.ImageScript = filepath.Join(repo, "scripts", "image-rootfs.sh")
			}
			for _, f := range []string{filepath.Join(ko.KubeBin, "kubelet"), ko.Manifests, ko.ImageScript, ko.Etcd, ko.Loopback} {
				if _, err := os.Stat(f); err != nil {
					return fmt.Errorf("--scenario kubernetes: %w (scripts/lab.sh --scenario kubernetes builds and finds everything)", err)
				}
			}
			opt.Kubernetes = ko
		default:
			return fmt.Errorf("--scenario %q: want cni, docker or kubernetes", *scenario)
		}
		l, err := lab.Up(ctx, opt)
		if err != nil {
			return err
		}
		logf("lab is up")
		if err := labReport(ctx, l, stdout, logf); err != nil {
			return err
		}
		if err := writePicture(l, *picture, logf); err != nil {
			return err
		}
		if l.K8s != nil {
			fmt.Fprintf(stdout, `
Kubeconfig (admin): %[3]s   (the API server listens on %[4]s:6443 inside %[1]snode1)
Poke at it by hand:
  %[2]s lab kubectl -- get nodes -o wide
  %[2]s lab kubectl -- -n netagent get pods -o wide      # the DaemonSet
  %[2]s lab kubectl -- get pods -o wide                  # the web Deployment; exec into one: -- exec -it POD -- sh
  ip netns exec %[1]snode1 ip route                   # routes (netagent's carry "proto 180")
  %[2]s lab check | status | down
Logs and state: %[5]s
`, *prefix, self, l.K8s.Kubeconfig, l.Nodes[0].IP, *dir)
			return nil
		}
		fmt.Fprintf(stdout, `
Poke at it by hand:
  ip netns exec %[1]snode1 ip route                   # routes (netagent's carry "proto 180")
  ip netns exec %[1]snode1 bridge fdb show dev netagent.1
  ip netns exec %[1]snode1 nft list ruleset          # VXLAN allow-list, pod anti-spoofing (and iptables' tables)
  ip netns exec %[1]snode1 %[2]s status    # lease and peers of node1
  ip netns exec %[1]s%[5]s ping %[3]s            # from a pod
  %[2]s lab check | status | down
Logs and state: %[4]s
`, *prefix, self, l.Ext, *dir, firstPod(l))
		return nil
	case "status", "check":
		l, err := lab.Load(*dir, opt)
		if err != nil {
			return err
		}
		if args[0] == "check" {
			m := l.Matrix(ctx)
			fmt.Fprint(stdout, lab.FormatMatrix(m))
			if f := lab.Failures(m); len(f) > 0 {
				return fmt.Errorf("%d paths fail: %s", len(f), strings.Join(f, ", "))
			}
			return nil
		}
		for _, n := range l.Nodes {
			out, err := l.Status(n)
			if err != nil {
				fmt.Fprintf(stdout, "== %s: %v\n", n.Name, err)
				continue
			}
			fmt.Fprintf(stdout, "== %s (%s)\n%s\n", n.Name, nodeAddrs(n), out)
		}
		return writePicture(l, *picture, logf)
	case "down":
		l, err := lab.Load(*dir, opt)
		if err != nil {
			l = &lab.Lab{Opt: opt, Prefix: *prefix, Dir: *dir} // a crashed lab: remove by prefix
		}
		if err := l.Down(); err != nil {
			return err
		}
		if err := os.RemoveAll(*dir); err != nil {
			return err
		}
		logf("lab removed")
		return nil
	}
	return errors.New(labUsage)
}

// nodeAddrs are a lab node's underlay addresses, for a heading: IPv4, IPv6 or both.
func nodeAddrs(n *lab.Node) string {
	var a []string
	for _, ip := range []netip.Addr{n.IP, n.IP6} {
		if ip.IsValid() {
			a = append(a, ip.String())
		}
	}
	return strings.Join(a, ", ")
}

func labReport(ctx context.Context, l *lab.Lab, w io.Writer, logf func(string, ...any)) error {
	t0 := time.Now()
	m := l.Matrix(ctx)
	logf("connectivity matrix measured with real pings (%s):", time.Since(t0).Round(time.Millisecond))
	fmt.Fprint(w, "\n"+lab.FormatMatrix(m)+"\n")
	for _, n := range l.Nodes {
		out, err := l.Status(n)
		if err != nil {
			return err
		}
		fmt.Fprintf(w, "== %s (%s)\n%s\n", n.Name, nodeAddrs(n), out)
	}
	if f := lab.Failures(m); len(f) > 0 {
		return fmt.Errorf("%d paths fail: %s", len(f), strings.Join(f, ", "))
	}
	return nil
}

func firstPod(l *lab.Lab) string {
	if p := l.Pods(); len(p) > 0 {
		return strings.TrimPrefix(p[0].NS, l.Prefix)
	}
	return "node1-pod1"
}

func writePicture(l *lab.Lab, path string, logf func(string, ...any)) error {
	if path == "" {
		return nil
	}
	svg, err := l.Picture()
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, svg, 0o644); err != nil {
		return err
	}
	logf("topology picture written to %s", path)
	return nil
}

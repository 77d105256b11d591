// Package netns creates throw-away network namespaces for the lab and the tests (test/netns
// ties them to a test's lifetime). It does not import the testing package: the netagent
// binary links it through the lab, and shipped binaries carry no test code.
//
// Every namespace is a named one (/run/netns/NAME) so that daemons can be started in it with
// `nsenter --net=/run/netns/NAME`, and every name starts with a per-process prefix
// ("nat<pid>-") so that a later run can sweep namespaces left by a process that died
// (Sweep). Nothing here touches the root network namespace: work inside a namespace goes
// through Do (a locked OS thread, via containernetworking's ns package), Handle (a netlink
// socket opened in the namespace) or Run (a child process entered with nsenter).
package netns

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	vns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Prefix starts every namespace name this package creates.
const Prefix = "nat"

var counter atomic.Int64

// NS is one named network namespace.
type NS struct {
	Name string
	Path string

	mu    sync.Mutex
	procs []*exec.Cmd
}

// TB is the part of testing.TB that MustRun and Serve use; tests pass their *testing.T.
// Naming testing.TB itself would link the testing package into the netagent binary.
type TB interface {
	Helper()
	Fatal(args ...any)
	Cleanup(func())
}

// Create makes a namespace with loopback up, named with the per-process prefix; Close
// removes it (test/netns.New removes it when the test ends).
func Create(label string) (*NS, error) {
	name := fmt.Sprintf("%s%d-%d-%s", Prefix, os.Getpid(), counter.Add(1), label)
	if len(name) > 64 {
		name = name[:64]
	}
	return CreateNamed(name)
}

// CreateNamed makes a namespace with an exact name (the lab picks its own prefix).
func CreateNamed(name string) (*NS, error) {
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %v: %s", name, err, bytes.TrimSpace(out))
	}
	n := &NS{Name: name, Path: filepath.Join("/run/netns", name)}
	h, err := n.Handle()
	if err != nil {
		_ = n.Close()
		return nil, err
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		_ = n.Close()
		return nil, fmt.Errorf("netns %s: set lo up: %w", name, err)
	}
	return n, nil
}

// Open returns an existing named namespace (for tools that attach to a lab).
func Open(name string) (*NS, error) {
	p := filepath.Join("/run/netns", name)
	if _, err := os.Stat(p); err != nil {
		return nil, fmt.Errorf("netns %s: %w", name, err)
	}
	return &NS{Name: name, Path: p}, nil
}

// Handle opens a netlink socket inside the namespace; the caller closes it.
func (n *NS) Handle() (*netlink.Handle, error) {
	h, err := vns.GetFromPath(n.Path)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", n.Name, err)
	}
	defer h.Close()
	nh, err := netlink.NewHandleAt(h)
	if err != nil {
		return nil, fmt.Errorf("netlink handle in %s: %w", n.Name, err)
	}
	return nh, nil
}

// Do runs fn on a locked OS thread inside the namespace.
func (n *NS) Do(fn func() error) error {
	return ns.WithNetNSPath(n.Path, func(ns.NetNS) error { return fn() })
}

// Command returns a command that runs inside the namespace (via nsenter, which keeps the
// host's /sys and cgroup mounts, unlike `ip netns exec`).
func (n *NS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	full := append([]string{"--net=" + n.Path, "--", name}, args...)
	return exec.CommandContext(ctx, "nsenter", full...)
}

// Run runs a command inside the namespace and returns its combined output.
func (n *NS) Run(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := n.Command(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s in %s: %w: %s", name, strings.Join(args, " "), n.Name, err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// MustRun is Run that fails the test on error.
func (n *NS) MustRun(t TB, name string, args ...string) string {
	t.Helper()
	out, err := n.Run(name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Start starts a long-running process inside the namespace; Close kills it (and its process
// group) before the namespace is removed.
func (n *NS) Start(cmd *exec.Cmd) error {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	if err := cmd.Start(); err != nil {
		return err
	}
	n.mu.Lock()
	n.procs = append(n.procs, cmd)
	n.mu.Unlock()
	return nil
}

// Close kills processes started with Start, then every other process still in the
// namespace, and deletes the namespace.
func (n *NS) Close() error {
	n.mu.Lock()
	procs := n.procs
	n.procs = nil
	n.mu.Unlock()
	for _, c := range procs {
		if c.Process != nil {
			_ = syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
			_, _ = c.Process.Wait()
		}
	}
	killPids(n.Name)
	out, err := exec.Command("ip", "netns", "del", n.Name).CombinedOutput()
	if err != nil && !strings.Contains(string(out), "No such file") {
		return fmt.Errorf("ip netns del %s: %v: %s", n.Name, err, bytes.TrimSpace(out))
	}
	return nil
}

func killPids(name string) {
	out, _ := exec.Command("ip", "netns", "pids", name).Output()
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil && pid != os.Getpid() {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// Sweep removes namespaces with this package's prefix whose creating process is gone (left by
// a run that was killed). It never touches namespaces of a live process or other names.
func Sweep() {
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, Prefix) {
			continue
		}
		rest := strings.TrimPrefix(name, Prefix)
		pidStr, _, ok := strings.Cut(rest, "-")
		if !ok {
			continue
		}
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid == os.Getpid() {
			continue
		}
		if syscall.Kill(pid, 0) == nil {
			continue
		}
		killPids(name)
		_ = exec.Command("ip", "netns", "del", name).Run()
	}
}

// Veth connects two namespaces with a veth pair named aName (in a) and bName (in b), both up.
func Veth(a *NS, aName string, b *NS, bName string) error { return veth(a, aName, b, bName, false) }

// VethNoDAD is Veth for a lab's underlay: neither end runs IPv6 duplicate address
// detection, for the link-local address the kernel gives it at link up or any address
// added later (AddrAdd skips it for the ones it adds). On a lab's switch nothing else
// claims them, and a router cannot forward IPv6 while its link-local address is tentative:
// the kernel solicits the next hop of a forwarded packet from that address, and sends no
// solicitation until duplicate address detection ends (one to two seconds after link up);
// the packets wait in the neighbour's queue until the next attempt, a second later.
func VethNoDAD(a *NS, aName string, b *NS, bName string) error {
	return veth(a, aName, b, bName, true)
}

func veth(a *NS, aName string, b *NS, bName string, noDAD bool) error {
	ha, err := a.Handle()
	if err != nil {
		return err
	}
	defer ha.Close()
	fd, err := vns.GetFromPath(b.Path)
	if err != nil {
		return err
	}
	defer fd.Close()
	v := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: aName},
		PeerName:      bName,
		PeerNamespace: netlink.NsFd(fd),
	}
	if err := ha.LinkAdd(v); err != nil {
		return fmt.Errorf("veth %s/%s - %s/%s: %w", a.Name, aName, b.Name, bName, err)
	}
	if noDAD {
		// Before link up, which starts the detection for the link-local address.
		if err := a.skipDAD(aName); err != nil {
			return err
		}
		if err := b.skipDAD(bName); err != nil {
			return err
		}
	}
	if err := ha.LinkSetUp(v); err != nil {
		return err
	}
	hb, err := b.Handle()
	if err != nil {
		return err
	}
	defer hb.Close()
	l, err := hb.LinkByName(bName)
	if err != nil {
		return err
	}
	return hb.LinkSetUp(l)
}

// skipDAD turns off IPv6 duplicate address detection on link (nothing to do where the
// namespace has IPv6 off).
func (n *NS) skipDAD(link string) error {
	return n.Do(func() error {
		err := os.WriteFile("/proc/sys/net/ipv6/conf/"+link+"/accept_dad", []byte("0"), 0o644)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("%s: turn off duplicate address detection on %s: %w", n.Name, link, err)
		}
		return nil
	})
}

// AddrAdd assigns an address (CIDR notation) to a link inside the namespace.
func (n *NS) AddrAdd(link, cidr string) error {
	h, err := n.Handle()
	if err != nil {
		return err
	}
	defer h.Close()
	l, err := h.LinkByName(link)
	if err != nil {
		return fmt.Errorf("%s: link %s: %w", n.Name, link, err)
	}
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		return err
	}
	if a.IP.To4() == nil {
		a.Flags |= unix.IFA_F_NODAD // usable at once, as on a lab's switch nothing else claims it
	}
	if err := h.AddrAdd(l, a); err != nil {
		return fmt.Errorf("%s: addr add %s dev %s: %w", n.Name, cidr, link, err)
	}
	return nil
}

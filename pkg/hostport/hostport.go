// Package hostport publishes pod ports on the node (the CNI portMappings capability) with
// iptables DNAT.
//
// Design: there are no per-pod chains. Three node-level chains in the nat table are
// created once and jumped to from the built-in chains:
//
//	PREROUTING/OUTPUT -m addrtype --dst-type LOCAL -> NETAGENT-HOSTPORTS
//	POSTROUTING                                    -> NETAGENT-HP-POSTROUTING
//	NETAGENT-HP-POSTROUTING: -m mark --mark 0x2000/0x2000 -j MASQUERADE
//
// and each mapping adds two rules to NETAGENT-HOSTPORTS, tagged with a comment naming the
// attachment: one marks connections coming from the node's own pod subnet (so the reply of
// a pod reached through its own or a neighbour's host port comes back through the node and
// is un-NATed, without relying on br_netfilter), one DNATs to the pod. Adding a pod's
// mappings is one iptables-restore --noflush run; removing them is one listing and one
// restore. Pods without mappings cost no iptables work at all.
package hostport

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/coreos/go-iptables/iptables"
)

const (
	Chain     = "NETAGENT-HOSTPORTS"
	PostChain = "NETAGENT-HP-POSTROUTING"
	// MasqMark marks hostport connections that must be masqueraded.
	MasqMark = "0x2000/0x2000"
	// commentPrefix tags every per-attachment rule.
	commentPrefix = "netagent-hp:"
)

// Mapping is one published port (the CNI portMappings entry).
type Mapping struct {
	HostPort      int    `json:"hostPort"`
	ContainerPort int    `json:"containerPort"`
	Protocol      string `json:"protocol"`
	HostIP        string `json:"hostIP,omitempty"`
}

// Validate checks a mapping; errors name the field.
func (m Mapping) Validate() error {
	if m.HostPort < 1 || m.HostPort > 65535 {
		return fmt.Errorf("hostPort %d is out of range 1-65535", m.HostPort)
	}
	if m.ContainerPort < 1 || m.ContainerPort > 65535 {
		return fmt.Errorf("containerPort %d is out of range 1-65535", m.ContainerPort)
	}
	switch strings.ToLower(m.Protocol) {
	case "", "tcp", "udp", "sctp":
	default:
		return fmt.Errorf("protocol %q is not tcp, udp or sctp", m.Protocol)
	}
	if m.HostIP != "" {
		a, err := netip.ParseAddr(m.HostIP)
		if err != nil {
			return fmt.Errorf("hostIP %q: %w", m.HostIP, err)
		}
		if !a.Is4() {
			return fmt.Errorf("hostIP %s: only IPv4 host ports are supported", a)
		}
	}
	return nil
}

func (m Mapping) proto() string {
	if m.Protocol == "" {
		return "tcp"
	}
	return strings.ToLower(m.Protocol)
}

// Tag is the comment that marks an attachment's rules.
func Tag(containerID, ifName string) string {
	return commentPrefix + containerID + ":" + ifName
}

// Rules renders the nat-table rules for one attachment's mappings (exported for tests).
func Rules(tag string, podIP netip.Addr, subnet netip.Prefix, ms []Mapping) []string {
	var out []string
	for _, m := range ms {
		match := fmt.Sprintf("-p %s -m %s --dport %d", m.proto(), m.proto(), m.HostPort)
		if m.HostIP != "" {
			if a, err := netip.ParseAddr(m.HostIP); err == nil && !a.IsUnspecified() {
				match = fmt.Sprintf("-d %s/32 %s", a, match)
			}
		}
		c := fmt.Sprintf("-m comment --comment %s", tag)
		out = append(out,
			fmt.Sprintf("-A %s %s -s %s %s -j MARK --set-xmark %s", Chain, match, subnet, c, MasqMark),
			fmt.Sprintf("-A %s %s %s -j DNAT --to-destination %s", Chain, match, c, netip.AddrPortFrom(podIP, uint16(m.ContainerPort))),
		)
	}
	return out
}

// DefaultLock serialises host-port changes between plugin processes on a node.
const DefaultLock = "/run/netagent/hostport.lock"

// Table programs host ports in the current network namespace.
type Table struct {
	ipt  *iptables.IPTables
	lock string
}

// New finds iptables (it runs `iptables --version` once). lock is the file that serialises
// changes, so that removing the last mapping's chains cannot race with adding a new one.
func New(lock string) (*Table, error) {
	ipt, err := iptables.New(iptables.Timeout(10))
	if err != nil {
		return nil, fmt.Errorf("iptables: %w", err)
	}
	return &Table{ipt: ipt, lock: lock}, nil
}

func (t *Table) locked(fn func() error) error {
	if err := os.MkdirAll(filepath.Dir(t.lock), 0o755); err != nil {
		return fmt.Errorf("host port lock: %w", err)
	}
	f, err := os.OpenFile(t.lock, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("host port lock: %w", err)
	}
	defer f.Close() // releases the lock
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX)
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("host port lock %s: %w", t.lock, err)
	}
	return fn()
}

// Add installs the mappings of one attachment.
func (t *Table) Add(ctx context.Context, tag string, podIP netip.Addr, subnet netip.Prefix, ms []Mapping) error {
	rules := Rules(tag, podIP, subnet, ms)
	if len(rules) == 0 {
		return nil
	}
	return t.locked(func() error { return t.add(ctx, rules) })
}

func (t *Table) add(ctx context.Context, rules []string) error {
	err := restore(ctx, rules)
	if err == nil {
		return nil
	}
	// The likely cause is a missing chain (first mapping on this node): set up, retry once.
	if serr := t.setup(); serr != nil {
		return errors.Join(err, serr)
	}
	return restore(ctx, rules)
}

// jumps are the node-level rules that lead to the host-port chains.
var jumps = []struct {
	chain string
	rule  []string
}{
	{"PREROUTING", []string{"-m", "addrtype", "--dst-type", "LOCAL", "-m", "comment", "--comment", "netagent host ports", "-j", Chain}},
	{"OUTPUT", []string{"-m", "addrtype", "--dst-type", "LOCAL", "-m", "comment", "--comment", "netagent host ports", "-j", Chain}},
	{"POSTROUTING", []string{"-m", "comment", "--comment", "netagent host ports", "-j", PostChain}},
	{PostChain, []string{"-m", "mark", "--mark", MasqMark, "-j", "MASQUERADE"}},
}

func (t *Table) setup() error {
	for _, c := range []string{Chain, PostChain} {
		ok, err := t.ipt.ChainExists("nat", c)
		if err != nil {
			return fmt.Errorf("check chain %s: %w", c, err)
		}
		if !ok {
			if err := t.ipt.NewChain("nat", c); err != nil {
				if ok, _ := t.ipt.ChainExists("nat", c); !ok {
					return fmt.Errorf("create chain %s: %w", c, err)
				}
			}
		}
	}
	for _, j := range jumps {
		if err := t.ipt.AppendUnique("nat", j.chain, j.rule...); err != nil {
			return fmt.Errorf("add jump in %s: %w", j.chain, err)
		}
	}
	return nil
}

// Del removes the rules tagged tag; none present is not an error.
func (t *Table) Del(ctx context.Context, tag string) error {
	_, err := t.delWhere(ctx, func(ruleTag string) bool { return ruleTag == tag })
	return err
}

// Retain removes every attachment's rules whose tag keep rejects and returns the removed tags.
func (t *Table) Retain(ctx context.Context, keep func(tag string) bool) ([]string, error) {
	return t.delWhere(ctx, func(tag string) bool { return !keep(tag) })
}

// Tags lists the tags that have rules.
func (t *Table) Tags() ([]string, error) {
	rules, err := t.list()
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var out []string
	for _, r := range rules {
		if tag := tagOf(r); tag != "" && !seen[tag] {
			seen[tag] = true
			out = append(out, tag)
		}
	}
	return out, nil
}

func (t *Table) list() ([]string, error) {
	ok, err := t.ipt.ChainExists("nat", Chain)
	if err != nil || !ok {
		return nil, err
	}
	return t.ipt.List("nat", Chain)
}

func (t *Table) delWhere(ctx context.Context, del func(tag string) bool) (tags []string, err error) {
	err = t.locked(func() error {
		tags, err = t.delLocked(ctx, del)
		return err
	})
	return tags, err
}

// teardown removes the jumps and chains once no mapping is left, so a node whose pods
// published nothing (any more) carries no host-port rules at all.
func (t *Table) teardown() error {
	var errs []error
	for _, j := range jumps[:3] {
		if err := t.ipt.DeleteIfExists("nat", j.chain, j.rule...); err != nil {
			errs = append(errs, err)
		}
	}
	for _, c := range []string{Chain, PostChain} {
		if ok, _ := t.ipt.ChainExists("nat", c); ok {
			if err := t.ipt.ClearAndDeleteChain("nat", c); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

func (t *Table) delLocked(ctx context.Context, del func(tag string) bool) ([]string, error) {
	rules, err := t.list()
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", Chain, err)
	}
	var dels, tags []string
	seen := map[string]bool{}
	kept := 0
	for _, r := range rules {
		tag := tagOf(r)
		if tag == "" {
			continue
		}
		if !del(tag) {
			kept++
			continue
		}
		dels = append(dels, "-D"+strings.TrimPrefix(r, "-A"))
		if !seen[tag] {
			seen[tag] = true
			tags = append(tags, tag)
		}
	}
	if len(dels) > 0 {
		if err := restore(ctx, dels); err != nil {
			return nil, err
		}
	}
	if kept == 0 && rules != nil {
		if err := t.teardown(); err != nil {
			return tags, fmt.Errorf("remove host-port chains: %w", err)
		}
	}
	return tags, nil
}

// ParseTag splits a tag into container ID and interface name.
func ParseTag(tag string) (containerID, ifName string, ok bool) {
	rest, ok := strings.CutPrefix(tag, commentPrefix)
	if !ok {
		return "", "", false
	}
	i := strings.LastIndexByte(rest, ':')
	if i < 0 {
		return "", "", false
	}
	return rest[:i], rest[i+1:], true
}

func tagOf(rule string) string {
	_, after, ok := strings.Cut(rule, "--comment ")
	if !ok {
		return ""
	}
	f := strings.Fields(after)
	if len(f) == 0 {
		return ""
	}
	tag := strings.Trim(f[0], `"`)
	if !strings.HasPrefix(tag, commentPrefix) {
		return ""
	}
	return tag
}

// restore applies rule lines to the nat table in one iptables-restore transaction.
func restore(ctx context.Context, rules []string) error {
	var in bytes.Buffer
	in.WriteString("*nat\n")
	for _, r := range rules {
		in.WriteString(r)
		in.WriteByte('\n')
	}
	in.WriteString("COMMIT\n")
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "iptables-restore", "--noflush", "-w", "10")
	cmd.Stdin = &in
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("iptables-restore: %w: %s", err, bytes.TrimSpace(out))
	}
	return nil
}

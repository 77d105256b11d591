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
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
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
	lock string
}

// New checks that iptables-save and iptables-restore are there (every change is one save
// and one restore; go-iptables, which runs one iptables command per rule, cannot make a
// change atomic). lock is the file that serialises changes between plugin processes, so
// that removing the last mapping's chains cannot race with adding a new one.
func New(lock string) (*Table, error) {
	for _, bin := range []string{"iptables-save", "iptables-restore"} {
		if _, err := exec.LookPath(bin); err != nil {
			return nil, fmt.Errorf("iptables: %w", err)
		}
	}
	return &Table{lock: lock}, nil
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

// Every change is one iptables-restore transaction computed from one iptables-save: the
// chains, jumps and masquerade a mapping needs are created with it, and removed with the
// last mapping, in the same transaction. A plugin killed at any point therefore leaves the
// nat table as it was before or after the change, never half set up or half torn down.

func (t *Table) add(ctx context.Context, rules []string) error {
	st, err := readState(ctx)
	if err != nil {
		return err
	}
	return restore(ctx, append(st.setup(), rules...))
}

// jumps are the node-level rules that lead to the host-port chains (and the masquerade
// for hairpin traffic), as iptables-save prints them.
var jumps = []struct {
	key, line string
}{
	{"PREROUTING", `-A PREROUTING -m addrtype --dst-type LOCAL -m comment --comment "netagent host ports" -j ` + Chain},
	{"OUTPUT", `-A OUTPUT -m addrtype --dst-type LOCAL -m comment --comment "netagent host ports" -j ` + Chain},
	{"POSTROUTING", `-A POSTROUTING -m comment --comment "netagent host ports" -j ` + PostChain},
	{"MASQ", "-A " + PostChain + " -m mark --mark " + MasqMark + " -j MASQUERADE"},
}

// natState is what the nat table holds of ours.
type natState struct {
	chains map[string]bool     // our chains that exist
	jumps  map[string][]string // jump key -> the rules as saved (normally one)
	rules  []string            // the rules in Chain, as saved
}

// readState reads the nat table once.
func readState(ctx context.Context) (natState, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "iptables-save", "-t", "nat").Output()
	if err != nil {
		return natState{}, fmt.Errorf("iptables-save -t nat: %w", err)
	}
	return parseState(string(out)), nil
}

func parseState(saved string) natState {
	st := natState{chains: map[string]bool{}, jumps: map[string][]string{}}
	for _, line := range strings.Split(saved, "\n") {
		switch {
		case strings.HasPrefix(line, ":"+Chain+" "):
			st.chains[Chain] = true
		case strings.HasPrefix(line, ":"+PostChain+" "):
			st.chains[PostChain] = true
		case strings.HasPrefix(line, "-A "+Chain+" "):
			st.rules = append(st.rules, line)
		case strings.HasPrefix(line, "-A PREROUTING ") && strings.HasSuffix(line, " -j "+Chain):
			st.jumps["PREROUTING"] = append(st.jumps["PREROUTING"], line)
		case strings.HasPrefix(line, "-A OUTPUT ") && strings.HasSuffix(line, " -j "+Chain):
			st.jumps["OUTPUT"] = append(st.jumps["OUTPUT"], line)
		case strings.HasPrefix(line, "-A POSTROUTING ") && strings.HasSuffix(line, " -j "+PostChain):
			st.jumps["POSTROUTING"] = append(st.jumps["POSTROUTING"], line)
		case strings.HasPrefix(line, "-A "+PostChain+" ") && strings.HasSuffix(line, " -j MASQUERADE"):
			st.jumps["MASQ"] = append(st.jumps["MASQ"], line)
		}
	}
	return st
}

// setup is what creates the missing chains and jumps (nothing when all are there).
func (st natState) setup() []string {
	var out []string
	for _, c := range []string{Chain, PostChain} {
		if !st.chains[c] {
			out = append(out, ":"+c+" - [0:0]") // declares a missing chain (an existing one would be flushed)
		}
	}
	for _, j := range jumps {
		if _, ok := st.jumps[j.key]; !ok {
			out = append(out, j.line)
		}
	}
	return out
}

// teardown is what removes every jump and chain there is.
func (st natState) teardown() []string {
	var out []string
	for _, j := range jumps[:3] { // the masquerade goes with its chain
		for _, line := range st.jumps[j.key] { // every copy: one left would keep the chain in use
			out = append(out, "-D"+strings.TrimPrefix(line, "-A"))
		}
	}
	for _, c := range []string{Chain, PostChain} {
		if st.chains[c] {
			out = append(out, "-F "+c, "-X "+c)
		}
	}
	return out
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
	st, err := readState(context.Background())
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var out []string
	for _, r := range st.rules {
		if tag := tagOf(r); tag != "" && !seen[tag] {
			seen[tag] = true
			out = append(out, tag)
		}
	}
	return out, nil
}

func (t *Table) delWhere(ctx context.Context, del func(tag string) bool) (tags []string, err error) {
	err = t.locked(func() error {
		tags, err = t.delLocked(ctx, del)
		return err
	})
	return tags, err
}

// delLocked removes the selected attachments' rules, and with the last mapping every
// chain and jump (also ones an interrupted change left behind), in one transaction.
func (t *Table) delLocked(ctx context.Context, del func(tag string) bool) ([]string, error) {
	tags, err := t.delOnce(ctx, del)
	if err != nil {
		// A killed plugin's iptables-restore may still have committed after we read the
		// table (it was past its input when its parent died): read again, once.
		tags, err = t.delOnce(ctx, del)
	}
	return tags, err
}

func (t *Table) delOnce(ctx context.Context, del func(tag string) bool) ([]string, error) {
	st, err := readState(ctx)
	if err != nil {
		return nil, err
	}
	var lines, tags []string
	seen := map[string]bool{}
	kept := 0
	for _, r := range st.rules {
		tag := tagOf(r)
		if tag == "" || !del(tag) {
			kept++ // an untagged rule in our chain is not ours to judge: keep the chain
			continue
		}
		lines = append(lines, "-D"+strings.TrimPrefix(r, "-A"))
		if !seen[tag] {
			seen[tag] = true
			tags = append(tags, tag)
		}
	}
	if kept == 0 {
		// No mapping left: a node whose pods publish nothing carries no host-port rules.
		lines = append(lines, st.teardown()...)
	}
	if len(lines) == 0 {
		return tags, nil
	}
	if err := restore(ctx, lines); err != nil {
		return nil, fmt.Errorf("remove host ports: %w", err)
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
	// Dies with us: a restore that outlives a killed plugin could commit later, under the
	// next plugin's lock.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("iptables-restore: %w: %s", err, bytes.TrimSpace(out))
	}
	return nil
}

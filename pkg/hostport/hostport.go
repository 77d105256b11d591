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
//
// IPv6 is the same design in ip6tables' nat table (a Table made by NewFamily with v6 set),
// where a dual-stack pod's mappings go too: a mapping without a hostIP is published in
// both families, one with a hostIP only in that address's family.
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
		if a.Is4In6() || a.Zone() != "" {
			return fmt.Errorf("hostIP %s: want a plain IPv4 or IPv6 address", a)
		}
	}
	return nil
}

// in reports whether the mapping is published in the family of podIP: every family
// without a hostIP, else the hostIP's.
func (m Mapping) in(podIP netip.Addr) bool {
	if m.HostIP == "" {
		return true
	}
	a, err := netip.ParseAddr(m.HostIP)
	return err == nil && a.Is4() == podIP.Is4()
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

// Rules renders the nat-table rules for one attachment's mappings in podIP's family
// (exported for tests).
func Rules(tag string, podIP netip.Addr, subnet netip.Prefix, ms []Mapping) []string {
	var out []string
	for _, m := range ms {
		if !m.in(podIP) {
			continue
		}
		match := fmt.Sprintf("-p %s -m %s --dport %d", m.proto(), m.proto(), m.HostPort)
		if m.HostIP != "" {
			if a, err := netip.ParseAddr(m.HostIP); err == nil && !a.IsUnspecified() {
				match = fmt.Sprintf("-d %s %s", netip.PrefixFrom(a, a.BitLen()), match)
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

// Table programs host ports of one family in the current network namespace.
type Table struct {
	lock string
	cmd  string // "iptables" or "ip6tables": the -save and -restore commands' stem
}

// New checks that iptables-save and iptables-restore are there (every change is one save
// and one restore; go-iptables, which runs one iptables command per rule, cannot make a
// change atomic). lock is the file that serialises changes between plugin processes, so
// that removing the last mapping's chains cannot race with adding a new one.
func New(lock string) (*Table, error) { return NewFamily(lock, false) }

// NewFamily is New for IPv4 or (v6) IPv6, with ip6tables-save and ip6tables-restore.
func NewFamily(lock string, v6 bool) (*Table, error) {
	t := &Table{lock: lock, cmd: "iptables"}
	if v6 {
		t.cmd = "ip6tables"
	}
	for _, bin := range []string{t.cmd + "-save", t.cmd + "-restore"} {
		if _, err := exec.LookPath(bin); err != nil {
			return nil, fmt.Errorf("%s: %w", t.cmd, err)
		}
	}
	return t, nil
}

// Family is "IPv4" or "IPv6".
func (t *Table) Family() string {
	if t.cmd == "ip6tables" {
		return "IPv6"
	}
	return "IPv4"
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
	st, err := t.readState(ctx)
	if err != nil {
		return err
	}
	return t.restore(ctx, append(st.setup(), rules...))
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
func (t *Table) readState(ctx context.Context) (natState, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, t.cmd+"-save", "-t", "nat").Output()
	if err != nil {
		return natState{}, fmt.Errorf("%s-save -t nat: %w", t.cmd, err)
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
	st, err := t.readState(context.Background())
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
	st, err := t.readState(ctx)
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
	if err := t.restore(ctx, lines); err != nil {
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
func (t *Table) restore(ctx context.Context, rules []string) error {
	var in bytes.Buffer
	in.WriteString("*nat\n")
	for _, r := range rules {
		in.WriteString(r)
		in.WriteByte('\n')
	}
	in.WriteString("COMMIT\n")
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, t.cmd+"-restore", "--noflush", "-w", "10")
	cmd.Stdin = &in
	// Dies with us: a restore that outlives a killed plugin could commit later, under the
	// next plugin's lock.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s-restore: %w: %s", t.cmd, err, bytes.TrimSpace(out))
	}
	return nil
}

// Package nat keeps the node-level firewall rules of the pod network: one masquerade for
// pod traffic leaving the cluster network (per node, not per pod), an exemption that keeps
// pod-to-pod source addresses, and FORWARD accepts for cluster traffic that work even when
// the FORWARD policy is DROP.
//
// On a Docker host (route mode) the FORWARD accepts are narrow and come after Docker's own
// gatekeepers: only traffic between the cluster network and this host's subnet is accepted
// (what Docker's DOCKER chain would drop as "unpublished" when it comes from a peer), and
// the jump sits right below the jumps to DOCKER-USER and DOCKER-ISOLATION-STAGE-1, so an
// admin's DOCKER-USER rules and Docker's network isolation see every packet first.
// Everything else (underlay hosts, other Docker networks) keeps Docker's own behaviour.
//
// The rules live in netagent's own chains, rewritten whole in one iptables-restore
// transaction when they differ from the plan; the jumps into them are kept first in their
// built-in chains, or in the Docker case right below Docker's (a firewall that inserts its
// own rules above ours is put back below).
// Reading the state is one iptables-save; Sync with nothing to change writes nothing.
//
// IPv6 (plan.NAT.Network6 set) gets the same chains through ip6tables, the masquerade only
// where the config asks for it (ipv6Masquerade); ip6tables is not run at all in a cluster
// without IPv6.
package nat

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"time"

	"github.com/netagent/netagent/pkg/plan"
)

// Chain names.
const (
	PostChain = "NETAGENT-POSTRTG"
	FwdChain  = "NETAGENT-FWD"
)

// table is our chain in one iptables table and the built-in chain that jumps to it.
type table struct {
	name  string
	hook  string   // built-in chain that jumps to ours, first
	chain string   // our chain
	rules []string // our chain's rules, in iptables-save's canonical form, without "-A CHAIN "
	// below: the jump goes right below a leading run of jumps to these chains instead of
	// first (Docker hosts).
	below map[string]bool
}

// dockerFirst are the chains whose jumps stay above ours in FORWARD on a Docker host: the
// admin's, and Docker's network isolation (Docker 20.10 puts both first; Docker 28 has
// DOCKER-USER then DOCKER-FORWARD, whose DOCKER chain drops unpublished traffic, so ours
// goes between them).
var dockerFirst = map[string]bool{"DOCKER-USER": true, "DOCKER-ISOLATION-STAGE-1": true}

// family is what the rules of one IP family are made from.
type family struct {
	network, subnet netip.Prefix
	masquerade      bool
	multicast       string // the family's multicast range: never masqueraded
	final           bool   // plan.NAT.Final
}

// families are the plan's families: IPv4 always (with no network its chains are empty),
// IPv6 only when the cluster has it.
func families(n plan.NAT) []family {
	out := []family{{network: n.Network, subnet: n.Subnet, masquerade: true, multicast: "224.0.0.0/4", final: n.Final}}
	if n.Network6.IsValid() {
		out = append(out, family{network: n.Network6, subnet: n.Subnet6, masquerade: n.Masquerade6, multicast: "ff00::/8", final: n.Final})
	}
	return out
}

// desired renders the rules of one family.
func desired(n family) []table {
	if !n.network.IsValid() || !n.subnet.IsValid() {
		return []table{{name: "nat", hook: "POSTROUTING", chain: PostChain}, {name: "filter", hook: "FORWARD", chain: FwdChain}}
	}
	fwd := table{name: "filter", hook: "FORWARD", chain: FwdChain, rules: []string{
		fmt.Sprintf("-s %s -j ACCEPT", n.network),
		fmt.Sprintf("-d %s -j ACCEPT", n.network),
	}}
	if n.final {
		fwd.below = dockerFirst
		fwd.rules = []string{
			// Within this host's subnet Docker decides (icc, its own accepts).
			fmt.Sprintf("-s %s -d %s -j RETURN", n.subnet, n.subnet),
			fmt.Sprintf("-s %s -d %s -j ACCEPT", n.network, n.subnet),
			fmt.Sprintf("-s %s -d %s -j ACCEPT", n.subnet, n.network),
		}
	}
	postrouting := []string{
		fmt.Sprintf("-s %s -d %s -m comment --comment \"netagent:pod-to-pod\" -j %s", n.network, n.network, exempt(n.final)),
	}
	if n.masquerade {
		postrouting = append(postrouting,
			fmt.Sprintf("-s %s ! -d %s -m comment --comment \"netagent:pod-egress\" -j MASQUERADE --random-fully", n.subnet, n.multicast))
	}
	return []table{
		{name: "nat", hook: "POSTROUTING", chain: PostChain, rules: postrouting},
		// No comments in fwd: the filter rules see every forwarded packet, and iptables-nft
		// evaluates "-m comment" per packet through the xtables compatibility layer
		// (BENCHMARKS.md, throughput); the chain's name says whose they are.
		fwd,
	}
}

// slot is the index in hook (without our jumps) where t's jump belongs: first, or right
// below the last jump to one of t.below (rules someone puts above those stay above ours).
func slot(t table, hook []string) int {
	at := 0
	for i, r := range hook {
		if c, ok := strings.CutPrefix(r, "-j "); ok && t.below[c] {
			at = i + 1
		}
	}
	return at
}

// ForwardSlot is the index in FORWARD's rules (iptables -S without "-A FORWARD ", and
// without our jump) where netagent's jump belongs; docker is route mode (plan.NAT.Final).
func ForwardSlot(rules []string, docker bool) int {
	t := table{}
	if docker {
		t.below = dockerFirst
	}
	return slot(t, rules)
}

func exempt(final bool) string {
	if final {
		return "ACCEPT"
	}
	return "RETURN"
}

// jump is the rule in t.hook that enters our chain. The nat table's is commented (nat
// chains see a connection's first packet only); the filter table's is not (see desired).
func jump(t table) string {
	if t.name == "filter" {
		return "-j " + t.chain
	}
	return fmt.Sprintf("-m comment --comment netagent -j %s", t.chain)
}

// jumps returns the rules of hook that enter t's chain, whatever their matches: the
// canonical one, duplicates, and older forms (the commented FORWARD jump of versions
// before 2026-12) that an upgrade must replace.
func jumps(hook []string, t table) []string {
	var out []string
	for _, r := range hook {
		if r == "-j "+t.chain || strings.HasSuffix(r, " -j "+t.chain) {
			out = append(out, r)
		}
	}
	return out
}

// Stats tells what a Sync changed.
type Stats struct {
	ChainsRewritten int
	JumpsFixed      int
}

// Changed reports whether Sync wrote anything.
func (s Stats) Changed() bool { return s.ChainsRewritten+s.JumpsFixed > 0 }

// Runner runs iptables-save / iptables-restore, or with v6 ip6tables-save /
// ip6tables-restore (in the current network namespace).
type Runner interface {
	// Save dumps every table (one exec for both of ours: each costs milliseconds, and the
	// first pass after a restart is on the way to ready).
	Save(ctx context.Context, v6 bool) (string, error)
	Restore(ctx context.Context, v6 bool, input string) error
}

// Exec is the Runner that executes the iptables binaries.
type Exec struct{}

// Binary is the iptables command of a family ("iptables" or "ip6tables").
func Binary(v6 bool) string {
	if v6 {
		return "ip6tables"
	}
	return "iptables"
}

// Save runs iptables-save.
func (Exec) Save(ctx context.Context, v6 bool) (string, error) {
	out, err := exec.CommandContext(ctx, Binary(v6)+"-save").Output()
	if err != nil {
		return "", fmt.Errorf("%s-save: %w", Binary(v6), err)
	}
	return string(out), nil
}

// Restore feeds input to iptables-restore --noflush.
func (Exec) Restore(ctx context.Context, v6 bool, input string) error {
	cmd := exec.CommandContext(ctx, Binary(v6)+"-restore", "--noflush", "-w", "5")
	cmd.Stdin = strings.NewReader(input)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s-restore: %w: %s", Binary(v6), err, bytes.TrimSpace(out))
	}
	return nil
}

// Reconciler owns netagent's NAT and FORWARD chains.
type Reconciler struct {
	run Runner
}

// New returns a reconciler using run.
func New(run Runner) *Reconciler { return &Reconciler{run: run} }

// Sync makes the chains of every family of the plan match it.
func (r *Reconciler) Sync(ctx context.Context, n plan.NAT) (Stats, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var st Stats
	var errs []error
	for i, f := range families(n) {
		s, err := r.sync(ctx, i == 1, f)
		st.ChainsRewritten += s.ChainsRewritten
		st.JumpsFixed += s.JumpsFixed
		if err != nil {
			errs = append(errs, err)
		}
	}
	return st, errors.Join(errs...)
}

// sync makes the chains of one family match f.
func (r *Reconciler) sync(ctx context.Context, v6 bool, f family) (Stats, error) {
	var st Stats
	var in strings.Builder
	all, err := r.run.Save(ctx, v6)
	if err != nil {
		return st, err
	}
	tables := parse(all)
	for _, t := range desired(f) {
		cur := tables[t.name]
		var tb strings.Builder
		rewrite := !cur.chains[t.chain] || !equal(cur.rules[t.chain], t.rules)
		if rewrite {
			// Declaring the chain in --noflush mode flushes it: a whole-chain rewrite in the
			// same transaction as its new rules.
			fmt.Fprintf(&tb, ":%s - [0:0]\n", t.chain)
			for _, rule := range t.rules {
				fmt.Fprintf(&tb, "-A %s %s\n", t.chain, rule)
			}
			st.ChainsRewritten++
		}
		j := jump(t)
		hook := cur.rules[t.hook]
		ours := jumps(hook, t)
		at := slot(t, without(hook, ours))
		if len(ours) != 1 || at >= len(hook) || hook[at] != j {
			for _, r := range ours {
				fmt.Fprintf(&tb, "-D %s %s\n", t.hook, r)
			}
			fmt.Fprintf(&tb, "-I %s %d %s\n", t.hook, at+1, j)
			st.JumpsFixed++
		}
		if tb.Len() > 0 {
			fmt.Fprintf(&in, "*%s\n%sCOMMIT\n", t.name, tb.String())
		}
	}
	if in.Len() == 0 {
		return st, nil
	}
	if err := r.run.Restore(ctx, v6, in.String()); err != nil {
		return Stats{}, err
	}
	return st, nil
}

// Remove deletes the jumps and chains of both families (netagent cleanup); a host without
// ip6tables has none of IPv6 to remove.
func (r *Reconciler) Remove(ctx context.Context) error {
	err := r.remove(ctx, false)
	if _, lerr := exec.LookPath(Binary(true) + "-save"); lerr == nil {
		err = errors.Join(err, r.remove(ctx, true))
	}
	return err
}

func (r *Reconciler) remove(ctx context.Context, v6 bool) error {
	var in strings.Builder
	all, err := r.run.Save(ctx, v6)
	if err != nil {
		return err
	}
	tables := parse(all)
	for _, t := range desired(family{}) {
		cur := tables[t.name]
		var tb strings.Builder
		for _, r := range jumps(cur.rules[t.hook], t) {
			fmt.Fprintf(&tb, "-D %s %s\n", t.hook, r)
		}
		if cur.chains[t.chain] {
			fmt.Fprintf(&tb, "-F %s\n-X %s\n", t.chain, t.chain)
		}
		if tb.Len() > 0 {
			fmt.Fprintf(&in, "*%s\n%sCOMMIT\n", t.name, tb.String())
		}
	}
	if in.Len() == 0 {
		return nil
	}
	return r.run.Restore(ctx, v6, in.String())
}

// without returns rules minus drop (iptables-save prints a chain's rules in order).
func without(rules, drop []string) []string {
	out := make([]string, 0, len(rules))
	for _, r := range rules {
		if !slices.Contains(drop, r) {
			out = append(out, r)
		}
	}
	return out
}

type saved struct {
	chains map[string]bool
	rules  map[string][]string // chain -> rules without "-A CHAIN "
}

// parse splits iptables-save output by table ("*nat" ... "COMMIT"); a table that is not
// there yet reads as empty.
func parse(s string) map[string]saved {
	out := map[string]saved{}
	empty := func() saved { return saved{chains: map[string]bool{}, rules: map[string][]string{}} }
	for _, name := range []string{"nat", "filter"} {
		out[name] = empty()
	}
	cur := empty()
	for _, line := range strings.Split(s, "\n") {
		switch {
		case strings.HasPrefix(line, "*"):
			cur = empty()
			out[strings.TrimSpace(line[1:])] = cur
		case strings.HasPrefix(line, ":"):
			if f := strings.Fields(line[1:]); len(f) > 0 {
				cur.chains[f[0]] = true
			}
		case strings.HasPrefix(line, "-A "):
			f := strings.SplitN(line[3:], " ", 2)
			rule := ""
			if len(f) == 2 {
				rule = f[1]
			}
			cur.rules[f[0]] = append(cur.rules[f[0]], rule)
		}
	}
	return out
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

package crash_test

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/hostport"
)

// TestHostPortsAfterKilledSetupOrTeardown aims the kills at the host-port chains: on a node
// where no pod publishes a port, the ADD of a pod with a host port creates
// NETAGENT-HOSTPORTS, NETAGENT-HP-POSTROUTING and the jumps to them (several iptables
// runs), and its DEL removes them again. Each trial kills that ADD (or that DEL) at a
// random point and wires a new pod with a host port, as the runtime keeps doing, either
// before or after the runtime's DEL of the crashed pod; the new pod's host port must work
// from the node and from another pod, and once the crashed pod's DEL and then the new
// pod's DEL are done nothing may be left.
func TestHostPortsAfterKilledSetupOrTeardown(t *testing.T) {
	n := newNode(t)
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 0x6870))
	trials := 24
	if testing.Short() {
		trials = 8
	}
	other := n.newPod("other", 0)
	n.mustAdd(other)
	addTook, delTook := n.measure(29999, false)
	t.Logf("normal ADD with a host port %s, DEL %s (first and last mapping on the node: chains created and removed)", addTook.Round(time.Microsecond), delTook.Round(time.Microsecond))

	port := 30000
	var killed, broken, leaky int
	phases := map[string]int{}
	var failures []string
	for i := range trials {
		command := []string{"ADD", "DEL"}[i%2]
		recoverFirst := i%4 >= 2 // the runtime's DEL of the crashed pod comes before the next pod's ADD
		port++
		p := n.newPod(fmt.Sprintf("crashed-%d", i), port)
		took := addTook
		if command == "DEL" {
			n.mustAdd(p)
			took = delTook
		}
		k, phase := n.killDuring(command, p, uniform(rng, took*12/10))
		if k {
			killed++
		}
		phases[command+": "+phase]++
		what := fmt.Sprintf("trial %d, %s killed (%s)", i, command, phase)
		recoverCrashed := func(live ...*pod) {
			failed, err := n.delRetry(p)
			if err != nil {
				t.Errorf("DEL %s: %v", p.id, err)
			}
			if len(failed) > 0 {
				failures = append(failures, what+", its DEL: "+strings.Join(failed, "; "))
			}
			if f := cleanPod(p); len(f) > 0 {
				failures = append(failures, what+": "+strings.Join(f, "; "))
			}
			n.remove(p)
			if f := n.leaks(append(live, other)); len(f) > 0 {
				leaky++
				failures = append(failures, what+", after its DEL: "+strings.Join(f, "; "))
			}
		}
		if recoverFirst {
			recoverCrashed()
		}
		port++
		q := n.newPod(fmt.Sprintf("next-%d", i), port)
		n.mustAdd(q)
		q.ns.Serve(t, 80, func(string) string { return q.id })
		if f := n.hostPortsWork(other, []*pod{q}); len(f) > 0 {
			broken++
			hp := n.hostPorts()
			failures = append(failures, fmt.Sprintf("%s, then the next pod's ADD: %s; host-port chains %v, %d jumps to them, masquerade rules %d",
				what, strings.Join(f, "; "), hp.chains, hp.jumps, hp.other))
		}
		if !recoverFirst {
			recoverCrashed(q)
		}
		failed, err := n.delRetry(q)
		if err != nil {
			t.Errorf("DEL %s: %v", q.id, err)
		}
		if len(failed) > 0 {
			failures = append(failures, what+", the next pod's DEL: "+strings.Join(failed, "; "))
		}
		n.remove(q)
		if f := n.leaks([]*pod{other}); len(f) > 0 {
			leaky++
			failures = append(failures, what+", after the next pod's DEL: "+strings.Join(f, "; "))
		}
	}
	t.Logf("%d trials, %d kills landed mid-operation (%v); the next pod's host port was broken after %d, leaks or incomplete chains after %d",
		trials, killed, phases, broken, leaky)
	if len(failures) > 0 {
		t.Errorf("a killed ADD or DEL of a host-port pod left the host ports broken or leaking:\n%s", strings.Join(failures, "\n"))
	}
}

// The states a kill leaves in the middle of the host-port chain setup (the first mapping on
// a node: both chains, then the three jumps, then the masquerade) or teardown (the last
// one: the jumps, then each chain), most of them seen in the kill trials above, rebuilt
// here with the plugin's own iptables rules so that each case is exact and quick.
var (
	preroutingJump  = []string{"PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-m", "comment", "--comment", "netagent host ports", "-j", hostport.Chain}
	outputJump      = []string{"OUTPUT", "-m", "addrtype", "--dst-type", "LOCAL", "-m", "comment", "--comment", "netagent host ports", "-j", hostport.Chain}
	postroutingJump = []string{"POSTROUTING", "-m", "comment", "--comment", "netagent host ports", "-j", hostport.PostChain}
	masquerade      = []string{hostport.PostChain, "-m", "mark", "--mark", hostport.MasqMark, "-j", "MASQUERADE"}
)

func iptablesNAT(t *testing.T, n *node, cmds ...[]string) {
	t.Helper()
	for _, c := range cmds {
		n.ns.MustRun(t, "iptables", append([]string{"-t", "nat"}, c...)...)
	}
}

// TestHostPortsAfterInterruptedChainChanges: after a kill left the host-port chains half
// made or half removed, the next pod's host port must work, DELs must succeed at the
// first attempt, and once no pod publishes a port no chain may be left.
func TestHostPortsAfterInterruptedChainChanges(t *testing.T) {
	for _, c := range []struct {
		name  string
		state [][]string
	}{
		{"setup killed after creating " + hostport.Chain, [][]string{{"-N", hostport.Chain}}},
		{"setup killed after creating both chains", [][]string{{"-N", hostport.Chain}, {"-N", hostport.PostChain}}},
		{"setup killed after the PREROUTING jump", [][]string{{"-N", hostport.Chain}, {"-N", hostport.PostChain}, append([]string{"-A"}, preroutingJump...)}},
		{"setup killed before the masquerade rule", [][]string{{"-N", hostport.Chain}, {"-N", hostport.PostChain},
			append([]string{"-A"}, preroutingJump...), append([]string{"-A"}, outputJump...), append([]string{"-A"}, postroutingJump...)}},
		{"teardown killed after removing the jumps", [][]string{{"-N", hostport.Chain}, {"-N", hostport.PostChain}, append([]string{"-A"}, masquerade...)}},
	} {
		t.Run(c.name+", then a pod publishes a port", func(t *testing.T) {
			n := newNode(t)
			other := n.newPod("other", 0)
			n.mustAdd(other)
			iptablesNAT(t, n, c.state...)
			q := n.newPod("next", 31000)
			n.mustAdd(q)
			q.ns.Serve(t, 80, func(string) string { return q.id })
			for _, f := range slices.Concat(n.hostPortsWork(other, []*pod{q}), n.leaks([]*pod{other, q})) {
				t.Error(f)
			}
			failed, err := n.delRetry(q)
			if err != nil {
				t.Fatalf("DEL %s: %v", q.id, err)
			}
			for _, f := range slices.Concat(failed, n.leaks([]*pod{other})) {
				t.Error(f)
			}
		})
	}
	// The teardown removes the jumps, then NETAGENT-HOSTPORTS, then NETAGENT-HP-POSTROUTING;
	// killed between the last two, the DEL is retried (or GC runs) for an attachment
	// whose rules are already gone.
	for _, recovery := range []string{"DEL", "GC"} {
		t.Run("teardown killed after removing "+hostport.Chain+", then "+recovery, func(t *testing.T) {
			n := newNode(t)
			other := n.newPod("other", 0)
			n.mustAdd(other)
			p := n.newPod("crashed", 31000)
			n.mustAdd(p)
			out := n.ns.MustRun(t, "iptables", "-t", "nat", "-S", hostport.Chain)
			for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
				if strings.HasPrefix(l, "-A ") {
					n.ns.MustRun(t, "sh", "-c", "iptables -t nat -D"+strings.TrimPrefix(l, "-A"))
				}
			}
			iptablesNAT(t, n, append([]string{"-D"}, preroutingJump...), append([]string{"-D"}, outputJump...),
				append([]string{"-D"}, postroutingJump...), []string{"-X", hostport.Chain})
			if recovery == "DEL" {
				failed, err := n.delRetry(p)
				if err != nil {
					t.Fatalf("DEL %s: %v", p.id, err)
				}
				for _, f := range failed {
					t.Error(f)
				}
			} else if err := n.gc([]*pod{other}); err != nil {
				t.Fatalf("GC: %v", err)
			}
			for _, f := range n.leaks([]*pod{other}) {
				t.Error(f)
			}
		})
	}
}

package crash_test

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/antispoof"
	"github.com/netagent/netagent/pkg/ipam"
	"github.com/netagent/netagent/test/netns"
)

// tally counts what the trials did, for the log.
type tally struct {
	trials, killed                  map[string]int            // by CNI command
	phases                          map[string]map[string]int // by command, where the kill landed
	interleaved, delRetried, gcRuns int
}

// TestPluginKilledDuringADDAndDEL kills netagent-cni at random points of ADD and of DEL:
// the delay after exec is drawn uniformly from 0 to 1.2x the duration of a normal ADD (or
// DEL) measured first on the same node. Trials run in batches; half of the batches recover
// as a runtime does after each failure (DEL, retried), the other half with one CNI GC (spec
// 1.1, cni.dev/valid-attachments listing the pods that should live). After every batch
// nothing of a dead attachment may be left: no address in the store, no host veth, no
// interface in its pod namespace, no host-port rule; the store must stay readable and the
// surviving pods must still reach each other and the gateway. Between crashes, a new
// container's ADD must get an address no live attachment has.
//
// CRASH_SEED=<n> repeats a run's random draws (the seed is logged).
func TestPluginKilledDuringADDAndDEL(t *testing.T) {
	batches, perBatch := 12, 13 // 156 ADD kills and 156 DEL kills
	if testing.Short() {
		batches, perBatch = 4, 5
	}
	killAndRecover(t, newNode(t), batches, perBatch)
}

// TestPluginKilledDuringDualStackADDAndDEL is TestPluginKilledDuringADDAndDEL on a
// dual-stack network (fewer trials: the plugin's steps are the same, with an IPv6 address,
// route, anti-spoofing entries and host-port rules more): nothing of either family leaks,
// no address of either family is handed out twice, and survivors keep both.
func TestPluginKilledDuringDualStackADDAndDEL(t *testing.T) {
	batches, perBatch := 4, 8
	if testing.Short() {
		batches, perBatch = 2, 4
	}
	killAndRecover(t, newNodeFamily(t, true), batches, perBatch)
}

func killAndRecover(t *testing.T, n *node, batches, perBatch int) {
	begin := time.Now()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("CRASH_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("CRASH_SEED=%q: %v", s, err)
		}
	}
	t.Logf("seed %d (CRASH_SEED=%d repeats these draws)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, 0x6e6574))

	seq, port := 0, 20000
	id := func(kind string) string { seq++; return fmt.Sprintf("%s-%04d", kind, seq) }
	somePort := func() int { // a third of the attachments publish a host port
		if rng.IntN(3) != 0 {
			return 0
		}
		port++
		return port
	}

	// Survivors live through every batch. They publish no host port, so the host-port
	// chains must go away whenever the last crashed or new pod that had one is gone.
	var survivors []*pod
	for range 3 {
		p := n.newPod(id("survivor"), 0)
		n.mustAdd(p)
		survivors = append(survivors, p)
	}

	// A normal ADD's and DEL's duration. With a host port, the first mapping on the node
	// creates the chains and the last one removes them, which takes far longer than adding
	// next to other mappings, so each trial's delay is drawn for what its plugin has to do.
	addTook, delTook := map[string]time.Duration{}, map[string]time.Duration{}
	addTook[noPort], delTook[noPort] = n.measure(0, false)
	addTook[firstPort], delTook[firstPort] = n.measure(19999, false)
	addTook[nextPort], delTook[nextPort] = n.measure(19999, true)
	for _, v := range []string{noPort, firstPort, nextPort} {
		t.Logf("normal ADD %s: %s, DEL: %s (medians of 15; kill delays are drawn from 0 to 1.2x these)", v, addTook[v].Round(time.Microsecond), delTook[v].Round(time.Microsecond))
	}

	st := tally{trials: map[string]int{}, killed: map[string]int{}, phases: map[string]map[string]int{"ADD": {}, "DEL": {}}}
	took := map[string]map[string]time.Duration{"ADD": addTook, "DEL": delTook}
	problems := map[string]string{} // what leaked or broke -> where it was first seen
	report := func(where string, ps []string) {
		for _, p := range ps {
			if _, ok := problems[p]; !ok {
				problems[p] = where
			}
		}
	}

	for b := range batches {
		mode := "DEL"
		if b%2 == 1 {
			mode = "GC"
		}
		var pending, fresh []*pod // crashed attachments not yet recovered; new pods added between crashes
		recoverByDEL := func(p *pod) {
			failed, err := n.delRetry(p)
			if err != nil {
				t.Errorf("DEL of %s after its crash failed %d times: %v", p.id, len(failed), err)
			}
			if len(failed) > 0 {
				st.delRetried++
			}
			report(fmt.Sprintf("batch %d, DEL after the crash", b), failed)
			report(fmt.Sprintf("batch %d, DEL after the crash", b), cleanPod(p))
			n.remove(p)
		}
		// A new container right after a crash: its address must differ from every address
		// the store holds for others and from every address any pod namespace carries.
		interleave := func() {
			q := n.newPod(id("new"), somePort())
			n.mustAdd(q)
			if q.port != 0 {
				q.ns.Serve(t, 80, func(string) string { return q.id })
				if n.dual {
					q.ns.Serve6(t, 80, func(string) string { return q.id })
				}
			}
			st.interleaved++
			recs, dups, err := n.records()
			if err != nil {
				t.Fatalf("address store unreadable: %v", err)
			}
			report(fmt.Sprintf("batch %d", b), dups)
			if q.ip == netip.MustParseAddr(gateway) || q.ip6 == netip.MustParseAddr(gateway6) {
				t.Errorf("new container %s got a gateway address", q.id)
			}
			for _, ip := range q.addrs() {
				for k, rec := range recs {
					if k != q.key() && slices.Contains(rec.Addrs(), ip) {
						t.Errorf("new container %s got %s, which the store also holds for %s", q.id, ip, k)
					}
				}
				for _, o := range slices.Concat(survivors, fresh, pending) {
					if _, addrs, err := links(o.ns); err == nil && slices.Contains(addrs, ip) {
						t.Errorf("new container %s got %s, which pod %s still carries", q.id, ip, o.id)
					}
				}
			}
			fresh = append(fresh, q)
		}

		trials := slices.Repeat([]string{"ADD", "DEL"}, perBatch)
		rng.Shuffle(len(trials), func(i, j int) { trials[i], trials[j] = trials[j], trials[i] })
		for _, kind := range trials {
			p := n.newPod(id(strings.ToLower(kind)), somePort())
			if kind == "DEL" {
				n.mustAdd(p)
			}
			killed, phase := n.killDuring(kind, p, uniform(rng, took[kind][n.variant(p)]*12/10))
			st.trials[kind]++
			if killed {
				st.killed[kind]++
			}
			st.phases[kind][phase]++
			pending = append(pending, p)
			if kind == "ADD" && rng.IntN(2) == 0 {
				interleave()
			}
			if mode == "DEL" {
				recoverByDEL(p)
				pending = pending[:0]
			}
		}
		live := slices.Concat(survivors, fresh)
		if mode == "GC" {
			if err := n.gc(live); err != nil {
				t.Errorf("batch %d: GC: %v", b, err)
			}
			st.gcRuns++
			for _, p := range pending {
				report(fmt.Sprintf("batch %d, GC", b), cleanPod(p))
				n.remove(p)
			}
		}
		where := fmt.Sprintf("batch %d (%s recovery)", b, mode)
		report(where, n.leaks(live))
		report(where, n.reach(survivors[0], live))
		report(where, n.hostPortsWork(survivors[0], live))
		for _, q := range fresh {
			failed, err := n.delRetry(q)
			if err != nil {
				t.Errorf("DEL %s: %v", q.id, err)
			}
			report(where+", DEL of the new pods", failed)
			report(where+", DEL of the new pods", cleanPod(q))
			n.remove(q)
		}
		report(where+", after the new pods' DEL", n.leaks(survivors))
	}
	for _, p := range survivors {
		failed, err := n.delRetry(p)
		if err != nil {
			t.Errorf("DEL %s: %v", p.id, err)
		}
		report("the survivors' DEL", failed)
	}
	report("after the survivors' DEL", n.leaks(nil))

	for _, c := range []string{"ADD", "DEL"} {
		t.Logf("%s: %d trials, %d killed mid-operation (the rest had exited before the kill): %s", c, st.trials[c], st.killed[c], phases(st.phases[c]))
	}
	t.Logf("recovery: %d batches by DEL (%d DELs needed a retry), %d by one GC each; %d new containers added between crashes",
		batches-st.gcRuns, st.delRetried, st.gcRuns, st.interleaved)
	t.Logf("distinct leaks or breakages found: %d; took %s", len(problems), time.Since(begin).Round(time.Second))
	if len(problems) > 0 {
		var lines []string
		for p, where := range problems {
			lines = append(lines, fmt.Sprintf("%s (first seen %s)", p, where))
		}
		sort.Strings(lines)
		t.Errorf("after the crashes and the recovery:\n%s", strings.Join(lines, "\n"))
	}
}

func phases(m map[string]int) string {
	var out []string
	for p, c := range m {
		out = append(out, fmt.Sprintf("%d %s", c, p))
	}
	sort.Slice(out, func(i, j int) bool {
		a, _ := strconv.Atoi(strings.Fields(out[i])[0])
		b, _ := strconv.Atoi(strings.Fields(out[j])[0])
		return a > b
	})
	return strings.Join(out, "; ")
}

// What a plugin run has to do, for its expected duration.
const (
	noPort    = "without a host port"
	firstPort = "with the first (DEL: last) host port on the node"
	nextPort  = "with a host port next to others"
)

// variant tells which of those p's ADD or DEL is, from the node's rules now.
func (n *node) variant(p *pod) string {
	if p.port == 0 {
		return noPort
	}
	for tag := range n.hostPorts().tags {
		if tag != p.tag() {
			return nextPort
		}
	}
	return firstPort
}

// measure returns the median durations of a normal ADD and DEL (from exec to exit) of a pod
// with host port port (0: none), after a warm-up; with others, next to another pod that
// publishes a port.
func (n *node) measure(port int, others bool) (add, del time.Duration) {
	n.t.Helper()
	if others {
		o := n.newPod(fmt.Sprintf("measure-other-%d", port), port+1000)
		n.mustAdd(o)
		defer func() {
			if _, err := n.delRetry(o); err != nil {
				n.t.Fatal(err)
			}
			n.remove(o)
		}()
	}
	var adds, dels []time.Duration
	for i := range 18 {
		p := n.newPod(fmt.Sprintf("measure-%d-%v-%d", port, others, i), port)
		a := n.mustAdd(p)
		r, err := n.del(p)
		if err != nil {
			n.t.Fatalf("DEL %s: %v", p.id, err)
		}
		n.remove(p)
		if i >= 3 {
			adds, dels = append(adds, a), append(dels, r.took)
		}
	}
	return median(adds), median(dels)
}

// killDuring runs ADD or DEL of p and kills the plugin delay after it started. It returns
// whether the kill landed while the plugin was running, and where (from what it left).
func (n *node) killDuring(command string, p *pod, delay time.Duration) (killed bool, phase string) {
	n.t.Helper()
	n.exec.command, n.exec.delay = command, delay
	var r run
	var err error
	if command == "ADD" {
		r, err = n.add(p)
	} else {
		r, err = n.del(p)
	}
	n.exec.command = ""
	switch {
	case r.killed && command == "ADD":
		return true, n.addPhase(p)
	case r.killed:
		return true, n.delPhase(p)
	case err != nil:
		n.t.Errorf("%s %s failed without being killed: %v", command, p.id, err)
		return false, "failed without being killed"
	}
	return false, "completed before the kill"
}

// addPhase says, from what a killed ADD left, where the kill landed.
func (n *node) addPhase(p *pod) string {
	recs, _, err := n.records()
	if err != nil {
		return "store unreadable: " + err.Error()
	}
	_, rec := recs[p.key()]
	veth := slices.Contains(n.hostVeths(), p.veth())
	names, addrs, _ := links(p.ns)
	configured := len(addrs) == 1+btoi(n.dual) && n.hasDefaultRoutes(p.ns)
	ports := n.hostPorts().tags[p.tag()] > 0 && (!n.dual || n.hostPortsIn("ip6tables-save").tags[p.tag()] > 0)
	switch {
	case !rec && !veth && len(names) == 0:
		return "before the address was recorded"
	case rec && !veth && len(names) == 0:
		return "address recorded, before the veth"
	case rec && veth && !configured:
		return "while configuring the pod end"
	case rec && veth && !n.hasEntries(antispoof.EntriesFor(p.veth(), recs[p.key()].Addrs()...)):
		return "pod configured, before its anti-spoofing entry"
	case rec && veth && p.port != 0 && !ports:
		if hp := n.hostPorts(); len(hp.chains) < 2 || hp.jumps < 3 || hp.other < 1 {
			return "while creating the host-port chains"
		}
		return "while adding the host-port rules"
	case rec && veth:
		return "after the work, before exiting"
	}
	return fmt.Sprintf("unexpected state: record %v, veth %v, pod links %v, host port rules %v", rec, veth, names, ports)
}

func (n *node) hasEntries(es []antispoof.Entry) bool {
	entries, err := n.antispoofEntries()
	for _, e := range es {
		if !entries[e.String()] {
			return false
		}
	}
	return err == nil
}

// delPhase says, from what a killed DEL left, where the kill landed.
func (n *node) delPhase(p *pod) string {
	recs, _, err := n.records()
	if err != nil {
		return "store unreadable: " + err.Error()
	}
	_, rec := recs[p.key()]
	veth := slices.Contains(n.hostVeths(), p.veth())
	hp := n.hostPorts()
	ports := hp.tags[p.tag()] > 0
	switch {
	case rec && veth:
		return "before anything was removed"
	case rec && p.port != 0 && ports:
		return "veth removed, before the host port"
	case rec && p.port != 0 && len(hp.tags) == 0 && len(hp.chains)+hp.jumps+hp.other > 0:
		return "host-port rules removed, while removing the chains"
	case rec && !ports:
		return "veth (and host port) removed, before the address and anti-spoofing entry were released"
	case !rec && !veth && !ports:
		return "after the work, before exiting"
	}
	return fmt.Sprintf("unexpected state: record %v, veth %v, host port rules %v", rec, veth, ports)
}

// cleanPod reports interfaces left in a dead attachment's pod namespace.
func cleanPod(p *pod) []string {
	names, _, err := links(p.ns)
	if err != nil {
		return []string{fmt.Sprintf("pod namespace of %s unreadable: %v", p.id, err)}
	}
	if len(names) > 0 {
		return []string{fmt.Sprintf("%s: interfaces %v left in its pod namespace", p.id, names)}
	}
	return nil
}

// leaks compares the node with the live attachments: the store holds exactly their
// addresses, the node exactly their host veths, the anti-spoofing set exactly their
// entries, iptables exactly their host-port rules (and the chains only while one of them
// publishes a port). It first waits for processes
// a killed plugin left behind.
func (n *node) leaks(live []*pod) []string {
	var out []string
	if strays := n.waitNoProcesses(10 * time.Second); len(strays) > 0 {
		out = append(out, fmt.Sprintf("processes still in the node namespace after 10 s: %v", strays))
	}
	recs, dups, err := n.records()
	if err != nil {
		return append(out, fmt.Sprintf("address store unreadable: %v", err))
	}
	out = append(out, dups...)
	want := map[ipam.Key]*pod{}
	veths := map[string]bool{}
	tags := map[string]bool{}
	for _, p := range live {
		want[p.key()] = p
		veths[p.veth()] = true
		if p.port != 0 {
			tags[p.tag()] = true
		}
	}
	for k, rec := range recs {
		if p, ok := want[k]; !ok {
			out = append(out, fmt.Sprintf("addresses %v of dead attachment %s left in the store", rec.Addrs(), k))
		} else if !slices.Equal(rec.Addrs(), p.addrs()) {
			out = append(out, fmt.Sprintf("store holds %v for %s, its ADD returned %v", rec.Addrs(), k, p.addrs()))
		}
	}
	for k := range want {
		if _, ok := recs[k]; !ok {
			out = append(out, fmt.Sprintf("live attachment %s lost its address record", k))
		}
	}
	have := n.hostVeths()
	for _, v := range have {
		if !veths[v] {
			out = append(out, fmt.Sprintf("host veth %s of a dead attachment left on the node", v))
		}
	}
	for v := range veths {
		if !slices.Contains(have, v) {
			out = append(out, fmt.Sprintf("live attachment lost its host veth %s", v))
		}
	}
	entries, err := n.antispoofEntries()
	if err != nil {
		out = append(out, err.Error())
	}
	wantEntries := map[string]bool{}
	for _, p := range live {
		for _, e := range antispoof.EntriesFor(p.veth(), p.addrs()...) {
			wantEntries[e.String()] = true
		}
	}
	for e := range entries {
		if !wantEntries[e] {
			out = append(out, fmt.Sprintf("anti-spoofing entry %q of a dead attachment left in the set", e))
		}
	}
	for e := range wantEntries {
		if !entries[e] {
			out = append(out, fmt.Sprintf("live attachment lost its anti-spoofing entry %q", e))
		}
	}
	saves := []string{"iptables-save"}
	if n.dual {
		saves = append(saves, "ip6tables-save")
	}
	for _, save := range saves {
		out = append(out, n.hostPortLeaks(save, tags)...)
	}
	return out
}

// hostPortLeaks compares the host-port rules in save's nat table with tags, the live
// attachments that publish a port.
func (n *node) hostPortLeaks(save string, tags map[string]bool) []string {
	var out []string
	hp := n.hostPortsIn(save)
	for _, d := range hp.dups {
		out = append(out, save+": duplicate rule: "+d)
	}
	for tag, c := range hp.tags {
		switch {
		case !tags[tag]:
			out = append(out, fmt.Sprintf("%s: %d host-port rules of dead attachment %s left in %v", save, c, tag, hp.chains))
		case c != 2:
			out = append(out, fmt.Sprintf("%s: %d host-port rules for %s, want 2", save, c, tag))
		}
	}
	for tag := range tags {
		if hp.tags[tag] == 0 {
			out = append(out, fmt.Sprintf("%s: live attachment %s lost its host-port rules", save, tag))
		}
	}
	if len(tags) == 0 && (len(hp.chains) > 0 || hp.jumps > 0 || hp.other > 0) {
		out = append(out, fmt.Sprintf("%s: no pod publishes a port, yet host-port chains %v, %d jumps to them and %d untagged rules in them are left", save, hp.chains, hp.jumps, hp.other))
	}
	if len(tags) > 0 && (len(hp.chains) != 2 || hp.jumps != 3 || hp.other != 1) {
		out = append(out, fmt.Sprintf("%s: host-port chains %v with %d jumps and %d untagged rules, want both chains, 3 jumps and 1 masquerade", save, hp.chains, hp.jumps, hp.other))
	}
	return out
}

// hostPortsWork connects to every live pod's host port at the gateway address, from the
// node itself (the OUTPUT jump) and from another pod (the PREROUTING jump, and the
// masquerade that brings the reply back through the node).
func (n *node) hostPortsWork(from *pod, live []*pod) []string {
	var out []string
	for _, p := range live {
		if p.port == 0 {
			continue
		}
		addrs := []string{fmt.Sprintf("%s:%d", gateway, p.port)}
		if n.dual {
			addrs = append(addrs, fmt.Sprintf("[%s]:%d", gateway6, p.port))
		}
		for _, addr := range addrs {
			for _, c := range []struct {
				who string
				ns  *netns.NS
			}{{"the node", n.ns}, {"pod " + from.id, from.ns}} {
				if got, err := fetch(c.ns, addr); err != nil || got != p.id {
					out = append(out, fmt.Sprintf("host port %s of live pod %s does not work from %s: got %q, %v", addr, p.id, c.who, got, err))
				}
			}
		}
	}
	return out
}

// reach pings every live pod and the gateway from one pod, over each family.
func (n *node) reach(from *pod, live []*pod) []string {
	var out []string
	targets := []string{gateway}
	if n.dual {
		targets = append(targets, gateway6)
	}
	for _, p := range live {
		if p != from {
			for _, ip := range p.addrs() {
				targets = append(targets, ip.String())
			}
		}
	}
	for _, ip := range targets {
		if _, err := from.ns.Run("ping", "-c", "1", "-W", "2", "-q", ip); err != nil {
			out = append(out, fmt.Sprintf("%s (%s) cannot reach %s", from.id, from.ip, ip))
		}
	}
	return out
}

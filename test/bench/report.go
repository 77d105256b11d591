package main

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

// The targets netagent-cni is held to, as ratios ours/ref.
const (
	targetAddP50 = 0.15 // at most
	targetDelP50 = 0.10 // at most
	targetTput   = 6.0  // at least
	// targetDualP50 bounds our dual-stack ADD p50 as a ratio to our IPv4-only one.
	targetDualP50 = 1.15 // at most
)

// meta describes the machine and the run, for the record.
type meta struct {
	command, date, kernel, cpu, goVersion, commit, plugins string
	nproc                                                  int
	// Load before and after the run, and namespaces of other processes seen: this is a
	// shared 2-core class of machine, and other tests running alongside skew the numbers.
	loadStart, loadEnd string
	foreignNS          int
}

// loadAvg is the 1, 5 and 15 minute load average.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// foreignNamespaces counts named network namespaces this process did not create.
func foreignNamespaces() int {
	entries, _ := os.ReadDir("/run/netns")
	own := fmt.Sprintf("%s%d-", netns.Prefix, os.Getpid())
	var n int
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), own) {
			n++
		}
	}
	return n
}

func collectMeta(loadStart string, foreignNS int) meta {
	m := meta{
		loadStart: loadStart,
		loadEnd:   loadAvg(),
		foreignNS: foreignNS,
		command:   "go run ./test/bench " + strings.Join(os.Args[1:], " "),
		date:      time.Now().UTC().Format("2006-01-02 15:04 UTC"),
		nproc:     runtime.NumCPU(),
		goVersion: runtime.Version(),
		plugins:   "?",
		cpu:       "?",
		kernel:    "?",
		commit:    "?",
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.kernel = strings.TrimSpace(string(b))
	}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		s := bufio.NewScanner(f)
		for s.Scan() {
			if k, v, ok := strings.Cut(s.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.cpu = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == "github.com/containernetworking/plugins" {
				m.plugins = d.Version
			}
		}
	}
	root := testbin.Root()
	if out, err := exec.Command("git", "-C", root, "rev-parse", "--short", "HEAD").Output(); err == nil {
		m.commit = strings.TrimSpace(string(out))
		if st, err := exec.Command("git", "-C", root, "status", "--porcelain").Output(); err == nil && len(st) > 0 {
			m.commit += " (uncommitted changes)"
		}
	}
	return m
}

// row is one line of the result table; vals follow the columns (ours, ref, floor, bare,
// and ours4 in a dual-stack run); floorRatio is floor/ref, the best ratio a Go plugin
// exec'd per pod reaches here.
type row struct {
	measure    string
	vals       []string
	ratio      string
	floorRatio string
	target     string
	verdict    string
}

// columns are the runners in the table; a dual-stack run adds our plugin on an IPv4-only
// network (ours4), the base of the dual / IPv4-only ratio.
func (r *results) columns() []string {
	if r.opt.family == familyDual {
		if r.opt.floor {
			return []string{"ours", "ref", "floor", "bare", "ours4", "floor4"}
		}
		return []string{"ours", "ref", "floor", "bare", "ours4"}
	}
	return []string{"ours", "ref", "floor", "bare"}
}

// headers are the columns as the tables name them.
func (r *results) headers() []string {
	names := map[string]string{"ours": "netagent-cni", "ref": "reference", "floor": "floor plugin", "bare": "bare netlink", "ours4": "netagent-cni IPv4-only", "floor4": "floor plugin IPv4-only"}
	var out []string
	for _, c := range r.columns() {
		out = append(out, names[c])
	}
	return out
}

func (r *results) rows() []row {
	var rows []row
	cols := r.columns()
	lat := func(op string, m map[string][]time.Duration, target float64) {
		for _, q := range []struct {
			name string
			q    float64
		}{{"p50", 0.50}, {"p90", 0.90}, {"p99", 0.99}} {
			rw := row{measure: fmt.Sprintf("%s %s (seq, n=%d)", op, q.name, r.opt.n), vals: make([]string, len(cols))}
			v := make([]float64, len(cols))
			for i, c := range cols {
				if ds, ok := m[c]; ok {
					v[i] = percentile(ds, q.q).Seconds() * 1000
					rw.vals[i] = fmt.Sprintf("%.2f ms", v[i])
				} else {
					rw.vals[i] = "-"
				}
			}
			ratio := v[0] / v[1]
			rw.ratio = fmtRatio(ratio)
			rw.floorRatio = fmtRatio(v[2] / v[1])
			if q.name == "p50" {
				rw.target = fmt.Sprintf("≤ %.2f", target)
				rw.verdict = verdict(ratio <= target, ratio)
			}
			rows = append(rows, rw)
		}
	}
	lat("ADD", r.add, targetAddP50)
	lat("DEL", r.del, targetDelP50)
	if r.opt.family == familyDual {
		// The same plugin on both networks, so the ratio is ours / ours4, not ours / ref.
		d, v4 := percentile(r.add["ours"], 0.5), percentile(r.add["ours4"], 0.5)
		rw := row{measure: "ADD p50 dual / IPv4-only (ours ÷ ours4; floor ÷ floor4 under floor/ref)", vals: make([]string, len(cols))}
		for i := range rw.vals {
			rw.vals[i] = "-"
		}
		rw.vals[0], rw.vals[slices.Index(cols, "ours4")] = fmt.Sprintf("%.2f ms", ms(d)), fmt.Sprintf("%.2f ms", ms(v4))
		ratio := float64(d) / float64(v4)
		rw.ratio, rw.floorRatio = fmtRatio(ratio), "-"
		if fi := slices.Index(cols, "floor4"); fi >= 0 {
			// The floor's own ratio, in its column (floor ÷ floor4).
			fd, f4 := percentile(r.add["floor"], 0.5), percentile(r.add["floor4"], 0.5)
			rw.vals[slices.Index(cols, "floor")], rw.vals[fi] = fmt.Sprintf("%.2f ms", ms(fd)), fmt.Sprintf("%.2f ms", ms(f4))
			rw.floorRatio = fmtRatio(float64(fd) / float64(f4))
		}
		rw.target = fmt.Sprintf("≤ %.2f", targetDualP50)
		rw.verdict = verdict(ratio <= targetDualP50, ratio)
		rows = append(rows, rw)
	}
	for _, c := range r.opt.conc {
		rw := row{measure: fmt.Sprintf("ADD pods/s (c=%d, %d×%d pods)", c, r.opt.rounds, r.opt.pods), vals: make([]string, len(cols))}
		v := make([]float64, len(cols))
		for i, col := range cols {
			if m, ok := r.tput[col]; ok {
				v[i] = m[c].podsPerSec()
				rw.vals[i] = fmt.Sprintf("%.1f", v[i])
			} else {
				rw.vals[i] = "-"
			}
		}
		ratio := v[0] / v[1]
		rw.ratio = fmtRatio(ratio)
		rw.floorRatio = fmtRatio(v[2] / v[1])
		rw.target = fmt.Sprintf("≥ %.0f", targetTput)
		rw.verdict = verdict(ratio >= targetTput, ratio)
		rows = append(rows, rw)
	}
	return rows
}

func fmtRatio(x float64) string {
	if math.IsNaN(x) || math.IsInf(x, 0) || x == 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.3f", x)
}

func verdict(ok bool, ratio float64) string {
	switch {
	case math.IsNaN(ratio) || math.IsInf(ratio, 0):
		return "n/a"
	case ok:
		return "PASS"
	}
	return "MISS"
}

// percentile is the q-quantile (0 < q ≤ 1) of ds by the nearest-rank method: the smallest
// sample with at least a fraction q of the samples at or below it.
func percentile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	k := int(math.Ceil(q*float64(len(s)))) - 1
	return s[min(max(k, 0), len(s)-1)]
}

func title(r *results) string {
	masq := "ipMasq"
	if !r.opt.refIPMasq {
		masq = "no ipMasq"
	}
	what := "the pod network alone"
	if r.opt.pod {
		what = "whole pods (loopback network + pod network, portMappings passed)"
	}
	if r.opt.family == familyDual {
		return fmt.Sprintf("dual stack: netagent-cni (subnet + ipv6Subnet) vs bridge (isGateway, %s) + host-local (an IPv4 and an IPv6 range) + portmap %s, through libcni, cniVersion 1.0.0, %s", masq, r.opt.refVersion, what)
	}
	return fmt.Sprintf("netagent-cni vs bridge (isGateway, %s) + host-local + portmap %s, through libcni, cniVersion 1.0.0, %s", masq, r.opt.refVersion, what)
}

// notes points out what the numbers cannot show by themselves: a target below the floor
// that the bare kernel work sets, and signs that something else loaded the machine.
func notes(m meta, r *results) []string {
	var out []string
	for _, c := range []struct {
		op     string
		m      map[string][]time.Duration
		target float64
	}{{"ADD", r.add, targetAddP50}, {"DEL", r.del, targetDelP50}} {
		bare, ok := c.m["bare"]
		if !ok {
			continue
		}
		budget := time.Duration(c.target * float64(percentile(c.m["ref"], 0.5)))
		if floor := percentile(bare, 0.5); floor > budget {
			out = append(out, fmt.Sprintf("%s p50 target is below the kernel floor: the bare netlink work alone takes %.2f ms, the target allows %.2f ms (%.2f × ref)",
				c.op, ms(floor), ms(budget), c.target))
		}
	}
	if _, ok := r.add["floor"]; ok {
		for _, c := range []struct {
			op     string
			m      map[string][]time.Duration
			target float64
		}{{"ADD", r.add, targetAddP50}, {"DEL", r.del, targetDelP50}} {
			if ratio := float64(percentile(c.m["floor"], 0.5)) / float64(percentile(c.m["ref"], 0.5)); ratio > c.target {
				out = append(out, fmt.Sprintf("%s p50 target is out of reach for any plugin that is a Go program exec'd per pod here: the floor plugin (the bare kernel work, nothing else) scores %.3f × ref", c.op, ratio))
			}
		}
		for _, c := range r.opt.conc {
			if t := r.tput["floor"][c].podsPerSec() / r.tput["ref"][c].podsPerSec(); t > 0 && t < targetTput {
				out = append(out, fmt.Sprintf("parallel ADD target at c=%d is out of reach for any plugin that is a Go program exec'd per pod here: the floor plugin scores %.2f× ref", c, t))
			}
		}
	}
	if lo, ok := r.add["lo"]; ok {
		ref, lop50 := percentile(r.add["ref"], 0.5), percentile(lo, 0.5)
		out = append(out, fmt.Sprintf("whole pods include the loopback network; its ADD alone takes %.2f ms p50, and a pod's ADD takes at least as long: ours/ref ≥ %.3f even for a plugin that cost nothing",
			ms(lop50), float64(lop50)/float64(ref)))
		for _, c := range r.opt.conc {
			if t := r.tput["lo"][c].podsPerSec(); t > 0 {
				out = append(out, fmt.Sprintf("loopback alone at c=%d: %.1f pods/s, so whole pods can be at most %.2f× the reference's %.1f pods/s even with a plugin that cost nothing",
					c, t, t/r.tput["ref"][c].podsPerSec(), r.tput["ref"][c].podsPerSec()))
			}
		}
	}
	if m.foreignNS > 0 {
		out = append(out, fmt.Sprintf("%d network namespaces of other processes existed during the run: other tests may have loaded the machine", m.foreignNS))
	}
	return out
}

func ms(d time.Duration) float64 { return d.Seconds() * 1000 }

func leakSummary(r *results) []string {
	if len(r.leaks) == 0 {
		return []string{"none (veths, IPAM records, anti-spoofing entries, libcni cache, CNI iptables chains checked after every phase)"}
	}
	return r.leaks
}

func printTable(w io.Writer, m meta, rows []row, r *results) {
	fmt.Fprintln(w, title(r))
	fmt.Fprintf(w, "%s  kernel %s  nproc %d  %s  commit %s\n", m.date, m.kernel, m.nproc, m.goVersion, m.commit)
	fmt.Fprintf(w, "load average %s at start, %s at end\n\n", m.loadStart, m.loadEnd)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "measure\t%s\tours/ref\tfloor/ref\ttarget\t\t\n", strings.Join(r.columns(), "\t"))
	for _, rw := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t\n", rw.measure, strings.Join(rw.vals, "\t"), rw.ratio, rw.floorRatio, rw.target, rw.verdict)
	}
	tw.Flush()
	fmt.Fprintln(w)
	for i, l := range leakSummary(r) {
		if i == 0 {
			fmt.Fprint(w, "leaks: ")
		} else {
			fmt.Fprint(w, "       ")
		}
		fmt.Fprintln(w, l)
	}
	for _, n := range notes(m, r) {
		fmt.Fprintln(w, "note:", n)
	}
}

func writeMarkdown(w io.Writer, m meta, rows []row, r *results) {
	fmt.Fprintf(w, "### CNI plugin: %s\n\n", title(r))
	fmt.Fprintf(w, "- command: `%s` (as root)\n", m.command)
	fmt.Fprintf(w, "- date: %s; commit %s\n", m.date, m.commit)
	fmt.Fprintf(w, "- machine: kernel %s, nproc %d, %s; load average %s at start, %s at end; %s; reference plugins: containernetworking/plugins %s\n",
		m.kernel, m.nproc, m.cpu, m.loadStart, m.loadEnd, m.goVersion, m.plugins)
	fmt.Fprintf(w, "- method: each chain on its own node network namespace, pod namespaces created before timing; "+
		"sequential phases alternate %s pod by pod; parallel phases run %d batches per chain and "+
		"concurrency in ABBA order, pods/s = pods / wall time; %d warm-up pods per chain first\n\n", strings.Join(r.columns(), "/"), r.opt.rounds, r.opt.warmup)
	fmt.Fprintf(w, "| measure | %s | ours/ref | floor/ref | target | |\n", strings.Join(r.headers(), " | "))
	fmt.Fprintf(w, "|---|%s--:|--:|:-:|:-:|\n", strings.Repeat("--:|", len(r.columns())))
	for _, rw := range rows {
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s |\n", rw.measure, strings.Join(rw.vals, " | "), rw.ratio, rw.floorRatio, rw.target, rw.verdict)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Leaks:", strings.Join(leakSummary(r), "; "))
	fmt.Fprintln(w)
	for _, n := range notes(m, r) {
		fmt.Fprintf(w, "Note: %s.\n\n", n)
	}
	fmt.Fprintln(w, "<details><summary>conflists</summary>")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "```json")
	fmt.Fprintln(w, r.conf["ours"])
	fmt.Fprintln(w, r.conf["ref"])
	for _, name := range []string{"floor", "ours4", "floor4"} {
		if c, ok := r.conf[name]; ok {
			fmt.Fprintln(w, c)
		}
	}
	fmt.Fprintln(w, "```")
	fmt.Fprintln(w, "</details>")
}

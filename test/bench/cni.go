package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/test/netns"
)

// options are the cni command's flags.
type options struct {
	n, pods, rounds, warmup int
	conc                    []int
	bare, refIPMasq, pod    bool
	floor                   bool
	markdown, refVersion    string
	family                  string // familyIPv4 or familyDual
	podIface                string // our plugin's podInterface ("" is its default, bridge)
	timeout                 time.Duration
}

// The -family values: every chain on an IPv4-only network, or every chain dual stack
// (plus our plugin on an IPv4-only network, for the dual / IPv4-only ratio).
const (
	familyIPv4 = "ipv4"
	familyDual = "dual"
)

// maxLive bounds the pods alive at once: each chain's subnet is a /22 (1021 addresses).
const maxLive = 1000

func parseOptions(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("cni", flag.ContinueOnError)
	fs.IntVar(&o.n, "n", 100, "pods in the sequential ADD and DEL phases")
	fs.IntVar(&o.pods, "pods", 128, "pods per parallel ADD batch")
	conc := fs.String("conc", "8,32", "comma-separated worker counts of the parallel phases")
	fs.IntVar(&o.rounds, "rounds", 2, "parallel batches per chain and concurrency (run in ABBA order)")
	fs.IntVar(&o.warmup, "warmup", 5, "untimed ADD+DEL of this many pods per chain first")
	fs.BoolVar(&o.floor, "floor", true, "also time the floor plugin (test/bench/floorcni: a Go plugin doing only the bare kernel work, exec'd like any plugin; whole pods with it too when -pod)")
	fs.BoolVar(&o.bare, "bare", true, "also time the bare kernel work (netlink from this process, no CNI)")
	fs.BoolVar(&o.refIPMasq, "ref-ipmasq", true, `"ipMasq" of the reference bridge plugin (flannel with flanneld --ip-masq passes false)`)
	fs.StringVar(&o.refVersion, "ref-version", "v1.10.0", "containernetworking/plugins version the reference chain and loopback are built from")
	fs.BoolVar(&o.pod, "pod", true, "time whole pods as containerd's CRI sets them up: the loopback network too (ADD concurrently with the pod network, DEL after it), runtimeConfig.portMappings always passed (an empty list for these pods)")
	fs.StringVar(&o.markdown, "markdown", "", `write a markdown block for BENCHMARKS.md to this file ("-" for stdout)`)
	fs.StringVar(&o.podIface, "pod-interface", "", `our plugin's podInterface for "ours" and "ours4": "" (its default, bridge) or "routed"`)
	fs.DurationVar(&o.timeout, "timeout", time.Minute, "limit for one plugin call")
	fs.StringVar(&o.family, "family", familyIPv4, `"ipv4", or "dual": every chain dual stack (ours with ipv6Subnet, the reference's host-local with an IPv4 and an IPv6 range, floor and bare with an IPv6 address and route too), plus ours on an IPv4-only network ("ours4") for the dual / IPv4-only ratio`)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: go run ./test/bench cni [flags]  (as root)\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	for _, f := range strings.Split(*conc, ",") {
		c, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || c < 1 {
			return o, fmt.Errorf("-conc: %q is not a positive number", f)
		}
		o.conc = append(o.conc, c)
	}
	switch {
	case o.n < 1 || o.pods < 1 || o.rounds < 1 || o.warmup < 0:
		return o, errors.New("-n, -pods and -rounds must be positive, -warmup not negative")
	case max(o.n, o.pods, o.warmup) > maxLive:
		return o, fmt.Errorf("-n, -pods and -warmup must be at most %d (pods alive at once in a /22)", maxLive)
	case o.family != familyIPv4 && o.family != familyDual:
		return o, fmt.Errorf("-family: %q is neither %q nor %q", o.family, familyIPv4, familyDual)
	}
	return o, nil
}

func runCNI(args []string) error {
	o, err := parseOptions(args)
	if err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return errors.New("cni needs root (it creates network namespaces)")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// After the first signal, restore the default action so a second one kills the process
	// outright (the next run's Sweep then removes what it left).
	go func() { <-ctx.Done(); stop() }()

	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	b := &bench{opt: o, log: log}
	netns.Sweep()
	loadStart := loadAvg()
	b.foreign = foreignNamespaces()
	res, err := b.runClean(ctx)
	if ctx.Err() != nil {
		// Whatever failed was cut short by the signal; only a failed cleanup is news.
		if b.cleanupErr != nil {
			return fmt.Errorf("interrupted; cleanup: %w", b.cleanupErr)
		}
		return errors.New("interrupted; every namespace of this run was removed")
	}
	if err != nil {
		return err
	}
	meta := collectMeta(loadStart, b.foreign)
	meta.plugins = o.refVersion
	rows := res.rows()
	printTable(os.Stdout, meta, rows, res)
	switch o.markdown {
	case "":
	case "-":
		writeMarkdown(os.Stdout, meta, rows, res)
	default:
		var buf bytes.Buffer
		writeMarkdown(&buf, meta, rows, res)
		if err := os.WriteFile(o.markdown, buf.Bytes(), 0o644); err != nil {
			return err
		}
		log.Info("markdown written", "file", o.markdown)
	}
	return nil
}

// bench owns everything a run creates, so cleanup can remove it whatever happened.
type bench struct {
	opt options
	log *slog.Logger
	tmp string

	mu         sync.Mutex
	namespaces []*netns.NS
	foreign    int // most namespaces of other processes seen at once
	cleanupErr error
}

// newNS creates a namespace that cleanup removes.
func (b *bench) newNS(label string) (*netns.NS, error) {
	n, err := netns.Create(label)
	if err != nil {
		return nil, err
	}
	b.mu.Lock()
	b.namespaces = append(b.namespaces, n)
	b.mu.Unlock()
	return n, nil
}

// runClean is run followed by cleanup, which also runs if run panics.
func (b *bench) runClean(ctx context.Context) (res *results, err error) {
	defer func() {
		if b.cleanupErr = b.cleanup(); b.cleanupErr != nil {
			err = errors.Join(err, fmt.Errorf("cleanup: %w", b.cleanupErr))
		}
	}()
	return b.run(ctx)
}

// cleanup removes every namespace (pods first, then the nodes, which takes their bridges,
// veths and iptables rules with them), the built binaries and the temporary directory.
func (b *bench) cleanup() error {
	b.mu.Lock()
	nss := b.namespaces
	b.namespaces = nil
	b.mu.Unlock()
	var errs []error
	for i := len(nss) - 1; i >= 0; i-- {
		if err := nss[i].Close(); err != nil {
			errs = append(errs, err)
		}
	}
	cleanupBinaries()
	if b.tmp != "" {
		if err := os.RemoveAll(b.tmp); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// runner is one implementation under test, living on its own node namespace. add and del
// are called on an OS thread locked inside node().
type runner interface {
	name() string
	node() *netns.NS
	add(ctx context.Context, p pod) error
	del(ctx context.Context, p pod) error
	// leaks describes what is left on the node once every pod has been deleted.
	leaks() ([]string, error)
}

// pod is one attachment: a pre-created namespace and a fresh container ID.
type pod struct {
	id  string
	ns  *netns.NS
	idx int // index in the runner's namespace pool, unique among live pods
}

// results are the raw measurements, by runner name.
type results struct {
	add map[string][]time.Duration
	del map[string][]time.Duration
	// tput[name][conc] sums the parallel batches of one runner at one concurrency.
	tput  map[string]map[int]batchSum
	leaks []string
	conf  map[string]string // the conflists, for the record
	opt   options
}

type batchSum struct {
	pods    int
	elapsed time.Duration
}

func (s batchSum) podsPerSec() float64 {
	if s.elapsed <= 0 {
		return 0
	}
	return float64(s.pods) / s.elapsed.Seconds()
}

func (b *bench) run(ctx context.Context) (*results, error) {
	tmp, err := os.MkdirTemp("", "netagent-bench-")
	if err != nil {
		return nil, err
	}
	b.tmp = tmp

	b.log.Info("building plugins")
	binDir, err := buildBinaries(tmp, b.opt.refVersion)
	if err != nil {
		return nil, err
	}
	dual := b.opt.family == familyDual
	// v6 is an IPv6 subnet in a dual-stack run, and "" (none) otherwise.
	v6 := func(subnet string) string {
		if dual {
			return subnet
		}
		return ""
	}
	ours, err := b.newCNIRunner("ours", binDir, oursConf(tmp, "ours", oursBridge, oursSubnet, v6(oursSubnet6), b.opt.podIface))
	if err != nil {
		return nil, err
	}
	ref, err := b.newCNIRunner("ref", binDir, refConf(tmp, b.opt.refIPMasq, v6(refSubnet6)))
	if err != nil {
		return nil, err
	}
	ours.records = func() (int, error) { return oursRecords(filepath.Join(tmp, "ours", ours.list.Name)) }
	ref.records = func() (int, error) { return hostLocalRecords(filepath.Join(tmp, "ref", ref.list.Name)) }
	ref.iptables = true
	runners := []runner{ours, ref}
	if b.opt.floor {
		floor, err := b.newCNIRunner("floor", binDir, floorConf(floorBridge, floorSubnet, v6(floorSubnet6)))
		if err != nil {
			return nil, err
		}
		if err := setupBridge(floor.ns, floorBridge, prefixes(floorSubnet, v6(floorSubnet6))...); err != nil {
			return nil, fmt.Errorf("floor: %w", err)
		}
		floor.idxArg = true
		runners = append(runners, floor)
	}
	if b.opt.pod {
		// The loopback network alone: what every pod costs the runtime whatever its
		// network plugin, so the bound it puts on any ratio is visible.
		lo, err := b.newCNIRunner("lo", binDir, []byte(loConf))
		if err != nil {
			return nil, err
		}
		lo.lo = nil
		runners = append(runners, lo)
	}
	if b.opt.bare {
		bare, err := b.newBareRunner(prefixes(bareSubnet, v6(bareSubnet6)))
		if err != nil {
			return nil, err
		}
		runners = append(runners, bare)
	}
	if dual {
		// Last, so the columns before it keep their place in the table.
		ours4, err := b.newCNIRunner("ours4", binDir, oursConf(tmp, "ours4", ours4Bridge, ours4Subnet, "", b.opt.podIface))
		if err != nil {
			return nil, err
		}
		ours4.records = func() (int, error) { return oursRecords(filepath.Join(tmp, "ours4", ours4.list.Name)) }
		runners = append(runners, ours4)
		if b.opt.floor {
			// The floor on an IPv4-only network too: the dual / IPv4-only ratio of the bare
			// kernel work, which no plugin can beat.
			floor4, err := b.newCNIRunner("floor4", binDir, floorConf(floor4Bridge, floor4Subnet, ""))
			if err != nil {
				return nil, err
			}
			if err := setupBridge(floor4.ns, floor4Bridge, prefixes(floor4Subnet)...); err != nil {
				return nil, fmt.Errorf("floor4: %w", err)
			}
			floor4.idxArg = true
			runners = append(runners, floor4)
		}
	}
	res := &results{
		tput: map[string]map[int]batchSum{},
		conf: map[string]string{
			"ours": strings.ReplaceAll(string(ours.conf), tmp, "$TMP"),
			"ref":  strings.ReplaceAll(string(ref.conf), tmp, "$TMP"),
		},
		opt: b.opt,
	}
	for _, r := range runners {
		res.tput[r.name()] = map[int]batchSum{}
		if c, ok := r.(*cniRunner); ok && (r.name() == "floor" || r.name() == "ours4" || r.name() == "floor4") {
			res.conf[r.name()] = strings.ReplaceAll(string(c.conf), tmp, "$TMP")
		}
	}
	pools, err := b.podPools(ctx, runners)
	if err != nil {
		return nil, err
	}
	// batch is count fresh attachments per runner, on the first count namespaces of its pool.
	batch := func(count int) map[string][]pod {
		out := map[string][]pod{}
		for _, r := range runners {
			for i := range count {
				out[r.name()] = append(out[r.name()], pod{id: containerID(), ns: pools[r.name()][i], idx: i})
			}
		}
		return out
	}
	check := func(phase string) error {
		l, err := b.leaks(runners, phase)
		res.leaks = append(res.leaks, l...)
		return err
	}

	// Warm-up: page cache, the bridges, iptables chains, IPAM stores.
	if b.opt.warmup > 0 {
		b.log.Info("warm-up", "pods", b.opt.warmup)
		pods := batch(b.opt.warmup)
		if _, err := sequential(ctx, runners, runner.add, pods); err != nil {
			return nil, err
		}
		if _, err := sequential(ctx, runners, runner.del, pods); err != nil {
			return nil, err
		}
		if err := check("warm-up"); err != nil {
			return nil, err
		}
	}

	// 1 and 2: sequential ADD, then sequential DEL of the same pods.
	b.log.Info("sequential ADD and DEL", "pods", b.opt.n)
	pods := batch(b.opt.n)
	if res.add, err = sequential(ctx, runners, runner.add, pods); err != nil {
		return nil, err
	}
	// Untimed: every chain must have done the same work, or the ratios compare unlike things.
	for _, r := range runners {
		if r.name() == "lo" {
			continue
		}
		if err := b.checkFamilies(pods[r.name()][0], dual && r.name() != "ours4" && r.name() != "floor4"); err != nil {
			return nil, fmt.Errorf("%s: %w", r.name(), err)
		}
	}
	if res.del, err = sequential(ctx, runners, runner.del, pods); err != nil {
		return nil, err
	}
	if err := check("sequential"); err != nil {
		return nil, err
	}

	// 3: parallel ADD batches; each is deleted (untimed) before the next starts.
	for _, c := range b.opt.conc {
		for round := range b.opt.rounds {
			pods := batch(b.opt.pods)
			for _, r := range order(runners, round) {
				ps := pods[r.name()]
				elapsed, err := parallel(ctx, r, runner.add, ps, c)
				if err != nil {
					return nil, err
				}
				s := res.tput[r.name()][c]
				s.pods += len(ps)
				s.elapsed += elapsed
				res.tput[r.name()][c] = s
				b.log.Info("parallel ADD", "runner", r.name(), "conc", c, "round", round+1,
					"pods", len(ps), "elapsed", elapsed.Round(time.Millisecond),
					"pods_per_s", fmt.Sprintf("%.1f", float64(len(ps))/elapsed.Seconds()))
				if _, err := parallel(ctx, r, runner.del, ps, c); err != nil {
					return nil, err
				}
			}
		}
		if err := check(fmt.Sprintf("parallel c=%d", c)); err != nil {
			return nil, err
		}
	}
	return res, nil
}

// podPools creates the pod namespaces, before anything is timed: enough per runner for the
// largest phase, reused by every phase.
func (b *bench) podPools(ctx context.Context, runners []runner) (map[string][]*netns.NS, error) {
	size := max(b.opt.n, b.opt.pods, b.opt.warmup)
	b.log.Info("creating pod namespaces", "per_chain", size, "chains", len(runners))
	pools := map[string][]*netns.NS{}
	for _, r := range runners {
		for i := range size {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			n, err := b.newNS(fmt.Sprintf("%s-pod%d", r.name(), i))
			if err != nil {
				return nil, err
			}
			pools[r.name()] = append(pools[r.name()], n)
		}
	}
	return pools, nil
}

// leaks checks every runner's node after phase and describes what was left.
func (b *bench) leaks(runners []runner, phase string) ([]string, error) {
	b.foreign = max(b.foreign, foreignNamespaces())
	var out []string
	for _, r := range runners {
		l, err := r.leaks()
		if err != nil {
			return out, fmt.Errorf("%s: leak check after %s: %w", r.name(), phase, err)
		}
		for _, s := range l {
			out = append(out, fmt.Sprintf("%s after %s: %s", r.name(), phase, s))
			b.log.Warn("leak", "runner", r.name(), "phase", phase, "what", s)
		}
	}
	return out, nil
}

// op is runner.add or runner.del.
type op func(runner, context.Context, pod) error

// sequential runs op for pod 0 of every runner, then pod 1, and so on, alternating the
// runners' order, and returns each call's duration by runner.
func sequential(ctx context.Context, runners []runner, f op, pods map[string][]pod) (map[string][]time.Duration, error) {
	out := map[string][]time.Duration{}
	for i := range len(pods[runners[0].name()]) {
		for _, r := range order(runners, i) {
			d, err := timed(ctx, r, f, pods[r.name()][i])
			if err != nil {
				return nil, err
			}
			out[r.name()] = append(out[r.name()], d)
		}
	}
	return out, nil
}

// order is the runners in round i: forward in even rounds, reversed in odd ones, so no
// chain always runs right after the same other one.
func order(rs []runner, i int) []runner {
	if i%2 == 0 {
		return rs
	}
	out := slices.Clone(rs)
	slices.Reverse(out)
	return out
}

// timed runs op for p on a thread inside the runner's node namespace and returns how long op
// took (entering and leaving the namespace is not counted).
func timed(ctx context.Context, r runner, f op, p pod) (time.Duration, error) {
	var d time.Duration
	err := r.node().Do(func() error {
		start := time.Now()
		err := f(r, ctx, p)
		d = time.Since(start)
		return err
	})
	return d, err
}

// parallel runs op for every pod with workers goroutines, each locked inside the node
// namespace, and returns the time from releasing them all at once to the last one finishing.
// The first error stops the others.
func parallel(ctx context.Context, r runner, f op, pods []pod, workers int) (time.Duration, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	work := make(chan pod, len(pods))
	for _, p := range pods {
		work <- p
	}
	close(work)

	start := make(chan struct{})
	var ready, done sync.WaitGroup
	var mu sync.Mutex
	var last time.Time
	var first error // the error that stopped the others; theirs are only cancellations
	for range workers {
		ready.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			var once sync.Once
			signalReady := func() { once.Do(ready.Done) }
			defer signalReady() // also when Do fails before running fn
			err := r.node().Do(func() error {
				signalReady()
				<-start
				for p := range work {
					if ctx.Err() != nil {
						return nil
					}
					if err := f(r, ctx, p); err != nil {
						return err
					}
				}
				mu.Lock()
				if now := time.Now(); now.After(last) {
					last = now
				}
				mu.Unlock()
				return nil
			})
			if err != nil {
				mu.Lock()
				if first == nil {
					first = err
				}
				mu.Unlock()
				cancel()
			}
		}()
	}
	ready.Wait()
	t0 := time.Now()
	close(start)
	done.Wait()
	if first != nil {
		return 0, first
	}
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	return last.Sub(t0), nil
}

// checkFamilies checks that pod p's interface has a global address of each family the run
// configures, and no other family's; an IPv6 one still doing duplicate address detection
// (not yet usable) is logged.
func (b *bench) checkFamilies(p pod, dual bool) error {
	h, err := p.ns.Handle()
	if err != nil {
		return err
	}
	defer h.Close()
	l, err := h.LinkByName(podIf)
	if err != nil {
		return fmt.Errorf("pod %s: %w", p.ns.Name, err)
	}
	addrs, err := h.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("pod %s: addresses of %s: %w", p.ns.Name, podIf, err)
	}
	var v4, v6 int
	for _, a := range addrs {
		ip, _ := netip.AddrFromSlice(a.IP)
		switch {
		case ip.Unmap().Is4():
			v4++
		case ip.IsGlobalUnicast():
			v6++
			if a.Flags&unix.IFA_F_TENTATIVE != 0 {
				b.log.Warn("IPv6 address still tentative after ADD", "pod", p.ns.Name, "addr", ip)
			}
		}
	}
	want6 := 0
	if dual {
		want6 = 1
	}
	if v4 != 1 || v6 != want6 {
		return fmt.Errorf("pod %s: %s has %d IPv4 and %d global IPv6 addresses after ADD, want 1 and %d", p.ns.Name, podIf, v4, v6, want6)
	}
	return nil
}

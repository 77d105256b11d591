// Package agent is the node agent: it leases the node's subnet, watches the other nodes'
// leases, and keeps the kernel equal to the plan built from them.
//
// Data flows one way: inputs -> snapshot -> plan -> dataplane.Set -> kernel. Every input
// (a lease change, a kernel notification on an object we own, a firewall change, the
// resync ticker, a config change, a timer) only posts a reason to the loop's inbox and
// wakes it; the loop then builds the plan from the full snapshot (config, own lease,
// peers, the underlay as it is now) and hands it to the dataplane in one Set, or, for
// lease events, the planner's delta. A missed event costs one extra pass, never a stale
// route. A failed pass is retried with a capped backoff. The pod anti-spoofing guard and
// the Docker step are small loops of their own.
//
// The dataplane is an interface (Dataplane): dataplane.Linux in the agent, an in-memory
// dataplane.Fake in tests of the loop, which need no root.
//
// Safety: nothing is reconciled before the node holds its lease and the first full list
// of peers has arrived, so a restart with etcd down touches nothing; when etcd goes away
// later the peer view is kept as it is, so the dataplane stays exactly as it was. Shutdown
// leaves the dataplane in place; a restart adopts it without changes.
package agent

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/dataplane"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/pkg/subnetfile"
)

// Options configure an agent.
type Options struct {
	Node       string
	Iface      string     // underlay interface; empty: the one holding PublicIP, or the default route's
	PublicIP   netip.Addr // optional, either family; default: Iface's first IPv4 and global IPv6 addresses
	SubnetFile string
	CNIConfDir string // "" disables writing the conflist
	CNIConf    CNIConf
	Resync     time.Duration
	Store      lease.Store
	Log        *slog.Logger
	Metrics    *Metrics
	// Docker, when set, is route mode: Docker's bridge (or a network) must use the lease.
	Docker *DockerMode
	// OnReady, when set, runs once, when the agent first becomes ready.
	OnReady func()
	// Dataplane is the kernel below the agent; nil: the current network namespace's
	// (dataplane.New).
	Dataplane Dataplane

	// LeaseTTL is the store's lease TTL; after a store outage, peers whose leases vanish
	// are kept for two of it (see grace). Default 30s.
	LeaseTTL time.Duration
	// RepairForwarding switches net.ipv4.ip_forward back on when it is found off; without
	// it the agent only reports it.
	RepairForwarding bool
	// WireGuard is the node's side of the wireguard backend (used when the config names it).
	WireGuard WireGuardOptions
	// DADWait bounds how long the agent waits at start for the underlay's IPv6 address to
	// finish duplicate address detection (a second or two by default; more with a larger
	// dad_transmits). Default 10s.
	DADWait time.Duration
}

// WireGuardOptions are the node-local settings of the wireguard backend.
type WireGuardOptions struct {
	// StateDir holds the node's private key (created on first start, mode 0600).
	StateDir string
	// Device is the WireGuard interface's name (default plan.DefaultWGDev).
	Device string
	// Impl is auto, kernel or userspace; Daemon the netagent-wireguard binary for a
	// userspace device (default: next to this executable, else on PATH).
	Impl, Daemon string
	// RotateKey replaces the private key before the lease is claimed: the lease then
	// publishes the new public key, and peers pick it up through their watch.
	RotateKey bool
}

// Dataplane is the kernel as the agent sees it: the underlay it reads, and the objects it
// sets from a plan (dataplane.Linux; dataplane.Fake in tests).
type Dataplane interface {
	// Underlay reads the interface peers reach this node at.
	Underlay(iface string, ip netip.Addr) (dataplane.Underlay, error)
	// Prepare may start on the parts of a plan that need no peers (the NAT chains) while
	// the peers are listed.
	Prepare(ctx context.Context, n plan.NAT)
	// GuardWireGuard sets the WireGuard backend's underlay guard (quick; before the lease).
	GuardWireGuard(dev *plan.WGDevice)
	// PrepareWireGuard may make the WireGuard device (start its daemon, waiting for it)
	// while the lease is acquired and the peers listed.
	PrepareWireGuard(ctx context.Context, dev *plan.WGDevice)
	// Set makes the kernel hold the plan; a plan with a Delta may fail with
	// dataplane.ErrStale, and a full plan is set instead.
	Set(ctx context.Context, p plan.Plan) (dataplane.Stats, error)
	// Invalidate makes the next Set re-read parts of the kernel (someone else changed them).
	Invalidate(parts dataplane.Part)
	// Watch signals changed when the kernel drifts from the plan, until ctx ends.
	Watch(ctx context.Context, changed chan<- struct{})
	// Dropped is how many VXLAN packets the allow-list dropped.
	Dropped() uint64
	// WireGuard is the WireGuard device as the kernel has it (false: none).
	WireGuard() (dataplane.WGStatus, bool)
	// WireGuardKey is the node's WireGuard public key (the private key stays with the
	// dataplane); rotate replaces the key, and device dev's, first. created says the key
	// did not exist before (a new node).
	WireGuardKey(dev string, rotate bool) (pub string, created bool, err error)
}

// Agent runs one node's control loop.
type Agent struct {
	opt Options
	dp  Dataplane
	h   *netlink.Handle // route mode only: Docker's bridge and networks

	in  inbox
	wg  sync.WaitGroup // the inputs' goroutines
	pod podGuard
	// Inputs that watch the kernel and files (variables, so tests of the loop can leave
	// the host's own alone).
	watchFirewall func(ctx context.Context, log *slog.Logger, fw, nft, pod chan struct{})
	watchNetconf  func(ctx context.Context, log *slog.Logger, changed chan struct{})
	watchFiles    func(ctx context.Context, log *slog.Logger, paths []string, ch chan struct{})

	reclaim    chan struct{}    // the store is back: re-claim a lost lease now
	republish  chan lease.Lease // the loop's lease with an address the underlay gained: publish it
	fatal      chan error       // the lease cannot be kept by this run (lease.ErrReassigned); rFatal
	dockerKick chan struct{}    // a full pass asks the Docker step to run
	dockerJob  struct {
		sync.Mutex
		self lease.Lease
		p    plan.Plan // header only: MTU, NAT
	}
	dockerOK atomic.Bool // the Docker step succeeded once
	// keyPublished: the store holds the lease with the node's WireGuard key (or no key
	// waits to be published: another backend, or a key the lease had from the start).
	keyPublished atomic.Bool
	rotated      bool // the WireGuard key was rotated by this run
	// wgAnnounce is the WireGuard key and port a new node publishes only after its first
	// pass (see acquire); empty once published.
	wgAnnounce struct {
		key  string
		port int
	}

	files      []file            // what writeFiles last wrote (the loop's)
	bigPass    bool              // the last full pass changed many objects
	ignored    map[string]string // leases not used, as last reported (the loop's)
	ulWarned   netip.Addr        // the underlay address last warned about (the loop's)
	ulWarned6  netip.Addr        // the same for IPv6
	keptVXLAN  string            // the VXLAN device the last full plan kept for peers (the loop's)
	forwardErr error             // why forwarding is off, at the last check (the loop's)

	mu      sync.Mutex
	status  Status
	planner *plan.Planner // the loop's current plan (read by Snapshot under mu)
}

// New prepares an agent working in the current network namespace.
func New(opt Options) (*Agent, error) {
	if opt.Log == nil {
		opt.Log = slog.Default()
	}
	if opt.Metrics == nil {
		opt.Metrics = NewMetrics()
	}
	if opt.Resync == 0 {
		opt.Resync = time.Minute
	}
	if opt.LeaseTTL == 0 {
		opt.LeaseTTL = 30 * time.Second
	}
	if opt.DADWait == 0 {
		opt.DADWait = 10 * time.Second
	}
	a := &Agent{
		opt:           opt,
		dp:            opt.Dataplane,
		in:            newInbox(),
		reclaim:       make(chan struct{}, 1),
		republish:     make(chan lease.Lease, 1),
		fatal:         make(chan error, 1),
		dockerKick:    make(chan struct{}, 1),
		watchFirewall: watchFirewall,
		watchNetconf:  watchNetconf,
		watchFiles:    watchFiles,
	}
	a.pod = newPodGuard()
	if a.dp == nil {
		dp, err := dataplane.New(opt.Log, nil)
		if err != nil {
			return nil, err
		}
		dp.UseWireGuard(dataplane.WireGuardOptions{KeyDir: opt.WireGuard.StateDir, Impl: opt.WireGuard.Impl, Daemon: opt.WireGuard.Daemon, Device: opt.WireGuard.Device})
		a.dp = dp
	}
	if opt.Docker != nil {
		h, err := netlink.NewHandle()
		if err != nil {
			return nil, fmt.Errorf("netlink: %w", err)
		}
		a.h = h
	}
	opt.Metrics.guardDrops(a.dp.Dropped)
	opt.Metrics.wireGuard(a.dp.WireGuard)
	opt.Metrics.podSpoofDrops(podSpoofDrops)
	return a, nil
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// Run runs until ctx ends.
func (a *Agent) Run(ctx context.Context) error {
	log := a.opt.Log.With("node", a.opt.Node)
	start := time.Now()
	a.checkForwarding(log)
	ul, err := a.underlay(ctx, log)
	if err != nil {
		return err
	}
	log.Info("underlay", "dev", ul.Dev, "ip", ul.IP, "ip6", ul.IP6, "mtu", ul.MTU)
	if a.opt.CNIConfDir != "" && a.opt.CNIConf.PodInterface != "" {
		iface, why, warn, err := resolvePodInterface(a.opt.CNIConf.PodInterface, a.podDataDir())
		if err != nil {
			return err
		}
		a.opt.CNIConf.PodInterface = iface
		a.mu.Lock()
		a.status.PodInterface = iface
		a.mu.Unlock()
		level := slog.LevelInfo
		if warn {
			level = slog.LevelWarn
		}
		log.Log(ctx, level, "pod interface", "podInterface", iface, "why", why)
	}
	cfg, err := a.config(ctx, log)
	if err != nil {
		return err
	}
	defer a.wg.Wait()
	if cfg.Backend.Type == config.WireGuard {
		// The WireGuard device needs no lease (its address and peers come with the first
		// pass): a new node's daemon starts now, not after the lease and the peers' list.
		// (The underlay's addresses decide the family WireGuard runs over, so its MTU.)
		wgDev := plan.Build(a.input(cfg, lease.Lease{PublicIP: ul.IP, PublicIP6: ul.IP6}, ul, nil)).WireGuard
		prepCtx := ctx // (ctx is replaced below)
		a.dp.GuardWireGuard(wgDev)
		a.spawn(func() { a.dp.PrepareWireGuard(prepCtx, wgDev) })
	}
	held, err := a.acquire(ctx, log, cfg, ul)
	if err != nil {
		return err
	}
	a.keyPublished.Store(a.wgAnnounce.key == "")
	log.Info("lease acquired", "subnet", held.Lease.Subnet, "subnet6", held.Lease.Subnet6, "in", time.Since(start).Round(time.Millisecond))
	a.setLease(held.Lease, cfg)
	a.opt.Metrics.LeaseHeld.Set(1)
	// The NAT and FORWARD chains depend on the config and our subnet only: the dataplane
	// may write them while the peers are listed (peers' routes must not wait for them).
	a.dp.Prepare(ctx, plan.Build(a.input(cfg, held.Lease, ul, nil)).NAT)

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s := &state{cfg: cfg, self: held.Lease, ul: ul, grace: newGrace(), start: start,
		peers: lease.NewPeersWith(lease.Rules{Network: cfg.Network, SubnetLen: cfg.SubnetLen, Network6: cfg.IPv6Network, SubnetLen6: cfg.IPv6SubnetLen,
			Self: a.opt.Node, SelfIP: held.Lease.PublicIP, SelfIP6: held.Lease.PublicIP6, SelfWGKey: cmp.Or(held.Lease.WGPublicKey, a.wgAnnounce.key)})}
	listed := a.startInputs(ctx, log, s, held)
	// Wait for the first full list of peers before touching anything.
	select {
	case <-listed:
	case <-ctx.Done():
		return ctx.Err()
	}
	a.spawn(func() { a.in.relay(ctx, listed, rLeases) })
	a.spawn(func() { a.in.every(ctx, a.opt.Resync, rResync) })
	cfgChanged := make(chan struct{}, 1)
	a.spawn(func() { a.opt.Store.WatchConfig(ctx, cfgChanged) })
	a.spawn(func() { a.in.relay(ctx, cfgChanged, rConfig) })
	if a.podGuardEnabled() {
		a.spawn(func() { a.runPodGuard(ctx, log) })
	}
	if a.opt.Docker != nil {
		a.spawn(func() { a.runDocker(ctx, log) })
		a.spawn(func() { a.watchDockerAddrs(ctx, log) })
	}
	return a.loop(ctx, log, s)
}

// underlay reads the underlay for the lease. An IPv6 address still in duplicate address
// detection (an interface just configured, as at boot) cannot be used yet: the agent waits
// for it (bounded), so peers get the lease with it from the start; one that finishes later
// is published then (refreshUnderlay).
func (a *Agent) underlay(ctx context.Context, log *slog.Logger) (dataplane.Underlay, error) {
	deadline := time.Now().Add(a.opt.DADWait)
	for logged := false; ; logged = true {
		ul, err := a.dp.Underlay(a.opt.Iface, a.opt.PublicIP)
		if err != nil || !ul.Tentative6 {
			return ul, err
		}
		if time.Now().After(deadline) {
			if !ul.IP.IsValid() {
				return ul, fmt.Errorf("underlay %s: its IPv6 address is still tentative (duplicate address detection) after %s, and it has no IPv4 address", ul.Dev, a.opt.DADWait)
			}
			log.Warn("the underlay's IPv6 address is still tentative; leasing without it (it is published once usable)", "dev", ul.Dev, "waited", a.opt.DADWait)
			return ul, nil
		}
		if !logged {
			log.Info("waiting for the underlay's IPv6 address to finish duplicate address detection", "dev", ul.Dev)
		}
		select {
		case <-ctx.Done():
			return ul, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// spawn runs f as one of the agent's goroutines (Run waits for them).
func (a *Agent) spawn(f func()) {
	a.wg.Add(1)
	go func() { defer a.wg.Done(); f() }()
}

// startInputs starts the goroutines that feed the loop: the peers' watch (which signals
// the returned channel), the lease keepalive, the store's health, the kernel and the
// firewall.
func (a *Agent) startInputs(ctx context.Context, log *slog.Logger, s *state, held lease.Held) chan struct{} {
	listed := make(chan struct{}, 1)
	a.spawn(func() { a.opt.Store.Watch(ctx, s.peers, listed, a.opt.Metrics) })
	a.spawn(func() { a.keepAlive(ctx, log, held) })
	if hw, ok := a.opt.Store.(lease.HealthWatcher); ok {
		a.spawn(func() { a.watchStore(ctx, log, hw) })
	}
	kernel := make(chan struct{}, 1)
	a.spawn(func() { a.dp.Watch(ctx, kernel) })
	a.spawn(func() { a.in.relay(ctx, kernel, rKernel) })
	fw, nft := make(chan struct{}, 1), make(chan struct{}, 1)
	a.spawn(func() { a.watchFirewall(ctx, log, fw, nft, a.pod.changed) })
	a.spawn(func() { a.in.relay(ctx, fw, rFirewall) })
	a.spawn(func() { a.in.relay(ctx, nft, rAllow) })
	fwd := make(chan struct{}, 1)
	a.spawn(func() { a.watchNetconf(ctx, log, fwd) })
	a.spawn(func() { a.in.relay(ctx, fwd, rForward) })
	return listed
}

// config returns the network config, retried until valid (an agent with no valid config
// touches nothing).
func (a *Agent) config(ctx context.Context, log *slog.Logger) (config.Network, error) {
	backoff := newBackoff()
	for {
		c, _, err := a.opt.Store.Config(ctx)
		if err == nil {
			return c, nil
		}
		if ctx.Err() != nil {
			return c, ctx.Err() // stopped while asking: not a config problem
		}
		a.setError("config", err)
		a.opt.Metrics.Errors.WithLabelValues("config").Inc()
		log.Warn("no usable network config yet", "err", err, "retry", backoff.peek())
		if !backoff.wait(ctx) {
			return c, ctx.Err()
		}
	}
}

// acquire claims the node's lease, retried until it succeeds.
func (a *Agent) acquire(ctx context.Context, log *slog.Logger, cfg config.Network, ul dataplane.Underlay) (lease.Held, error) {
	self := lease.Lease{Node: a.opt.Node, PublicIP: ul.IP, PublicIP6: ul.IP6, Backend: cfg.Backend.Type, UnderlayMAC: ul.MAC, Instance: newInstance()}
	switch cfg.Backend.Type {
	case config.HostGW:
	case config.WireGuard:
		pub, created, err := a.wireGuardKey()
		if err != nil {
			return lease.Held{}, err
		}
		self.WGPublicKey, self.WGPort = pub, cfg.Backend.Port
		if created {
			// A new node's device knows no peer until its first pass, and peers send it
			// their handshakes as soon as the lease shows its key: dropped, they would
			// wait for the device to know them and for a handshake started again. So a
			// new key is published once the first pass has set the peers (announceKey):
			// peers then reach a device that already knows them.
			a.wgAnnounce.key, a.wgAnnounce.port = pub, cfg.Backend.Port
			self.WGPublicKey, self.WGPort = "", 0
		}
	default:
		self.VTEPMAC = plan.VTEPMAC(a.opt.Node).String()
	}
	hint := a.dockerHint(log)
	if info, err := subnetfile.Read(a.opt.SubnetFile); err == nil {
		hint, self.Subnet6 = info.Subnet, info.Subnet6 // Subnet6: the IPv6 hint
	}
	backoff := newBackoff()
	for {
		held, err := a.opt.Store.Acquire(ctx, cfg, self, hint)
		if err == nil {
			return held, nil
		}
		a.setError("lease", err)
		a.opt.Metrics.Errors.WithLabelValues("lease").Inc()
		log.Warn("cannot acquire a subnet lease yet", "err", err, "retry", backoff.peek())
		if !backoff.wait(ctx) {
			return held, ctx.Err()
		}
	}
}

// wireGuardKey returns the node's WireGuard public key (the dataplane keeps the private
// key), replaced first once per run when asked to rotate it.
func (a *Agent) wireGuardKey() (string, bool, error) {
	rotate := a.opt.WireGuard.RotateKey && !a.rotated
	dev := a.opt.WireGuard.Device
	if dev == "" {
		dev = plan.DefaultWGDev
	}
	pub, created, err := a.dp.WireGuardKey(dev, rotate)
	if err == nil && rotate {
		a.rotated = true // not again on a re-claim
	}
	return pub, created, err
}

// input is the plan's input: the snapshot of config, own lease, underlay and peers.
func (a *Agent) input(cfg config.Network, self lease.Lease, ul dataplane.Underlay, peers []*lease.Lease) plan.Input {
	return plan.Input{
		Config:   cfg,
		Self:     self,
		Peers:    peers,
		Underlay: plan.Underlay{Dev: ul.Dev, MTU: ul.MTU, Connected: ul.Connected, Tunnels: ul.Tunnels},
		Docker:   a.opt.Docker != nil,
		WGDev:    a.opt.WireGuard.Device,
	}
}

// keepAlive keeps the lease alive, publishes it again when the loop hands over one with an
// address the underlay gained, and re-claims it when lost. Each re-claim attempt is
// bounded by the store; between attempts it waits at most a second, and not at all once
// the store is seen back, so the lease is re-claimed while etcd's restored copy of it
// still lives. Failures are counted and in status; the log repeats them at growing
// intervals.
func (a *Agent) keepAlive(ctx context.Context, log *slog.Logger, held lease.Held) {
	for ctx.Err() == nil {
		pub, err := a.keepAliveOnce(ctx, held)
		if ctx.Err() != nil {
			return
		}
		if pub != nil {
			held.Lease = *pub
			h, rerr := a.opt.Store.Renew(ctx, held)
			if rerr == nil {
				held = h
				log.Info("lease published again", "publicIP", held.Lease.PublicIP, "publicIP6", held.Lease.PublicIP6, "wgPublicKey", held.Lease.WGPublicKey)
				a.published(held.Lease)
				continue
			}
			err = fmt.Errorf("publish the lease again: %w", rerr) // re-claimed below, with it
		}
		lost := time.Now()
		a.opt.Metrics.LeaseHeld.Set(0)
		a.opt.Metrics.Errors.WithLabelValues("lease").Inc()
		a.setError("lease", fmt.Errorf("lease keepalive lost, re-claiming: %w", err))
		log.Warn("lease keepalive lost; the dataplane stays as it is while re-claiming", "err", err)
		backoff := newBackoffMax(time.Second)
		warn := newBackoffMax(5 * time.Minute)
		warn.d = 10 * time.Second
		nextWarn := lost.Add(warn.d)
		for attempt := 1; ctx.Err() == nil; attempt++ {
			select {
			case pub := <-a.republish:
				held.Lease = pub
			default:
			}
			h, err := a.opt.Store.Renew(ctx, held)
			if err == nil {
				held = h
				a.published(held.Lease)
				a.opt.Metrics.LeaseHeld.Set(1)
				a.clearError("lease")
				log.Info("lease re-claimed", "subnet", held.Lease.Subnet, "after", time.Since(lost).Round(time.Millisecond), "attempts", attempt)
				break
			}
			a.setError("lease", err)
			a.opt.Metrics.Errors.WithLabelValues("lease").Inc()
			if errors.Is(err, lease.ErrReassigned) {
				// Only a new run can take the new subnet: stop (the dataplane stays), and
				// let the service manager (the kubelet) start the agent again.
				a.fatal <- err
				a.in.post(rFatal)
				return
			}
			conflict := errors.Is(err, lease.ErrConflict)
			switch {
			case conflict && backoff.max < 30*time.Second:
				// Not an outage: retrying fast will not help, and the log says it once.
				backoff.max = 30 * time.Second
				log.Error("our subnet was taken by another node; keeping the dataplane, operator action needed", "err", err)
			case time.Now().After(nextWarn):
				log.Warn("lease not re-claimed yet; retrying", "for", time.Since(lost).Round(time.Second), "attempts", attempt, "err", err)
				nextWarn = time.Now().Add(warn.next())
			}
			select {
			case <-a.reclaim:
			default:
				if !backoff.waitOr(ctx, a.reclaim) {
					return
				}
			}
		}
	}
}

// published notes a lease written to the store: one with the WireGuard key a new node
// published after its first pass lets it become ready.
func (a *Agent) published(l lease.Lease) {
	if l.WGPublicKey != "" && !a.keyPublished.Swap(true) {
		a.in.post(rKeyPublished)
	}
}

// keepAliveOnce runs the store's KeepAlive for held until it fails (its error) or the
// loop hands over a lease to publish instead (pub).
func (a *Agent) keepAliveOnce(ctx context.Context, held lease.Held) (pub *lease.Lease, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- a.opt.Store.KeepAlive(ctx, held) }()
	select {
	case err = <-done:
		return nil, err
	case l := <-a.republish:
		cancel()
		<-done
		return &l, nil
	}
}

// passRetry schedules the retry of a failed full pass: 100ms, doubling to 10s; a pass
// that succeeds resets it. Without it a failed pass waited for an unrelated event or the
// next resync, which could hold back readiness for a minute.
type passRetry struct {
	b     *backoff
	t     *time.Timer
	retry chan struct{}
}

func newPassRetry(retry chan struct{}) *passRetry {
	return &passRetry{b: newBackoffMax(10 * time.Second), retry: retry}
}

// failed schedules a retry and returns its delay.
func (r *passRetry) failed() time.Duration {
	if r.t != nil {
		r.t.Stop()
	}
	d := r.b.next()
	r.t = time.AfterFunc(d, func() { signal(r.retry) })
	return d
}

// ok resets the delay and cancels a pending retry.
func (r *passRetry) ok() {
	if r.t != nil {
		r.t.Stop()
		r.t = nil
	}
	r.b = newBackoffMax(r.b.max)
}

// backoff doubles from 100ms to max (5s unless set).
type backoff struct{ d, max time.Duration }

func newBackoff() *backoff { return newBackoffMax(5 * time.Second) }

func newBackoffMax(max time.Duration) *backoff { return &backoff{d: 100 * time.Millisecond, max: max} }

func (b *backoff) peek() time.Duration { return b.d }

// next returns the current delay and doubles it.
func (b *backoff) next() time.Duration {
	d := b.d
	b.d = min(b.d*2, b.max)
	return d
}

func (b *backoff) wait(ctx context.Context) bool { return b.waitOr(ctx, nil) }

// waitOr waits the next delay, or until wake signals; false when ctx ended.
func (b *backoff) waitOr(ctx context.Context, wake <-chan struct{}) bool {
	t := time.NewTimer(b.next())
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
	case <-wake:
	}
	return true
}

// Package agent is the node agent's main loop: it leases the node's subnet, watches the
// other nodes' leases, and keeps the kernel equal to the plan built from them.
//
// Data flows one way: store -> plan.Build -> reconcilers -> kernel. Every input (a lease
// change, a netlink event on an object we own, a firewall change, the resync ticker, a
// config change) only signals "something changed" on a channel of capacity one; a single
// loop then rebuilds the plan from the full snapshot and lets each reconciler diff it
// against the kernel. A missed event costs one extra pass, never a stale route.
//
// Safety: nothing is reconciled before the node holds its lease and the first full list
// of peers has arrived, so a restart with etcd down touches nothing; when etcd goes away
// later the peer view is kept as it is, so the dataplane stays exactly as it was. Shutdown
// leaves the dataplane in place; a restart adopts it without changes.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/nat"
	"github.com/netagent/netagent/pkg/nldump"
	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/pkg/route"
	"github.com/netagent/netagent/pkg/subnetfile"
	"github.com/netagent/netagent/pkg/vxguard"
	"github.com/netagent/netagent/pkg/vxlan"
)

// Store is what the agent needs from a lease store.
type Store interface {
	Config(ctx context.Context) (config.Network, int64, error)
	Acquire(ctx context.Context, cfg config.Network, self lease.Lease, hint netip.Prefix) (lease.Held, error)
	Renew(ctx context.Context, h lease.Held) (lease.Held, error)
	KeepAlive(ctx context.Context, h lease.Held) error
	Watch(ctx context.Context, peers *lease.Peers, changed chan<- struct{}, stats lease.WatchStats)
	WatchConfig(ctx context.Context, changed chan<- struct{})
}

// Options configure an agent.
type Options struct {
	Node       string
	Iface      string     // underlay interface; empty: the one holding PublicIP, or the default route's
	PublicIP   netip.Addr // optional; default: Iface's first IPv4 address
	SubnetFile string
	CNIConfDir string // "" disables writing the conflist
	CNIConf    CNIConf
	Resync     time.Duration
	Store      Store
	Log        *slog.Logger
	Metrics    *Metrics
	// Docker, when set, is route mode: Docker's bridge (or a network) must use the lease.
	Docker *DockerMode
	// OnReady, when set, runs once, when the agent first becomes ready.
	OnReady func()

	// LeaseTTL is the store's lease TTL; after a store outage, peers whose leases vanish
	// are kept for two of it (see grace). Default 30s.
	LeaseTTL time.Duration
	// RepairForwarding switches net.ipv4.ip_forward back on when it is found off; without
	// it the agent only reports it.
	RepairForwarding bool
}

// Agent runs one node's control loop.
type Agent struct {
	opt   Options
	h     *netlink.Handle
	route *route.Reconciler
	vxlan *vxlan.Reconciler
	nat   struct {
		r     *nat.Reconciler
		plan  plan.NAT       // the loop's last NAT plan
		early chan natResult // the start-up sync, running while the peers are listed
	}

	guard         *vxguard.Guard
	trigger       chan struct{}
	fwDirty       chan struct{} // iptables changed (someone's, or ours)
	nftDirty      chan struct{} // netagent's own nftables tables changed
	podChanged    chan struct{} // the pod anti-spoofing table changed
	podDirty      chan struct{} // time to check the pod anti-spoofing set
	podGuardArmed atomic.Bool
	podMissing    map[string]time.Time // anti-spoofing entries missing at the last check, since when
	filesDirty    chan struct{}
	files         []file            // what writeFiles last wrote (the loop's)
	bigPass       bool              // the last full pass changed many objects
	ignored       map[string]string // leases not used, as last reported (the loop's)

	fatal        chan error    // the lease cannot be kept by this run (lease.ErrReassigned)
	storeChanged chan struct{} // the store became reachable or unreachable
	reclaim      chan struct{} // the store is back: re-claim a lost lease now
	graceEnd     chan struct{} // the post-outage window for vanished peers ended
	fwdChanged   chan struct{} // the kernel announced a forwarding change
	retryFull    chan struct{} // time to retry a failed full pass
	ulDev        atomic.Value  // string: the underlay device's name (read by watchKernel)
	ulWarned     netip.Addr    // the underlay address last warned about (the loop's)
	forwardErr   error         // why forwarding is off, at the last check (the loop's)

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
	h, err := netlink.NewHandle()
	if err != nil {
		return nil, fmt.Errorf("netlink: %w", err)
	}
	a := &Agent{
		opt:        opt,
		h:          h,
		route:      route.New(h, opt.Log),
		vxlan:      vxlan.New(h, opt.Log),
		trigger:    make(chan struct{}, 1),
		fwDirty:    make(chan struct{}, 1),
		filesDirty: make(chan struct{}, 1),
		nftDirty:   make(chan struct{}, 1),
		podDirty:   make(chan struct{}, 1),
		podChanged: make(chan struct{}, 1),

		fatal:        make(chan error, 1),
		storeChanged: make(chan struct{}, 1),
		reclaim:      make(chan struct{}, 1),
		graceEnd:     make(chan struct{}, 1),
		fwdChanged:   make(chan struct{}, 1),
		retryFull:    make(chan struct{}, 1),
	}
	a.nat.r = nat.New(nat.Exec{})
	if a.guard, err = vxguard.New(); err != nil {
		h.Close()
		return nil, err
	}
	opt.Metrics.guardDrops(a.guard.Dropped)
	opt.Metrics.podSpoofDrops(podSpoofDrops)
	// Passes diff against mirrors that kernel notifications keep current (see watchKernel).
	a.route.Mirror()
	a.vxlan.Mirror()
	// Routes leave a peer's VXLAN entries before the entries go (a peer moving to direct
	// routing, or leaving): each pass commits the VXLAN deletions after its routes.
	a.vxlan.DeferDeletes()
	return a, nil
}

// invalidate makes the next pass re-read every kernel table.
func (a *Agent) invalidate() {
	a.route.Invalidate()
	a.vxlan.Invalidate()
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// VXLANDevName is the VXLAN device's name for a VNI.
func VXLANDevName(vni int) string { return vxlan.DevName(vni) }

// Run runs until ctx ends.
func (a *Agent) Run(ctx context.Context) error {
	log := a.opt.Log.With("node", a.opt.Node)
	start := time.Now()
	a.checkForwarding(log)
	ul, err := a.underlay()
	if err != nil {
		return err
	}
	log.Info("underlay", "dev", ul.dev, "ip", ul.ip, "mtu", ul.mtu)
	a.ulDev.Store(ul.dev)

	// 1. The network config (retried until valid: an agent with no valid config touches
	// nothing).
	var cfg config.Network
	backoff := newBackoff()
	for {
		c, _, err := a.opt.Store.Config(ctx)
		if err == nil {
			cfg = c
			break
		}
		if ctx.Err() != nil {
			return ctx.Err() // stopped while asking: not a config problem
		}
		a.setError("config", err)
		a.opt.Metrics.Errors.WithLabelValues("config").Inc()
		log.Warn("no usable network config yet", "err", err, "retry", backoff.peek())
		if !backoff.wait(ctx) {
			return ctx.Err()
		}
	}

	// 2. The lease.
	self := lease.Lease{Node: a.opt.Node, PublicIP: ul.ip, Backend: cfg.Backend.Type, UnderlayMAC: ul.mac, Instance: newInstance()}
	if cfg.Backend.Type != config.HostGW {
		self.VTEPMAC = plan.VTEPMAC(a.opt.Node).String()
	}
	hint := a.dockerHint(log)
	if info, err := subnetfile.Read(a.opt.SubnetFile); err == nil {
		hint = info.Subnet
	}
	var held lease.Held
	backoff = newBackoff()
	for {
		held, err = a.opt.Store.Acquire(ctx, cfg, self, hint)
		if err == nil {
			break
		}
		a.setError("lease", err)
		a.opt.Metrics.Errors.WithLabelValues("lease").Inc()
		log.Warn("cannot acquire a subnet lease yet", "err", err, "retry", backoff.peek())
		if !backoff.wait(ctx) {
			return ctx.Err()
		}
	}
	log.Info("lease acquired", "subnet", held.Lease.Subnet, "in", time.Since(start).Round(time.Millisecond))
	a.setLease(held.Lease, cfg)
	a.opt.Metrics.LeaseHeld.Set(1)
	// The NAT and FORWARD chains depend on the config and our subnet only: write them
	// while the peers are listed and routed (the iptables execs take tens of milliseconds
	// on a loaded node, and peers' routes must not wait for them). The first full pass
	// takes the result.
	a.startEarlyNAT(ctx, plan.NAT{Network: cfg.Network, Subnet: held.Lease.Subnet, Final: a.opt.Docker != nil})

	// 3. Inputs.
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	peers := lease.NewPeersWith(lease.Rules{Network: cfg.Network, SubnetLen: cfg.SubnetLen, Self: a.opt.Node, SelfIP: held.Lease.PublicIP})
	listed := make(chan struct{}, 1)
	wg.Add(1)
	go func() { defer wg.Done(); a.opt.Store.Watch(ctx, peers, listed, a.opt.Metrics) }()
	wg.Add(1)
	go func() { defer wg.Done(); a.keepAlive(ctx, log, held) }()
	if hw, ok := a.opt.Store.(HealthWatcher); ok {
		wg.Add(1)
		go func() { defer wg.Done(); a.watchStore(ctx, log, hw) }()
	}
	vxDev := VXLANDevName(cfg.Backend.VNI)
	wg.Add(1)
	go func() { defer wg.Done(); a.watchKernel(ctx, vxDev) }()
	wg.Add(1)
	go func() { defer wg.Done(); watchFirewall(ctx, log, a.fwDirty, a.nftDirty, a.podChanged) }()
	wg.Add(1)
	go func() { defer wg.Done(); watchNetconf(ctx, log, a.fwdChanged) }()

	// Wait for the first full list of peers before touching anything.
	select {
	case <-listed:
	case <-ctx.Done():
		return ctx.Err()
	}

	ticker := time.NewTicker(a.opt.Resync)
	defer ticker.Stop()
	cfgChanged := make(chan struct{}, 1)
	wg.Add(1)
	go func() { defer wg.Done(); a.opt.Store.WatchConfig(ctx, cfgChanged) }()
	// Full passes rebuild the plan from the whole snapshot and diff it against the kernel
	// mirrors; lease events in between take the incremental path (only the changed leases'
	// entries). Firewall changes only re-check the firewall.
	full, fw, drift, leases := true, true, false, false
	first := true
	grace := newGrace()
	retry := newPassRetry(a.retryFull)
	defer retry.ok()
	for {
		switch {
		case full:
			a.reportIgnored(log, peers)
			if err := a.checkIdentity(log, peers, held.Lease); err != nil {
				return err
			}
			_, _ = peers.Take() // the snapshot below covers them
			snap, newlyHeld := grace.full(time.Now(), peers.Snapshot())
			logHeld(log, newlyHeld, grace.until)
			if err := a.fullPass(ctx, log, cfg, held.Lease, snap, &ul, vxDev, fw, drift); err != nil {
				log.Warn("full pass failed; retrying", "in", retry.failed())
			} else {
				retry.ok()
			}
			full, fw, drift = false, false, false
			if a.bigPass && !first {
				// A big pass (a resync with thousands of peers) leaves megabytes of
				// garbage; hand it back now (its plan is dead once fullPass returned) rather
				// than whenever the scavenger gets to it. Start-up's is handed back at ready.
				debug.FreeOSMemory()
			}
		case leases:
			a.reportIgnored(log, peers)
			if err := a.checkIdentity(log, peers, held.Lease); err != nil {
				return err
			}
			changed, relisted := peers.Take()
			if relisted {
				full = true
				continue
			}
			changed, newlyHeld := grace.incremental(time.Now(), changed)
			logHeld(log, newlyHeld, grace.until)
			if a.incrementalPass(log, changed) != nil {
				full = true
				continue
			}
		case fw:
			a.firewallPass(ctx, log)
			fw = false
		}
		leases = false
		if first && a.ready() {
			first = false
			// The files and their directories exist now: watch them.
			files := make([]string, 0, len(a.files))
			for _, f := range a.files {
				files = append(files, f.path)
			}
			wg.Add(1)
			go func() { defer wg.Done(); watchFiles(ctx, log, files, a.filesDirty) }()
			log.Info("ready", "in", time.Since(start).Round(time.Millisecond), "peers", a.peerCount())
			if a.opt.OnReady != nil {
				a.opt.OnReady()
			}
			// What start-up left (a cold pass with thousands of peers leaves megabytes)
			// goes back now; readiness is already reported, so this delays nothing.
			debug.FreeOSMemory()
		}
		if full || fw {
			continue
		}
		select {
		case <-ctx.Done():
			log.Info("stopping; the dataplane stays in place")
			return nil
		case err := <-a.fatal:
			log.Error("stopping: the subnet lease cannot be kept; the dataplane stays in place until the restart", "err", err)
			return err
		case <-listed:
			leases = true
		case <-a.trigger:
			full, drift = true, true
		case <-a.fwDirty:
			fw = true
		case <-a.nftDirty:
			a.guardPass(log)
		case <-a.podChanged:
			a.schedulePodGuard()
		case <-a.storeChanged:
			switch a.storeState().State {
			case storeUnreachable:
				grace.outage()
			case storeConnected:
				if window := 2 * a.opt.LeaseTTL; grace.recovered(time.Now(), window) {
					time.AfterFunc(window, func() { signal(a.graceEnd) })
				}
			}
		case <-a.graceEnd:
			full = true
		case <-a.retryFull:
			full, fw = true, true // the firewall may be what failed
		case <-a.fwdChanged:
			a.checkForwarding(log)
		case <-a.podDirty:
			a.podGuardPass(ctx, log)
		case <-a.filesDirty:
			if err := a.ensureFiles(); err != nil {
				log.Error("cannot repair the CNI files", "err", err)
				a.setError("files", err)
			}
		case <-ticker.C:
			full, fw, drift = true, true, true
			a.invalidate()
		case <-cfgChanged:
			c, _, err := a.opt.Store.Config(ctx)
			switch {
			case err == nil && (c.Network != cfg.Network || c.SubnetLen != cfg.SubnetLen || c.Backend.Type != cfg.Backend.Type):
				// The lease (subnet, VTEP MAC) was made for the old values: applying them
				// live would mean renumbering pods. A restart of each agent applies them.
				log.Error("network, subnet length or backend changed in the network config; restart the agents to apply it, keeping the current dataplane",
					"network", c.Network, "subnetLen", c.SubnetLen, "backend", c.Backend.Type)
				a.setError("config", fmt.Errorf("network, subnetLen or backend changed in the network config; restart the agent to apply"))
			case err == nil:
				cfg = c
				a.clearError("config")
				full = true
			case errors.Is(err, context.Canceled):
			default:
				a.setError("config", err)
				a.opt.Metrics.Errors.WithLabelValues("config").Inc()
				log.Error("network config is invalid; keeping the dataplane as it is", "err", err)
			}
		}
	}
}

// keepAlive keeps the lease alive and re-claims it when lost. Each re-claim attempt is
// bounded by the store; between attempts it waits at most a second, and not at all once
// the store is seen back, so the lease is re-claimed while etcd's restored copy of it
// still lives. Failures are counted and in status; the log repeats them at growing
// intervals.
func (a *Agent) keepAlive(ctx context.Context, log *slog.Logger, held lease.Held) {
	for ctx.Err() == nil {
		err := a.opt.Store.KeepAlive(ctx, held)
		if ctx.Err() != nil {
			return
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
			h, err := a.opt.Store.Renew(ctx, held)
			if err == nil {
				held = h
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

// fullPass makes the kernel match a plan built from the whole snapshot. Routes go right
// after the VXLAN entries they depend on; the firewall, the slow part, comes last.
//
// It re-reads the underlay first, so a changed MTU reaches the VXLAN device and the
// files. An error means the pass did not complete: the caller retries it.
func (a *Agent) fullPass(ctx context.Context, log *slog.Logger, cfg config.Network, self lease.Lease, peers []lease.Lease, ul *underlay, vxDev string, firewall, drift bool) error {
	t0 := time.Now()
	a.checkForwarding(log)
	a.refreshUnderlay(log, ul)
	connected, err := a.connected(ul.dev)
	if err != nil {
		log.Warn("cannot read underlay prefixes", "err", err)
	}
	planner, p := plan.NewPlanner(plan.Input{
		Config:   cfg,
		Self:     self,
		Peers:    peers,
		Underlay: plan.Underlay{Dev: ul.dev, MTU: ul.mtu, Connected: connected},
		VXLANDev: vxDev,
	})
	p.NAT.Final = a.opt.Docker != nil
	a.mu.Lock()
	a.planner = planner
	a.mu.Unlock()
	var errs []error
	vst, err := a.vxlan.Sync(p.VXLAN, ul.dev, plan.VTEPMAC(a.opt.Node), p.Neighs, p.FDB)
	if err != nil {
		errs = append(errs, err)
	}
	rst, err := a.route.Sync(p.Routes)
	if err != nil {
		errs = append(errs, err)
	}
	cst, err := a.vxlan.Commit()
	if err != nil {
		errs = append(errs, err)
	}
	vst.Add(cst)
	// A device the plan does not name (the backend became host-gw, or the VNI changed) goes
	// only now that the routes left it: removing it first would drop its peers' routes
	// until the new ones are in.
	keep := ""
	if p.VXLAN != nil {
		keep = vxDev
	}
	if gone, err := a.vxlan.Prune(keep); err != nil {
		errs = append(errs, err)
	} else {
		vst.Pruned = len(gone)
	}
	gst, err := a.guard.Sync(guardSpec(cfg, p))
	if err != nil {
		errs = append(errs, err)
	}
	a.countGuard(gst, drift)
	var nst nat.Stats
	if firewall {
		a.nat.plan = p.NAT
		nst, err = a.natSync(ctx, p.NAT)
		if err != nil {
			errs = append(errs, err)
		}
		a.podGuardPass(ctx, log)
	} else {
		a.nat.plan = p.NAT
	}
	a.finish(log, "full", t0, vst, rst, nst, drift, errors.Join(errs...))
	// Big passes (a cold start, or a resync, with thousands of peers) leave megabytes of
	// dump buffers and plan behind.
	a.bigPass = len(peers) > 1000 || rst.Added+rst.Replaced+rst.Deleted > 500
	for _, peer := range p.Peers {
		if peer.Mode == plan.Unreachable {
			log.Warn("peer unreachable", "peer", peer.Node, "subnet", peer.Subnet, "reason", peer.Reason)
		}
	}
	if len(errs) != 0 {
		return errors.Join(errs...)
	}
	if err := a.writeFiles(cfg, self, p); err != nil {
		log.Error("cannot write the CNI files", "err", err)
		a.setError("files", err)
		return err
	}
	a.clearError("files")
	if a.opt.Docker != nil && !a.dockerPass(ctx, log, self, p) {
		return nil // dockerPass retries on its own backoff
	}
	if !a.ready() {
		a.setReady()
	}
	return nil
}

// refreshUnderlay re-reads the underlay device, its MTU and address (they were read at
// start; an MTU change must reach the VXLAN device and the pods). The address peers use
// is the one in the lease: a changed one is reported, not applied.
func (a *Agent) refreshUnderlay(log *slog.Logger, ul *underlay) {
	cur, err := a.underlay()
	if err != nil {
		log.Warn("cannot re-read the underlay; keeping the last one", "dev", ul.dev, "err", err)
		return
	}
	if cur.ip != ul.ip {
		if cur.ip != a.ulWarned {
			log.Warn("the underlay address changed; peers keep using the leased address until the agent restarts", "leased", ul.ip, "now", cur.ip)
			a.ulWarned = cur.ip
		}
		cur.ip = ul.ip
	}
	if cur != *ul {
		log.Info("underlay changed", "dev", cur.dev, "mtu", cur.mtu, "was", ul.dev, "wasMTU", ul.mtu)
		*ul = cur
		a.ulDev.Store(cur.dev)
	}
}

// incrementalPass applies changed leases through the planner and fixes only their
// entries. An error means "run a full pass instead".
func (a *Agent) incrementalPass(log *slog.Logger, changed []lease.Lease) error {
	if len(changed) == 0 {
		return nil
	}
	t0 := time.Now()
	a.mu.Lock()
	planner := a.planner
	if planner == nil {
		a.mu.Unlock()
		return errors.New("no plan yet")
	}
	ch := planner.Update(changed)
	a.mu.Unlock()
	if ch.Empty() {
		return nil
	}
	var errs []error
	vst, err := a.vxlan.Apply(ch.Neighs, ch.FDB, planner.Neigh, planner.HasFDB)
	if errors.Is(err, vxlan.ErrNoMirror) {
		return err
	}
	if err != nil {
		errs = append(errs, err)
	}
	rst, err := a.route.Apply(ch.Routes, planner.Route)
	if errors.Is(err, route.ErrNoMirror) {
		return err
	}
	if err != nil {
		errs = append(errs, err)
	}
	cst, err := a.vxlan.Commit()
	if err != nil {
		errs = append(errs, err)
	}
	vst.Add(cst)
	// The VXLAN allow-list follows the peers: a new peer's packets are accepted from now.
	allow := make(map[string]vxguard.Peer, len(changed))
	for _, l := range changed {
		v, _ := planner.Peer(l.Node)
		allow[l.Node] = guardPeer(v)
	}
	gst, err := a.guard.Update(allow)
	if errors.Is(err, vxguard.ErrNoMirror) {
		return err
	}
	if err != nil {
		errs = append(errs, err)
	}
	a.countGuard(gst, false)
	a.finish(log, "incremental", t0, vst, rst, nat.Stats{}, false, errors.Join(errs...))
	for _, l := range changed {
		if v, ok := planner.Peer(l.Node); ok && v.Mode == plan.Unreachable {
			log.Warn("peer unreachable", "peer", v.Node, "subnet", v.Subnet, "reason", v.Reason)
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	return nil
}

type natResult struct {
	plan plan.NAT
	st   nat.Stats
	err  error
}

func (a *Agent) startEarlyNAT(ctx context.Context, n plan.NAT) {
	ch := make(chan natResult, 1)
	a.nat.early = ch
	go func() {
		st, err := a.nat.r.Sync(ctx, n)
		ch <- natResult{n, st, err}
	}()
}

// natSync syncs the NAT chains to n, or takes the start-up sync's result when it was for
// n and succeeded.
func (a *Agent) natSync(ctx context.Context, n plan.NAT) (nat.Stats, error) {
	if ch := a.nat.early; ch != nil {
		a.nat.early = nil
		if r := <-ch; r.err == nil && r.plan == n {
			return r.st, nil
		}
	}
	return a.nat.r.Sync(ctx, n)
}

// firewallPass re-checks the NAT and FORWARD chains (after a ruleset change).
func (a *Agent) firewallPass(ctx context.Context, log *slog.Logger) {
	t0 := time.Now()
	nst, err := a.natSync(ctx, a.nat.plan)
	a.finish(log, "firewall", t0, vxlan.Stats{}, route.Stats{}, nst, true, err)
}

// guardSpec is the VXLAN allow-list for a plan: every peer the plan routes to (a directly
// routed peer sends no VXLAN, but allowing it costs nothing and survives a mode change).
func guardSpec(cfg config.Network, p plan.Plan) vxguard.Spec {
	s := vxguard.Spec{Network: cfg.Network, SubnetLen: cfg.SubnetLen, Peers: make(map[string]vxguard.Peer, len(p.Peers))}
	if p.VXLAN != nil {
		s.Port = p.VXLAN.Port
	}
	for _, v := range p.Peers {
		if g := guardPeer(v); g.IP.IsValid() {
			s.Peers[v.Node] = g
		}
	}
	return s
}

// guardPeer is what the allow-list accepts from a peer: VXLAN from its public IP (and, on
// the same L2, its underlay MAC) carrying its pods' or its own addresses.
func guardPeer(v plan.Peer) vxguard.Peer {
	if v.Mode == plan.Direct || v.Mode == plan.VXLAN {
		return vxguard.Peer{IP: v.PublicIP, Subnet: v.Subnet, MAC: v.UnderlayMAC}
	}
	return vxguard.Peer{}
}

// guardPass re-checks netagent's nftables table after someone changed it.
func (a *Agent) guardPass(log *slog.Logger) {
	t0 := time.Now()
	st, err := a.guard.Resync()
	if errors.Is(err, vxguard.ErrNoMirror) {
		signal(a.trigger) // no full pass yet, or the last one failed: a full pass syncs it
		return
	}
	a.countGuard(st, true)
	if err != nil {
		a.opt.Metrics.Errors.WithLabelValues("reconcile").Inc()
		log.Error("VXLAN allow-list repair failed", "err", err)
		return
	}
	if st.Changed() {
		log.Info("VXLAN allow-list repaired", "rebuilt", st.Rebuilt, "added", st.Added, "deleted", st.Delete, "took", time.Since(t0).Round(time.Microsecond))
	}
}

func (a *Agent) countGuard(st vxguard.Stats, drift bool) {
	if !a.ready() || !st.Changed() {
		return
	}
	c := a.opt.Metrics.Changes
	if drift {
		c = a.opt.Metrics.Repairs
	}
	n := st.Added + st.Delete
	if st.Rebuilt {
		n++
	}
	c.WithLabelValues("vxlan-allowlist").Add(float64(n))
}

// finish records a pass's outcome in metrics, status and the log.
func (a *Agent) finish(log *slog.Logger, kind string, t0 time.Time, vst vxlan.Stats, rst route.Stats, nst nat.Stats, drift bool, err error) {
	m := a.opt.Metrics
	m.ReconcileSeconds.Observe(time.Since(t0).Seconds())
	a.countRepairs(vst, rst, nst, drift)
	a.mu.Lock()
	counts := a.planner.Count()
	a.mu.Unlock()
	for _, mode := range []plan.Mode{plan.Direct, plan.VXLAN, plan.Unreachable} {
		m.Peers.WithLabelValues(string(mode)).Set(float64(counts[mode]))
	}
	if err != nil {
		m.Errors.WithLabelValues("reconcile").Inc()
		log.Error("reconcile incomplete", "pass", kind, "err", err)
		a.setError("reconcile", err)
	} else {
		a.clearError("reconcile")
	}
	if vst.Changed() || rst.Changed() || nst.Changed() {
		log.Info("dataplane updated", "pass", kind, "routes", fmt.Sprintf("+%d ~%d -%d", rst.Added, rst.Replaced, rst.Deleted),
			"neigh", fmt.Sprintf("+%d -%d", vst.NeighSet, vst.NeighDel), "fdb", fmt.Sprintf("+%d -%d", vst.FDBSet, vst.FDBDel),
			"nat", nst.Changed(), "took", time.Since(t0).Round(time.Microsecond))
	}
}

// countRepairs counts kernel changes; when the plan had not changed they repaired drift.
func (a *Agent) countRepairs(v vxlan.Stats, r route.Stats, n nat.Stats, drift bool) {
	if !a.ready() {
		return // the first pass builds, it does not repair
	}
	c := a.opt.Metrics.Changes
	if drift {
		c = a.opt.Metrics.Repairs
	}
	c.WithLabelValues("route").Add(float64(r.Added + r.Replaced + r.Deleted))
	c.WithLabelValues("neigh").Add(float64(v.NeighSet + v.NeighDel))
	c.WithLabelValues("fdb").Add(float64(v.FDBSet + v.FDBDel))
	c.WithLabelValues("vxlan-device").Add(float64(v.DeviceChanges()))
	c.WithLabelValues("nat").Add(float64(n.ChainsRewritten + n.JumpsFixed))
}

type underlay struct {
	dev string
	ip  netip.Addr
	mtu int
	mac string // published for peers on the same L2 (empty: not Ethernet)
}

// underlay finds the interface and address peers reach this node at.
func (a *Agent) underlay() (underlay, error) {
	var link netlink.Link
	var err error
	switch {
	case a.opt.Iface != "":
		link, err = a.h.LinkByName(a.opt.Iface)
		if err != nil {
			return underlay{}, fmt.Errorf("--iface %s: %w", a.opt.Iface, err)
		}
	case a.opt.PublicIP.IsValid():
		link, err = a.linkWith(a.opt.PublicIP)
		if err != nil {
			return underlay{}, err
		}
	default:
		routes, err := a.h.RouteGet(net.IPv4(192, 0, 2, 0))
		if err != nil || len(routes) == 0 {
			return underlay{}, fmt.Errorf("no --iface given and no default route to pick one from")
		}
		if link, err = a.h.LinkByIndex(routes[0].LinkIndex); err != nil {
			return underlay{}, err
		}
	}
	ip := a.opt.PublicIP
	if !ip.IsValid() {
		addrs, err := nldump.Retry(func() ([]netlink.Addr, error) { return a.h.AddrList(link, netlink.FAMILY_V4) })
		if err != nil || len(addrs) == 0 {
			return underlay{}, fmt.Errorf("underlay %s has no IPv4 address (set --public-ip)", link.Attrs().Name)
		}
		ip, _ = netip.AddrFromSlice(addrs[0].IP.To4())
	}
	mac := ""
	if m := link.Attrs().HardwareAddr; len(m) == 6 {
		mac = m.String()
	}
	return underlay{dev: link.Attrs().Name, ip: ip, mtu: link.Attrs().MTU, mac: mac}, nil
}

func (a *Agent) linkWith(ip netip.Addr) (netlink.Link, error) {
	addrs, err := nldump.Retry(func() ([]netlink.Addr, error) { return a.h.AddrList(nil, netlink.FAMILY_V4) })
	if err != nil {
		return nil, err
	}
	for _, ad := range addrs {
		if x, ok := netip.AddrFromSlice(ad.IP.To4()); ok && x == ip {
			return a.h.LinkByIndex(ad.LinkIndex)
		}
	}
	return nil, fmt.Errorf("--public-ip %s is not on any interface", ip)
}

func (a *Agent) connected(dev string) ([]netip.Prefix, error) {
	l, err := a.h.LinkByName(dev)
	if err != nil {
		return nil, err
	}
	addrs, err := nldump.Retry(func() ([]netlink.Addr, error) { return a.h.AddrList(l, netlink.FAMILY_V4) })
	if err != nil {
		return nil, err
	}
	var out []netip.Prefix
	for _, ad := range addrs {
		ip, ok := netip.AddrFromSlice(ad.IP.To4())
		if !ok {
			continue
		}
		ones, _ := ad.Mask.Size()
		out = append(out, netip.PrefixFrom(ip, ones).Masked())
	}
	return out, nil
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

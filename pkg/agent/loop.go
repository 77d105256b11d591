package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"runtime/debug"
	"sync/atomic"
	"time"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/dataplane"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/plan"
)

// reason is why the loop must run: inputs post theirs to the inbox; the loop takes them
// all at once, so a burst of events costs one pass.
type reason uint32

const (
	rLeases       reason = 1 << iota // the peer view changed
	rKernel                          // the kernel drifted from the plan (dataplane Watch)
	rFirewall                        // iptables changed (someone's, or ours)
	rAllow                           // netagent's own nftables table changed
	rResync                          // the resync ticker
	rConfig                          // the network config changed in the store
	rStore                           // the store became reachable or unreachable
	rGrace                           // the post-outage window for vanished peers ended
	rRetry                           // time to retry a failed full pass
	rForward                         // the kernel announced a forwarding change
	rFiles                           // a CNI file was changed or removed
	rDocker                          // the Docker step succeeded
	rKeyPublished                    // the lease with a new node's WireGuard key was written
	rStart                           // the first pass
	rRelist                          // the peers were listed again, or a delta could not be applied
	rFatal                           // the lease cannot be kept by this run (its error is in Agent.fatal)

	// rFull are the reasons for a full pass; rDrift those where the plan did not change,
	// so what a pass writes is counted as a repair; rCheckFirewall those that also check
	// the pod anti-spoofing set.
	rFull          = rKernel | rFirewall | rAllow | rResync | rGrace | rRetry | rStart | rRelist
	rDrift         = rKernel | rFirewall | rAllow | rResync
	rCheckFirewall = rStart | rFirewall | rResync | rRetry
)

// inbox collects reasons and wakes the loop. Events carry no state: the loop reads the
// inputs themselves.
type inbox struct {
	pending *atomic.Uint32
	wake    chan struct{}
}

func newInbox() inbox { return inbox{pending: new(atomic.Uint32), wake: make(chan struct{}, 1)} }

func (in inbox) post(r reason) {
	in.pending.Or(uint32(r))
	signal(in.wake)
}

func (in inbox) take() reason { return reason(in.pending.Swap(0)) }

// relay posts r whenever ch signals, until ctx ends.
func (in inbox) relay(ctx context.Context, ch <-chan struct{}, r reason) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-ch:
			in.post(r)
		}
	}
}

// every posts r every d, until ctx ends.
func (in inbox) every(ctx context.Context, d time.Duration, r reason) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			in.post(r)
		}
	}
}

// state is what the loop owns.
type state struct {
	cfg    config.Network
	self   lease.Lease
	ul     dataplane.Underlay
	peers  *lease.Peers
	grace  *grace
	start  time.Time
	passOK bool // the last full pass succeeded
}

// loop runs passes until ctx ends: inputs -> snapshot -> plan -> Set.
func (a *Agent) loop(ctx context.Context, log *slog.Logger, s *state) error {
	retry := newPassRetry(make(chan struct{}, 1))
	defer retry.ok()
	a.spawn(func() { a.in.relay(ctx, retry.retry, rRetry) })
	r := rStart
	for {
		if r&rFatal != 0 {
			err := <-a.fatal
			log.Error("stopping: the subnet lease cannot be kept; the dataplane stays in place until the restart", "err", err)
			return err
		}
		full := a.handle(ctx, log, s, r)
		drift := r&rDrift != 0
		switch {
		case full:
			if err := a.checkIdentity(log, s.peers, s.self); err != nil {
				return err
			}
			firstPass := !a.ready()
			err := a.fullPass(ctx, log, s, r&rCheckFirewall != 0, drift)
			s.passOK = err == nil
			a.announceKey(log, s)
			if err != nil {
				log.Warn("full pass failed; retrying", "in", retry.failed())
			} else {
				retry.ok()
			}
			if a.bigPass && !firstPass {
				// A big pass (a resync with thousands of peers) leaves megabytes of
				// garbage; hand it back now (its plan is dead once fullPass returned) rather
				// than whenever the scavenger gets to it. Start-up's is handed back at ready.
				debug.FreeOSMemory()
			}
		case r&rLeases != 0:
			if err := a.checkIdentity(log, s.peers, s.self); err != nil {
				return err
			}
			if a.incrementalPass(ctx, log, s) {
				r = rRelist
				continue
			}
		}
		a.maybeReady(ctx, log, s)
		select {
		case <-ctx.Done():
			log.Info("stopping; the dataplane stays in place")
			return nil
		case <-a.in.wake:
			r = a.in.take()
		}
	}
}

// handle deals with the reasons that need no pass of their own, and invalidates what
// someone else changed; it reports whether a full pass is due.
func (a *Agent) handle(ctx context.Context, log *slog.Logger, s *state, r reason) (full bool) {
	if r&rForward != 0 {
		a.checkForwarding(log)
	}
	if r&rFiles != 0 {
		if err := a.ensureFiles(); err != nil {
			log.Error("cannot repair the CNI files", "err", err)
			a.setError("files", err)
		}
	}
	if r&rStore != 0 {
		switch a.storeState().State {
		case storeUnreachable:
			s.grace.outage()
		case storeConnected:
			if window := 2 * a.opt.LeaseTTL; s.grace.recovered(time.Now(), window) {
				time.AfterFunc(window, func() { a.in.post(rGrace) })
			}
		}
	}
	full = r&rFull != 0
	if r&rConfig != 0 && a.reloadConfig(ctx, log, s) {
		full = true
	}
	switch {
	case r&rResync != 0:
		a.dp.Invalidate(dataplane.All)
	case r&(rFirewall|rRetry) != 0: // the firewall may be what failed
		a.dp.Invalidate(dataplane.NAT)
	}
	if r&rAllow != 0 {
		a.dp.Invalidate(dataplane.Allow)
	}
	a.reportIgnored(log, s.peers)
	return full
}

// reloadConfig re-reads the network config; it reports whether it changed what the plan
// depends on.
func (a *Agent) reloadConfig(ctx context.Context, log *slog.Logger, s *state) bool {
	c, _, err := a.opt.Store.Config(ctx)
	switch {
	case err == nil && (c.Network != s.cfg.Network || c.SubnetLen != s.cfg.SubnetLen || c.Backend.Type != s.cfg.Backend.Type ||
		(c.Backend.Type == config.WireGuard && c.Backend.Port != s.cfg.Backend.Port)):
		// (The WireGuard port is published in the lease, like the VTEP MAC.)
		// The lease (subnet, VTEP MAC) was made for the old values: applying them
		// live would mean renumbering pods. A restart of each agent applies them.
		log.Error("network, subnet length, backend or WireGuard port changed in the network config; restart the agents to apply it, keeping the current dataplane",
			"network", c.Network, "subnetLen", c.SubnetLen, "backend", c.Backend.Type)
		a.setError("config", fmt.Errorf("network, subnetLen or backend changed in the network config; restart the agent to apply"))
	case err == nil:
		s.cfg = c
		a.clearError("config")
		return true
	case errors.Is(err, context.Canceled):
	default:
		a.setError("config", err)
		a.opt.Metrics.Errors.WithLabelValues("config").Inc()
		log.Error("network config is invalid; keeping the dataplane as it is", "err", err)
	}
	return false
}

// maybeReady marks the agent ready after its first successful full pass (in route mode,
// once Docker uses the lease too; a new WireGuard node, once its key is in the store),
// starts watching the files it wrote, and tells OnReady.
func (a *Agent) maybeReady(ctx context.Context, log *slog.Logger, s *state) {
	if a.ready() || !s.passOK || (a.opt.Docker != nil && !a.dockerOK.Load()) || !a.keyPublished.Load() {
		return
	}
	a.setReady()
	// The files and their directories exist now: watch them.
	files := make([]string, 0, len(a.files))
	for _, f := range a.files {
		files = append(files, f.path)
	}
	changed := make(chan struct{}, 1)
	a.spawn(func() { a.watchFiles(ctx, log, files, changed) })
	a.spawn(func() { a.in.relay(ctx, changed, rFiles) })
	log.Info("ready", "in", time.Since(s.start).Round(time.Millisecond), "peers", a.peerCount())
	if a.opt.OnReady != nil {
		a.opt.OnReady()
	}
	// What start-up left (a cold pass with thousands of peers leaves megabytes) goes back
	// now; readiness is already reported, so this delays nothing.
	debug.FreeOSMemory()
}

// fullPass makes the kernel hold the plan built from the whole snapshot. It re-reads the
// underlay first, so a changed MTU reaches the VXLAN device and the files. An error means
// the pass did not complete: the caller retries it.
func (a *Agent) fullPass(ctx context.Context, log *slog.Logger, s *state, firewall, drift bool) error {
	t0 := time.Now()
	a.refreshUnderlay(log, s) // first: an address it publishes changes which peers are valid
	_, _ = s.peers.Take()     // the snapshot below covers them
	a.mu.Lock()
	prev := a.planner
	a.mu.Unlock()
	peers, newlyHeld := s.grace.full(time.Now(), s.peers.Snapshot(), prev)
	logHeld(log, newlyHeld, s.grace.until)
	a.checkForwarding(log)
	planner, p := plan.NewPlanner(a.input(s.cfg, s.self, s.ul, peers))
	a.mu.Lock()
	a.planner = planner
	a.mu.Unlock()
	st, err := a.dp.Set(ctx, p)
	a.finish(log, "full", t0, st, drift, err)
	if p.KeepVXLAN != a.keptVXLAN {
		if p.KeepVXLAN != "" {
			log.Info("keeping the VXLAN device: peers still publish a VTEP and may send through it until they see this node's host-gw lease", "dev", p.KeepVXLAN)
		} else {
			log.Info("no peer publishes a VTEP any more: the VXLAN device kept for them goes", "dev", a.keptVXLAN)
		}
		a.keptVXLAN = p.KeepVXLAN
	}
	if firewall && a.podGuardEnabled() {
		a.podGuardPass(ctx, log)
	}
	// Big passes (a cold start, or a resync, with thousands of peers) leave megabytes of
	// dump buffers and plan behind.
	a.bigPass = len(peers) > 1000 || st.Routes.Added+st.Routes.Replaced+st.Routes.Deleted > 500
	warnUnreachable(log, p.Peers)
	if err != nil {
		return err
	}
	if err := a.writeFiles(s.cfg, s.self, p); err != nil {
		log.Error("cannot write the CNI files", "err", err)
		a.setError("files", err)
		return err
	}
	a.clearError("files")
	if a.opt.Docker != nil {
		a.kickDocker(s.self, p)
	}
	return nil
}

func warnUnreachable(log *slog.Logger, peers []plan.Peer) {
	for _, v := range peers {
		switch {
		case v.Mode != plan.Unreachable:
		case v.Reason == plan.NoWGKey:
			log.Info("peer unreachable until it publishes its WireGuard key", "peer", v.Node, "subnet", v.Subnet)
		default:
			log.Warn("peer unreachable", "peer", v.Node, "subnet", v.Subnet, "reason", v.Reason)
		}
	}
}

// refreshUnderlay re-reads the underlay device, its MTU, address and prefixes (an MTU
// change must reach the VXLAN device and the pods). The address peers use is the one in
// the lease: a changed one is reported, not applied (peers' routes and allow-lists follow
// the lease; moving them is a restart's job). An address of a family the lease lacks (an
// IPv6 address that came up, or finished duplicate address detection, after the start)
// replaces nothing: it is published.
func (a *Agent) refreshUnderlay(log *slog.Logger, s *state) {
	cur, err := a.dp.Underlay(a.opt.Iface, a.opt.PublicIP)
	if err != nil {
		log.Warn("cannot re-read the underlay; keeping the last one", "dev", s.ul.Dev, "err", err)
		return
	}
	if pub := gained(s.self, cur); pub != s.self {
		log.Info("the underlay gained an address; publishing it in the lease", "publicIP", pub.PublicIP, "publicIP6", pub.PublicIP6)
		a.publish(s, pub)
	}
	cur.IP = a.keepLeased(log, s.self.PublicIP, cur.IP, &a.ulWarned)
	cur.IP6 = a.keepLeased(log, s.self.PublicIP6, cur.IP6, &a.ulWarned6)
	if cur.Dev != s.ul.Dev || cur.MTU != s.ul.MTU || cur.MAC != s.ul.MAC {
		log.Info("underlay changed", "dev", cur.Dev, "mtu", cur.MTU, "was", s.ul.Dev, "wasMTU", s.ul.MTU)
	}
	s.ul = cur
}

// gained is self with the underlay addresses of the families self lacks and ul has
// (Underlay reports no IPv6 address still in duplicate address detection).
func gained(self lease.Lease, ul dataplane.Underlay) lease.Lease {
	if !self.PublicIP.IsValid() {
		self.PublicIP = ul.IP
	}
	if !self.PublicIP6.IsValid() {
		self.PublicIP6 = ul.IP6
	}
	return self
}

// announceKey publishes a new node's WireGuard key after its first full pass, whether or
// not the pass succeeded (a failed one is retried; peers' handshakes then wait for the
// device, as they would have without the wait).
func (a *Agent) announceKey(log *slog.Logger, s *state) {
	if a.wgAnnounce.key == "" {
		return
	}
	pub := s.self
	pub.WGPublicKey, pub.WGPort = a.wgAnnounce.key, a.wgAnnounce.port
	a.wgAnnounce.key, a.wgAnnounce.port = "", 0
	log.Info("the WireGuard device holds its peers; publishing its key in the lease", "publicKey", pub.WGPublicKey, "in", time.Since(s.start).Round(time.Millisecond))
	a.publish(s, pub)
}

// publish makes pub the node's lease: the loop plans with it now, the peers' view refuses
// other leases claiming its addresses, and keepAlive writes it to the store (retrying
// until it succeeds, as a re-claim).
func (a *Agent) publish(s *state, pub lease.Lease) {
	s.self = pub
	s.peers.SetSelfIPs(pub.PublicIP, pub.PublicIP6)
	a.setLease(pub, s.cfg)
	select {
	case <-a.republish: // not taken yet: this one replaces it
	default:
	}
	a.republish <- pub
}

// keepLeased returns the leased underlay address, warning once per new address when the
// interface now has another.
func (a *Agent) keepLeased(log *slog.Logger, leased, now netip.Addr, warned *netip.Addr) netip.Addr {
	if now != leased && now != *warned {
		log.Warn("the underlay address changed; peers keep using the leased address until the agent restarts", "leased", leased, "now", now)
		*warned = now
	}
	return leased
}

// incrementalPass applies changed leases through the planner: the dataplane gets the
// planner's delta. It reports whether a full pass is needed instead.
func (a *Agent) incrementalPass(ctx context.Context, log *slog.Logger, s *state) (full bool) {
	changed, relisted := s.peers.Take()
	if relisted {
		return true
	}
	t0 := time.Now()
	a.mu.Lock()
	planner := a.planner
	a.mu.Unlock()
	if planner == nil {
		return true
	}
	// (Only this loop changes the planner: reading it unlocked here is safe.)
	changed, newlyHeld := s.grace.incremental(t0, changed, planner)
	logHeld(log, newlyHeld, s.grace.until)
	if len(changed) == 0 {
		return false
	}
	a.mu.Lock()
	next := planner.Update(changed)
	a.mu.Unlock()
	if next.Delta.Empty() {
		return false
	}
	st, err := a.dp.Set(ctx, next)
	if errors.Is(err, dataplane.ErrStale) {
		return true
	}
	a.finish(log, "incremental", t0, st, false, err)
	warnUnreachable(log, next.Delta.Peers)
	return err != nil
}

// finish records a pass's outcome in metrics, status and the log.
func (a *Agent) finish(log *slog.Logger, kind string, t0 time.Time, st dataplane.Stats, drift bool, err error) {
	m := a.opt.Metrics
	m.ReconcileSeconds.Observe(time.Since(t0).Seconds())
	a.countChanges(st, drift)
	a.mu.Lock()
	counts := a.planner.Count()
	a.mu.Unlock()
	for _, mode := range []plan.Mode{plan.Direct, plan.VXLAN, plan.WireGuard, plan.Unreachable} {
		m.Peers.WithLabelValues(string(mode)).Set(float64(counts[mode]))
	}
	if err != nil {
		m.Errors.WithLabelValues("reconcile").Inc()
		log.Error("reconcile incomplete", "pass", kind, "err", err)
		a.setError("reconcile", err)
	} else {
		a.clearError("reconcile")
	}
	if !st.WireGuard.Empty() {
		log.Info("wireguard device updated", "pass", kind, "changes", st.WireGuard.String())
	}
	if st.VXLAN.Changed() || st.Routes.Changed() || st.NAT.Changed() {
		r, v := st.Routes, st.VXLAN
		log.Info("dataplane updated", "pass", kind, "routes", fmt.Sprintf("+%d ~%d -%d", r.Added, r.Replaced, r.Deleted),
			"neigh", fmt.Sprintf("+%d -%d", v.NeighSet, v.NeighDel), "fdb", fmt.Sprintf("+%d -%d", v.FDBSet, v.FDBDel),
			"nat", st.NAT.Changed(), "took", time.Since(t0).Round(time.Microsecond))
	}
	if st.Allow.Changed() && drift {
		log.Info("VXLAN allow-list repaired", "rebuilt", st.Allow.Rebuilt, "added", st.Allow.Added, "deleted", st.Allow.Delete)
	}
}

// countChanges counts kernel changes; when the plan had not changed they repaired drift.
func (a *Agent) countChanges(st dataplane.Stats, drift bool) {
	if !a.ready() {
		return // the first pass builds, it does not repair
	}
	c := a.opt.Metrics.Changes
	if drift {
		c = a.opt.Metrics.Repairs
	}
	r, v, n, g := st.Routes, st.VXLAN, st.NAT, st.Allow
	c.WithLabelValues("route").Add(float64(r.Added + r.Replaced + r.Deleted))
	c.WithLabelValues("neigh").Add(float64(v.NeighSet + v.NeighDel))
	c.WithLabelValues("fdb").Add(float64(v.FDBSet + v.FDBDel))
	c.WithLabelValues("vxlan-device").Add(float64(v.DeviceChanges()))
	c.WithLabelValues("nat").Add(float64(n.ChainsRewritten + n.JumpsFixed))
	if w := st.WireGuard; !w.Empty() {
		k := len(w.Added) + len(w.Updated) + len(w.Removed)
		for _, on := range []bool{w.Created, w.PrivateKey, w.ListenPort, w.MTU, w.Up} {
			if on {
				k++
			}
		}
		c.WithLabelValues("wireguard").Add(float64(k))
	}
	if g.Changed() {
		k := g.Added + g.Delete
		if g.Rebuilt {
			k++
		}
		c.WithLabelValues("vxlan-allowlist").Add(float64(k))
	}
}

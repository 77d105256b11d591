package agent

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/netagent/netagent/pkg/antispoof"
	"github.com/netagent/netagent/pkg/ipam"
)

// The pod anti-spoofing set (pkg/antispoof) is written by the CNI plugin as pods come and
// go; the agent keeps it equal to the plugin's address stores, which repairs a lost
// element, an agent-less window or an `nft flush ruleset`. It checks on full passes with
// the firewall (start, resync) and, in a small loop of its own, shortly after any change
// to netagent's bridge-family nftables table: shortly after, because every pod ADD and
// DEL changes the set too, and one check covers a burst of them.

const podGuardDelay = 300 * time.Millisecond

// podGuard is the state of the pod anti-spoofing checks.
type podGuard struct {
	changed chan struct{} // the pod anti-spoofing table changed (watchFirewall)
	again   chan struct{} // a check wants another one shortly
	sync    func(ctx context.Context, dataDir string, addOK func(antispoof.Entry) bool) (antispoof.Stats, []antispoof.Entry, error)

	mu      sync.Mutex           // checks run from the loop and from runPodGuard
	missing map[string]time.Time // entries missing at the last check, since when
}

func newPodGuard() podGuard {
	return podGuard{changed: make(chan struct{}, 1), again: make(chan struct{}, 1), sync: antispoof.SyncDataDirFunc}
}

func (a *Agent) podDataDir() string { return or(a.opt.CNIConf.DataDir, ipam.DefaultDataDir) }

// podGuardEnabled: only where netagent-cni wires the pods (not on Docker hosts).
func (a *Agent) podGuardEnabled() bool { return a.opt.Docker == nil }

// runPodGuard checks the set podGuardDelay after the table changed or a check asked for
// another, until ctx ends. A change while a check is pending does not postpone it.
func (a *Agent) runPodGuard(ctx context.Context, log *slog.Logger) {
	var due <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.pod.changed:
		case <-a.pod.again:
		case <-due:
			due = nil
			a.podGuardPass(ctx, log)
			continue
		}
		if due == nil {
			due = time.After(podGuardDelay)
		}
	}
}

func (a *Agent) podGuardPass(ctx context.Context, log *slog.Logger) {
	g := &a.pod
	g.mu.Lock()
	defer g.mu.Unlock()
	t0 := time.Now()
	// An entry is added only once it was missing at an earlier check too: the plugin adds
	// entries itself, so one missing now is most likely a pod in the middle of its ADD or
	// DEL, and putting it back would race the plugin (and leave a deleted pod's entry).
	seen := g.missing
	now := map[string]time.Time{}
	st, withheld, err := g.sync(ctx, a.podDataDir(), func(e antispoof.Entry) bool {
		first, ok := seen[e.String()]
		return ok && t0.Sub(first) >= podGuardDelay/2
	})
	if err != nil {
		// Most likely a DEL removed an entry this sync was removing too (the kernel refuses
		// the whole transaction): look again shortly, keeping what was seen missing.
		if !errors.Is(err, antispoof.ErrNoDataDir) {
			signal(g.again)
		}
		a.opt.Metrics.Errors.WithLabelValues("reconcile").Inc()
		a.setError("antispoof", err)
		log.Error("pod anti-spoofing set not in sync", "err", err)
		return
	}
	a.clearError("antispoof")
	for _, e := range withheld {
		k := e.String()
		if first, ok := seen[k]; ok {
			now[k] = first
		} else {
			now[k] = t0
		}
	}
	g.missing = now
	if len(withheld) > 0 || st.Chains > 0 {
		// Look again: a withheld entry is added then if still missing; a routed pod's
		// chain written back during its DEL (between the chain's removal and the record's
		// release) is removed then, once the record is gone too.
		signal(g.again)
	}
	if !st.Repaired && st.Added+st.Removed+st.Chains == 0 {
		return
	}
	if a.ready() {
		n := st.Added + st.Removed + st.Chains
		if st.Repaired {
			n++
		}
		a.opt.Metrics.Repairs.WithLabelValues("antispoof").Add(float64(n))
	}
	log.Info("pod anti-spoofing set repaired", "rules", st.Repaired, "added", st.Added, "removed", st.Removed, "routedChains", st.Chains,
		"entries", st.Entries, "took", time.Since(t0).Round(time.Microsecond))
}

// podSpoofDrops reads the spoofed-frame counter for /metrics (0 before the first pod).
func podSpoofDrops() uint64 {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	p, _, err := antispoof.Dropped(ctx)
	if err != nil {
		return 0
	}
	return p
}

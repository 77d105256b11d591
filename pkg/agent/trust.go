package agent

import (
	"log/slog"
	"maps"

	"github.com/netagent/netagent/pkg/lease"
)

// reportIgnored logs each lease the peer view does not use once (per key and reason),
// counts it, and shows the current set in status: garbage present at start-up is reported
// like garbage written later.
func (a *Agent) reportIgnored(log *slog.Logger, peers *lease.Peers) {
	bad := peers.Invalids()
	if maps.Equal(bad, a.ignored) {
		return
	}
	for k, why := range bad {
		if a.ignored[k] != why {
			log.Warn("ignoring lease", "key", k, "reason", why)
			a.opt.Metrics.IgnoredTotal.Inc()
		}
	}
	a.ignored = bad
	a.opt.Metrics.IgnoredLeases.Set(float64(len(bad)))
	a.mu.Lock()
	a.status.IgnoredLeases = maps.Clone(bad)
	a.mu.Unlock()
}

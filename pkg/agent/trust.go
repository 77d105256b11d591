package agent

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
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

// newInstance is a random token for this agent run, stored in its lease.
func newInstance() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b) // never fails (crypto/rand panics instead)
	return hex.EncodeToString(b)
}

// checkIdentity stops the agent when the lease of its node name was rewritten by another
// agent run (another host started with the same node name): fighting over it would flip
// the node's public IP between the two hosts on every peer. The dataplane stays as it is.
func (a *Agent) checkIdentity(log *slog.Logger, peers *lease.Peers, self lease.Lease) error {
	cur, ok := peers.Node(self.Node)
	if !ok || cur.Instance == self.Instance && cur.PublicIP == self.PublicIP {
		return nil // our own, or gone for now (expired, being re-claimed)
	}
	err := fmt.Errorf("%w: the lease of node %s was rewritten by another agent (public IP %s, subnet %s, instance %q; ours: %s, %s, %q); stopping rather than fighting over it: give each host its own --node-name",
		lease.ErrIdentity, self.Node, cur.PublicIP, cur.Subnet, cur.Instance, self.PublicIP, self.Subnet, self.Instance)
	a.setError("lease", err)
	a.opt.Metrics.Errors.WithLabelValues("lease").Inc()
	log.Error("node identity conflict", "err", err)
	return err
}

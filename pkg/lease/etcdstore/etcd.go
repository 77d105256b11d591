// Package etcdstore is the lease store on etcd (`netagent run`'s default subnet manager):
// it implements lease.Store and lease.HealthWatcher, and serves the operator's commands
// (config set, reserve, leave).
//
// A node's lease is a key bound to an etcd lease with a TTL, kept alive by the agent;
// peers come from one prefix watch, re-listed on compaction or a broken stream.
//
// Scale: every agent holds one watch on the subnets prefix and one keepalive stream; a
// change costs each agent one event, and a re-list one range read of all leases.
package etcdstore

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"path"
	"slices"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/connectivity"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/lease"
)

// Keys under the prefix:
//
//	config                  the network config (config.Network JSON)
//	subnets/<10.244.1.0-24> a live lease (lease.Lease JSON), bound to an etcd lease with a TTL
//	owners/<node>           the subnet a node last held, without TTL: it lets a node come
//	                        back to its subnet after an outage longer than the TTL, and
//	                        keeps others from taking it meanwhile
//	reservations/<node>     a subnet pinned to a node by an operator
//
// Acquiring is a transaction that creates the subnet key only if it is absent (or already
// ours), so agents racing for subnets always end up with distinct ones.

// Every call to etcd is bounded: the client waits for a connection (gRPC's wait-for-ready)
// rather than failing, so an unbounded call made while etcd is down blocks until etcd is
// back, silently. Bounded, it fails and the caller reports and retries.
const (
	callTimeout  = 5 * time.Second  // one read or write
	claimTimeout = 10 * time.Second // a claim: grant, read, transaction
	probeTimeout = 2 * time.Second  // a health probe
)

// DialOptions are the gRPC options of an agent's etcd client. gRPC's reconnect backoff
// grows to 120 s by default: after a long outage the agent would find etcd back only a
// minute or more later, when the leases etcd restored had run out. Capped at 1 s, it
// reconnects within a second of etcd's return.
func DialOptions(connectTimeout time.Duration) []grpc.DialOption {
	return []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
		Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
		MinConnectTimeout: connectTimeout,
	})}
}

// Store is the lease store on etcd.
type Store struct {
	cli    *clientv3.Client
	prefix string
	ttl    time.Duration
	log    *slog.Logger
}

// New returns a store under prefix (e.g. "/netagent") whose leases live ttl.
func New(cli *clientv3.Client, prefix string, ttl time.Duration, log *slog.Logger) *Store {
	return &Store{cli: cli, prefix: strings.TrimSuffix(prefix, "/"), ttl: ttl, log: log}
}

func (e *Store) key(parts ...string) string {
	return path.Join(append([]string{e.prefix}, parts...)...)
}

// SubnetsPrefix is the key prefix of live leases.
func (e *Store) SubnetsPrefix() string { return e.key("subnets") + "/" }

// Config reads and validates the network config.
func (e *Store) Config(ctx context.Context) (config.Network, int64, error) {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	resp, err := e.cli.Get(ctx, e.key("config"))
	if err != nil {
		return config.Network{}, 0, fmt.Errorf("read config: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return config.Network{}, resp.Header.Revision, fmt.Errorf("no network config at %s (write one with `netagent config set`)", e.key("config"))
	}
	n, err := config.Parse(resp.Kvs[0].Value)
	if err != nil {
		return config.Network{}, resp.Header.Revision, fmt.Errorf("network config at %s: %w", e.key("config"), err)
	}
	return n, resp.Kvs[0].ModRevision, nil
}

// SetConfig validates and writes the network config.
func (e *Store) SetConfig(ctx context.Context, n config.Network) error {
	n.Default()
	if err := n.Validate(); err != nil {
		return err
	}
	_, err := e.cli.Put(ctx, e.key("config"), string(n.Marshal()))
	return err
}

// ErrRenumber means a reservation would move a node that holds (or last held) another
// subnet: Reserve refuses it unless forced.
var ErrRenumber = errors.New("reservation would renumber the node")

// Reserve pins subnet to node. It refuses an invalid node name, a subnet that is not one of
// the network's, and one that overlaps another node's live lease, remembered subnet or
// reservation (lease.ErrConflict). A subnet other than the one node holds or last held would move
// the node there at its next restart while its pods keep their old addresses, cut off
// until they are recreated: refused (ErrRenumber) unless force. The checks and the write
// are one transaction on what was read, so a racing agent or reservation cannot slip in
// between.
func (e *Store) Reserve(ctx context.Context, node string, subnet netip.Prefix, force bool) error {
	if err := lease.ValidNodeName(node); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, claimTimeout)
	defer cancel()
	for range 5 {
		resp, err := e.cli.Get(ctx, e.prefix+"/", clientv3.WithPrefix())
		if err != nil {
			return fmt.Errorf("read the store: %w", err)
		}
		if err := e.reservable(resp.Kvs, node, subnet, force); err != nil {
			return err
		}
		// Nothing under the prefix may have changed since the read (a deletion only frees
		// things, so it cannot invalidate the checks).
		txn, err := e.cli.Txn(ctx).If(
			clientv3.Compare(clientv3.ModRevision(e.prefix+"/"), "<", resp.Header.Revision+1).WithPrefix(),
		).Then(clientv3.OpPut(e.key("reservations", node), subnet.String())).Commit()
		if err != nil {
			return fmt.Errorf("reserve: %w", err)
		}
		if txn.Succeeded {
			return nil
		}
	}
	return fmt.Errorf("reserve %s: the store kept changing; try again", subnet)
}

// reservable checks a reservation of subnet for node against the store's keys.
func (e *Store) reservable(kvs []*mvccpb.KeyValue, node string, subnet netip.Prefix, force bool) error {
	var cfg config.Network
	var own, last netip.Prefix // node's live lease, its remembered subnet
	for _, kv := range kvs {
		k := string(kv.Key)
		if k == e.key("config") {
			c, err := config.Parse(kv.Value)
			if err != nil {
				return fmt.Errorf("network config at %s: %w", k, err)
			}
			cfg = c
		}
	}
	if !cfg.Network.IsValid() {
		return fmt.Errorf("no network config at %s", e.key("config"))
	}
	if !cfg.Contains(subnet) {
		return fmt.Errorf("subnet %s is not a /%d subnet of the network %s (%s-%s)", subnet, cfg.SubnetLen, cfg.Network, cfg.SubnetMin, cfg.SubnetMax)
	}
	// Live leases first: they name the most pressing conflict.
	slices.SortStableFunc(kvs, func(a, b *mvccpb.KeyValue) int {
		return cmp.Compare(btoi(path.Dir(string(b.Key)) == e.key("subnets")), btoi(path.Dir(string(a.Key)) == e.key("subnets")))
	})
	for _, kv := range kvs {
		k := string(kv.Key)
		dir, name := path.Dir(k), path.Base(k)
		switch dir {
		case e.key("subnets"):
			s, err := lease.ParseSubnetKey(name)
			if err != nil || !s.Overlaps(subnet) {
				if l, derr := lease.Decode(kv.Value); derr == nil && l.Node == node {
					own = l.Subnet
				}
				continue
			}
			l, err := lease.DecodeKey(k, kv.Value)
			switch {
			case err != nil:
				return fmt.Errorf("%w: %s overlaps the live lease at %s, which is unusable (%v)", lease.ErrConflict, subnet, k, err)
			case l.Node != node:
				return fmt.Errorf("%w: %s overlaps %s, the live lease of node %s", lease.ErrConflict, subnet, l.Subnet, l.Node)
			}
			own = l.Subnet
		case e.key("owners"), e.key("reservations"):
			s, err := netip.ParsePrefix(string(kv.Value))
			if err != nil {
				continue
			}
			if name == node {
				if dir == e.key("owners") {
					last = s
				}
				continue
			}
			if s.Overlaps(subnet) {
				if dir == e.key("owners") {
					return fmt.Errorf("%w: %s overlaps %s, the subnet last held by node %s (if it is gone for good, run `netagent leave --node-name %s` first)", lease.ErrConflict, subnet, s, name, name)
				}
				return fmt.Errorf("%w: %s overlaps %s, reserved for node %s", lease.ErrConflict, subnet, s, name)
			}
		}
	}
	for _, cur := range []netip.Prefix{own, last} {
		if cur.IsValid() && cur != subnet && !force {
			return fmt.Errorf("%w: node %s holds %s; reserving %s moves it there at its next restart while its pods keep addresses in %s and are cut off until recreated (drain the node first, then use --force)",
				ErrRenumber, node, cur, subnet, cur)
		}
	}
	return nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// Acquire claims a subnet for self (Node, PublicIP, Backend, VTEPMAC set; Subnet ignored
// unless hint). The order of preference: the node's reservation, the subnet the store
// remembers for it, hint (the subnet this node used last, from local state), then a free
// subnet chosen at random.
func (e *Store) Acquire(ctx context.Context, cfg config.Network, self lease.Lease, hint netip.Prefix) (lease.Held, error) {
	for range 5 {
		h, err := e.acquire(ctx, cfg, self, hint)
		if !errors.Is(err, errOwnerMoved) {
			return h, err
		}
		// Another agent claimed for this node name meanwhile: look again (it is refused
		// as an identity conflict unless it is this host's own earlier run).
	}
	return lease.Held{}, fmt.Errorf("%w: the owner record of %s keeps changing (another agent with this node name?)", lease.ErrConflict, self.Node)
}

// errOwnerMoved means the node's owner record changed between reading the store and
// claiming: someone else claimed a subnet for this node name.
var errOwnerMoved = errors.New("owner record changed")

// identity refuses self when a live lease names self's node with another public IP: two
// hosts run with the same node name. A live lease with the same public IP is this host's
// own from a previous run (a restart, or kill -9 before its TTL ran out): adopted.
func identity(self lease.Lease, taken map[netip.Prefix]lease.Lease, ttl time.Duration) error {
	for s, l := range taken {
		if l.Node == self.Node && l.PublicIP != self.PublicIP {
			return fmt.Errorf("%w: node name %q holds %s, live, for public IP %s, and this agent's public IP is %s: give each host its own --node-name (cloned machines and network namespaces share the hostname); if that agent is gone, its lease expires within %s",
				lease.ErrIdentity, self.Node, s, l.PublicIP, self.PublicIP, ttl)
		}
	}
	return nil
}

func (e *Store) acquire(ctx context.Context, cfg config.Network, self lease.Lease, hint netip.Prefix) (lease.Held, error) {
	// The owner record's revision is read before the rest: a claim for this name that
	// lands in between is then either in the listing or fails our claim's comparison.
	ownerRev, err := e.ownerRev(ctx, self.Node)
	if err != nil {
		return lease.Held{}, err
	}
	taken, owners, reserved, err := e.state(ctx)
	if err != nil {
		return lease.Held{}, err
	}
	if err := identity(self, taken, e.ttl); err != nil {
		return lease.Held{}, err
	}
	var candidates []netip.Prefix
	if r, ok := reserved[self.Node]; ok {
		if !cfg.Contains(r) && !cfg.Network.Contains(r.Addr()) {
			return lease.Held{}, fmt.Errorf("reservation %s of %s is outside network %s", r, self.Node, cfg.Network)
		}
		candidates = append(candidates, r)
	} else {
		for s, l := range taken {
			if l.Node == self.Node {
				candidates = append(candidates, s)
			}
		}
		if s, ok := ownerOf(owners, self.Node); ok {
			candidates = append(candidates, s)
		}
		if hint.IsValid() && cfg.Contains(hint) {
			candidates = append(candidates, hint)
		}
	}
	for _, s := range candidates {
		h, err := e.claim(ctx, self, s, ownerRev)
		if err == nil {
			return h, nil
		}
		if !errors.Is(err, lease.ErrConflict) {
			return lease.Held{}, err
		}
		e.log.Warn("preferred subnet is taken", "subnet", s, "err", err)
		if _, isReserved := reserved[self.Node]; isReserved {
			return lease.Held{}, fmt.Errorf("reserved subnet %s: %w", s, err)
		}
	}
	// A fresh subnet: skip live leases, other nodes' remembered subnets and reservations.
	blocked := map[netip.Prefix]bool{}
	for s := range taken {
		blocked[s] = true
	}
	for node, s := range owners {
		if node != self.Node {
			blocked[s] = true
		}
	}
	for node, s := range reserved {
		if node != self.Node {
			blocked[s] = true
		}
	}
	total := cfg.Subnets()
	for attempt := 0; attempt < 16; attempt++ {
		var free []netip.Prefix
		// Random probing finds a free subnet fast when the pool is sparse; a full scan
		// settles the dense case.
		for range 64 {
			s := cfg.SubnetAt(rand.IntN(total))
			if !blocked[s] {
				free = append(free, s)
				break
			}
		}
		if len(free) == 0 {
			for i := range total {
				if s := cfg.SubnetAt(i); !blocked[s] {
					free = append(free, s)
					break
				}
			}
		}
		if len(free) == 0 {
			return lease.Held{}, fmt.Errorf("no free subnet in %s (%d in use or reserved)", cfg.Network, len(blocked))
		}
		h, err := e.claim(ctx, self, free[0], ownerRev)
		if err == nil {
			return h, nil
		}
		if !errors.Is(err, lease.ErrConflict) {
			return lease.Held{}, err
		}
		blocked[free[0]] = true // lost a race: try another
	}
	return lease.Held{}, fmt.Errorf("could not claim a subnet after 16 races")
}

func ownerOf(owners map[string]netip.Prefix, node string) (netip.Prefix, bool) {
	s, ok := owners[node]
	return s, ok
}

// state lists live leases, remembered owners and reservations.
func (e *Store) state(ctx context.Context) (map[netip.Prefix]lease.Lease, map[string]netip.Prefix, map[string]netip.Prefix, error) {
	taken := map[netip.Prefix]lease.Lease{}
	owners := map[string]netip.Prefix{}
	reserved := map[string]netip.Prefix{}
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	resp, err := e.cli.Get(ctx, e.prefix+"/", clientv3.WithPrefix())
	if err != nil {
		return nil, nil, nil, fmt.Errorf("list leases: %w", err)
	}
	for _, kv := range resp.Kvs {
		k := string(kv.Key)
		switch {
		case strings.HasPrefix(k, e.key("subnets")+"/"):
			if l, err := lease.DecodeKey(k, kv.Value); err == nil {
				taken[l.Subnet] = l
			} else if s, perr := lease.ParseSubnetKey(path.Base(k)); perr == nil {
				taken[s] = lease.Lease{Subnet: s} // unusable (or forged), but the key is still in use
			}
		case strings.HasPrefix(k, e.key("owners")+"/"):
			if s, err := netip.ParsePrefix(string(kv.Value)); err == nil {
				owners[path.Base(k)] = s
			}
		case strings.HasPrefix(k, e.key("reservations")+"/"):
			if s, err := netip.ParsePrefix(string(kv.Value)); err == nil {
				reserved[path.Base(k)] = s
			}
		}
	}
	return taken, owners, reserved, nil
}

// ownerRev is the mod revision of node's owner record (0: none).
func (e *Store) ownerRev(ctx context.Context, node string) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	resp, err := e.cli.Get(ctx, e.key("owners", node))
	if err != nil {
		return 0, fmt.Errorf("read owner of %s: %w", node, err)
	}
	if len(resp.Kvs) == 0 {
		return 0, nil
	}
	return resp.Kvs[0].ModRevision, nil
}

// claim takes subnet s for self if it is free or already self's, in one transaction, with a
// fresh etcd lease. ownerRev >= 0 also requires self's owner record to be unchanged since
// it was read at that revision (errOwnerMoved), so two agents starting with the same node
// name cannot both claim.
func (e *Store) claim(ctx context.Context, self lease.Lease, s netip.Prefix, ownerRev int64) (lease.Held, error) {
	ctx, cancel := context.WithTimeout(ctx, claimTimeout)
	defer cancel()
	self.Subnet = s
	k := e.key("subnets", lease.SubnetKey(s))
	ownerKey := e.key("owners", self.Node)
	grant, err := e.cli.Grant(ctx, int64(e.ttl/time.Second))
	if err != nil {
		return lease.Held{}, fmt.Errorf("grant etcd lease: %w", err)
	}
	revoke := func() {
		rctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, _ = e.cli.Revoke(rctx, grant.ID)
	}
	cur, err := e.cli.Get(ctx, k)
	if err != nil {
		revoke()
		return lease.Held{}, fmt.Errorf("read %s: %w", k, err)
	}
	var cmp clientv3.Cmp
	if len(cur.Kvs) == 0 {
		cmp = clientv3.Compare(clientv3.CreateRevision(k), "=", 0)
	} else {
		old, derr := lease.Decode(cur.Kvs[0].Value)
		if derr != nil || old.Node != self.Node {
			revoke()
			holder := "an undecodable lease"
			if derr == nil {
				holder = old.Node
			}
			return lease.Held{}, fmt.Errorf("%w: %s is held by %s", lease.ErrConflict, s, holder)
		}
		cmp = clientv3.Compare(clientv3.ModRevision(k), "=", cur.Kvs[0].ModRevision)
	}
	cmps := []clientv3.Cmp{cmp}
	if ownerRev >= 0 {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(ownerKey), "=", ownerRev))
	}
	txn, err := e.cli.Txn(ctx).If(cmps...).Then(
		clientv3.OpPut(k, string(self.Encode()), clientv3.WithLease(grant.ID)),
		clientv3.OpPut(ownerKey, s.String()),
	).Else(clientv3.OpGet(ownerKey)).Commit()
	if err != nil {
		revoke()
		return lease.Held{}, fmt.Errorf("claim %s: %w", s, err)
	}
	if !txn.Succeeded {
		revoke()
		if ownerRev >= 0 && ownerRevIn(txn) != ownerRev {
			return lease.Held{}, errOwnerMoved
		}
		return lease.Held{}, fmt.Errorf("%w: %s was taken concurrently", lease.ErrConflict, s)
	}
	if len(cur.Kvs) > 0 && cur.Kvs[0].Lease != 0 && clientv3.LeaseID(cur.Kvs[0].Lease) != grant.ID {
		// Our previous etcd lease (from before a restart) is no longer needed.
		rctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, _ = e.cli.Revoke(rctx, clientv3.LeaseID(cur.Kvs[0].Lease))
		cancel()
	}
	return lease.Held{Lease: self, Token: int64(grant.ID)}, nil
}

// ownerRevIn is the owner record's mod revision in a failed claim's Else read.
func ownerRevIn(txn *clientv3.TxnResponse) int64 {
	if len(txn.Responses) == 0 {
		return 0
	}
	r := txn.Responses[0].GetResponseRange()
	if r == nil || len(r.Kvs) == 0 {
		return 0
	}
	return r.Kvs[0].ModRevision
}

// Renew re-claims h's subnet (after its etcd lease was lost): same subnet, new etcd lease.
func (e *Store) Renew(ctx context.Context, h lease.Held) (lease.Held, error) {
	ctx, cancel := context.WithTimeout(ctx, claimTimeout) // the check and the claim together
	defer cancel()
	if err := e.stillOurs(ctx, h); err != nil {
		return lease.Held{}, err
	}
	return e.claim(ctx, h.Lease, h.Lease.Subnet, -1)
}

// stillOurs refuses to re-claim a lease that another agent run under our node name has
// rewritten (lease.ErrIdentity): taking it back would start a fight that flips the lease between
// two hosts.
func (e *Store) stillOurs(ctx context.Context, h lease.Held) error {
	k := e.key("subnets", lease.SubnetKey(h.Lease.Subnet))
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	cur, err := e.cli.Get(ctx, k)
	if err != nil || len(cur.Kvs) == 0 {
		return nil // unreadable: claim reports it; absent: free to re-claim
	}
	l, err := lease.Decode(cur.Kvs[0].Value)
	if err != nil || l.Node != h.Lease.Node || l.Instance == h.Lease.Instance {
		return nil // another node's (claim refuses it) or our own
	}
	return fmt.Errorf("%w: the lease of %s for %s was rewritten by another agent (instance %q, public IP %s); not taking it back",
		lease.ErrIdentity, h.Lease.Node, h.Lease.Subnet, l.Instance, l.PublicIP)
}

// KeepAlive keeps h alive until ctx ends or the lease is lost; it returns why it stopped.
func (e *Store) KeepAlive(ctx context.Context, h lease.Held) error {
	ch, err := e.cli.KeepAlive(ctx, clientv3.LeaseID(h.Token))
	if err != nil {
		return fmt.Errorf("keepalive: %w", err)
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case resp, ok := <-ch:
			if !ok {
				return errors.New("keepalive stopped (etcd unreachable or lease expired)")
			}
			if resp == nil || resp.TTL <= 0 {
				return errors.New("lease expired")
			}
		}
	}
}

// WatchHealth reports whether etcd answers until ctx ends: report(nil) when a probe (a
// linearizable read of the config key's revision, so a member without quorum counts as
// down) succeeds, report(err) when it fails. It probes every 5 s while etcd answers and
// every second while it does not, and at once whenever the client's connection changes
// state, so a lost or restored connection is reported within about a second.
func (e *Store) WatchHealth(ctx context.Context, report func(error)) {
	conn := e.cli.ActiveConnection()
	for ctx.Err() == nil {
		err := e.probe(ctx)
		if ctx.Err() != nil {
			return
		}
		report(err)
		period := 5 * time.Second
		if err != nil {
			period = time.Second
		}
		wctx, cancel := context.WithTimeout(ctx, period)
		if conn != nil {
			st := conn.GetState()
			if st == connectivity.Idle {
				conn.Connect() // an idle channel reconnects only when asked
			}
			conn.WaitForStateChange(wctx, st)
		} else {
			<-wctx.Done()
		}
		cancel()
		sleep(ctx, 100*time.Millisecond) // a flapping connection costs at most ten probes a second
	}
}

func (e *Store) probe(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	if _, err := e.cli.Get(ctx, e.key("config"), clientv3.WithCountOnly()); err != nil {
		return fmt.Errorf("etcd unreachable: %w", err)
	}
	return nil
}

// Release gives up h's subnet for good (netagent leave): the live lease, the remembered
// owner record and the etcd lease.
func (e *Store) Release(ctx context.Context, node string, subnet netip.Prefix) error {
	ctx, cancel := context.WithTimeout(ctx, claimTimeout)
	defer cancel()
	k := e.key("subnets", lease.SubnetKey(subnet))
	cur, err := e.cli.Get(ctx, k)
	if err != nil {
		return err
	}
	ops := []clientv3.Op{clientv3.OpDelete(e.key("owners", node))}
	if len(cur.Kvs) > 0 {
		if l, err := lease.Decode(cur.Kvs[0].Value); err == nil && l.Node == node {
			ops = append(ops, clientv3.OpDelete(k))
			if cur.Kvs[0].Lease != 0 {
				defer func() { _, _ = e.cli.Revoke(ctx, clientv3.LeaseID(cur.Kvs[0].Lease)) }()
			}
		}
	}
	_, err = e.cli.Txn(ctx).Then(ops...).Commit()
	return err
}

// Watch keeps peers current until ctx ends: a list, then a watch from the list's revision;
// on compaction, a broken stream or an error it lists again (keeping the old view until the
// new one is complete, so peers are never dropped because the watch broke). changed gets a
// non-blocking signal after every change.
func (e *Store) Watch(ctx context.Context, peers *lease.Peers, changed chan<- struct{}, stats lease.WatchStats) {
	notify := func() {
		select {
		case changed <- struct{}{}:
		default:
		}
	}
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		rev, err := e.list(ctx, peers)
		if err != nil {
			e.log.Warn("list leases failed; keeping the current peers", "err", err, "retry", backoff)
			stats.WatchRestart("list")
			sleep(ctx, backoff)
			backoff = min(backoff*2, 5*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
		notify()
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		wch := e.cli.Watch(wctx, e.SubnetsPrefix(), clientv3.WithPrefix(), clientv3.WithRev(rev+1))
		reason := e.consume(wch, peers, notify)
		cancel()
		if ctx.Err() != nil {
			return
		}
		e.log.Warn("lease watch restarting", "reason", reason)
		stats.WatchRestart(reason)
		sleep(ctx, 100*time.Millisecond)
	}
}

func (e *Store) consume(wch clientv3.WatchChan, peers *lease.Peers, notify func()) string {
	for resp := range wch {
		if err := resp.Err(); err != nil {
			if errors.Is(err, rpctypes.ErrCompacted) {
				return "compacted"
			}
			return err.Error()
		}
		if resp.Canceled {
			return "canceled"
		}
		peers.Update(func(b lease.Batch) {
			for _, ev := range resp.Events {
				k := string(ev.Kv.Key)
				switch ev.Type {
				case mvccpb.PUT:
					// Peers checks it further and keeps why it is not used; the agent logs
					// and counts that once per key.
					if l, err := lease.DecodeKey(k, ev.Kv.Value); err != nil {
						b.Invalid(k, err.Error())
					} else {
						b.Set(k, l, ev.Kv.CreateRevision)
					}
				case mvccpb.DELETE:
					b.Delete(k)
				}
			}
		})
		notify()
	}
	return "stream closed"
}

func (e *Store) list(ctx context.Context, peers *lease.Peers) (int64, error) {
	lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := e.cli.Get(lctx, e.SubnetsPrefix(), clientv3.WithPrefix())
	if err != nil {
		return 0, err
	}
	leases := make(map[string]lease.Entry, len(resp.Kvs))
	bad := map[string]string{}
	for _, kv := range resp.Kvs {
		l, err := lease.DecodeKey(string(kv.Key), kv.Value)
		if err != nil {
			bad[string(kv.Key)] = err.Error()
			continue
		}
		leases[string(kv.Key)] = lease.Entry{Lease: l, Rev: kv.CreateRevision}
	}
	peers.Replace(leases, bad)
	return resp.Header.Revision, nil
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// Leave releases whatever node holds or is remembered for (netagent leave).
func (e *Store) Leave(ctx context.Context, node string) (netip.Prefix, error) {
	taken, owners, _, err := e.state(ctx)
	if err != nil {
		return netip.Prefix{}, err
	}
	s, ok := owners[node]
	if !ok {
		for sub, l := range taken {
			if l.Node == node {
				s, ok = sub, true
			}
		}
	}
	if !ok {
		return netip.Prefix{}, fmt.Errorf("node %s holds no subnet", node)
	}
	return s, e.Release(ctx, node, s)
}

// WatchConfig signals changed whenever the network config key changes, until ctx ends.
func (e *Store) WatchConfig(ctx context.Context, changed chan<- struct{}) {
	for ctx.Err() == nil {
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		for resp := range e.cli.Watch(wctx, e.key("config")) {
			if resp.Err() != nil {
				break
			}
			if len(resp.Events) > 0 {
				select {
				case changed <- struct{}{}:
				default:
				}
			}
		}
		cancel()
		sleep(ctx, time.Second)
	}
}

var (
	_ lease.Store         = (*Store)(nil)
	_ lease.HealthWatcher = (*Store)(nil)
)

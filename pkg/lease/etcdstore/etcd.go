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
	"sync"
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
//	subnets/<10.244.1.0-24> a live lease (lease.Lease JSON), bound to an etcd lease with a TTL,
//	                        under its primary subnet: the IPv4 one, else (IPv6-only) the
//	                        IPv6 one (subnets/fd00:10:244:1::-64)
//	subnets6/<fd00:..-64>   a dual-stack lease's claim on its IPv6 subnet: the node's name,
//	                        bound to the same etcd lease (not watched: the lease value
//	                        carries the subnet; this key only makes the claim exclusive)
//	owners/<node>           the subnets a node last held ("10.244.1.0/24,fd00:10:244:1::/64";
//	                        one prefix as before IPv6), without TTL: it lets a node come
//	                        back to its subnets after an outage longer than the TTL, and
//	                        keeps others from taking them meanwhile
//	reservations/<node>     subnets pinned to a node by an operator, in the same form
//
// Acquiring is one transaction that creates the subnet keys of every enabled family only if
// they are absent (or already ours), so agents racing for subnets always end up with
// distinct ones, and a node never holds one family's subnet without the other's. An
// IPv4-only cluster keeps the layout it had before IPv6 (a single prefix in owners/ and
// reservations/), so existing clusters upgrade in place.

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

	mu sync.Mutex
	// claimed are the leases an Acquire before the watch listed, decoded, for the watch's
	// first list to reuse for the keys unchanged since (taken by that list): a cold start
	// with thousands of peers decodes each lease once (see BENCHMARKS.md).
	claimed  map[string]decoded
	watching bool // Watch has started: an Acquire now keeps nothing for it
}

// decoded is the value of a lease key as decoded at one revision: the same key at the same
// mod revision holds the same value.
type decoded struct {
	mod int64
	l   lease.Lease
	err error // why the value is no usable lease (l unset)
}

// decodeKV decodes a lease key's value, or takes it from known when kv is the version
// decoded there.
func decodeKV(kv *mvccpb.KeyValue, known map[string]decoded) decoded {
	if d, ok := known[string(kv.Key)]; ok && d.mod == kv.ModRevision {
		return d
	}
	l, err := lease.DecodeKey(string(kv.Key), kv.Value)
	return decoded{kv.ModRevision, l, err}
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

// Reserve pins subnet to node (for subnet's family; a reservation of the other family is
// kept). It refuses an invalid node name, a subnet that is not one of
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
		value, err := e.reservable(resp.Kvs, node, subnet, force)
		if err != nil {
			return err
		}
		// Nothing under the prefix may have changed since the read (a deletion only frees
		// things, so it cannot invalidate the checks).
		txn, err := e.cli.Txn(ctx).If(
			clientv3.Compare(clientv3.ModRevision(e.prefix+"/"), "<", resp.Header.Revision+1).WithPrefix(),
		).Then(clientv3.OpPut(e.key("reservations", node), value)).Commit()
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
func (e *Store) reservable(kvs []*mvccpb.KeyValue, node string, subnet netip.Prefix, force bool) (string, error) {
	var cfg config.Network
	var own, last netip.Prefix // node's live lease, its remembered subnet (of subnet's family)
	var kept netip.Prefix      // node's reservation of the other family
	v6 := subnet.Addr().Is6()
	for _, kv := range kvs {
		k := string(kv.Key)
		if k == e.key("config") {
			c, err := config.Parse(kv.Value)
			if err != nil {
				return "", fmt.Errorf("network config at %s: %w", k, err)
			}
			cfg = c
		}
	}
	switch {
	case !cfg.HasV4() && !cfg.HasV6():
		return "", fmt.Errorf("no network config at %s", e.key("config"))
	case v6 && !cfg.Contains(subnet):
		return "", fmt.Errorf("subnet %s is not a /%d subnet of the IPv6 network %s (its first subnet excluded)", subnet, cfg.IPv6SubnetLen, cfg.IPv6Network)
	case !v6 && !cfg.Contains(subnet):
		return "", fmt.Errorf("subnet %s is not a /%d subnet of the network %s (%s-%s)", subnet, cfg.SubnetLen, cfg.Network, cfg.SubnetMin, cfg.SubnetMax)
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
			l, err := lease.DecodeKey(k, kv.Value)
			if err != nil {
				if s, perr := lease.ParseSubnetKey(name); perr == nil && s.Overlaps(subnet) {
					return "", fmt.Errorf("%w: %s overlaps the live lease at %s, which is unusable (%v)", lease.ErrConflict, subnet, k, err)
				}
				continue
			}
			for _, s := range l.Subnets() {
				switch {
				case l.Node == node && s.Addr().Is6() == v6:
					own = s
				case l.Node != node && s.Overlaps(subnet):
					return "", fmt.Errorf("%w: %s overlaps %s, the live lease of node %s", lease.ErrConflict, subnet, s, l.Node)
				}
			}
		case e.key("subnets6"):
			if s, err := lease.ParseSubnetKey(name); err == nil && s.Overlaps(subnet) && string(kv.Value) != node {
				return "", fmt.Errorf("%w: %s overlaps %s, claimed by node %q", lease.ErrConflict, subnet, s, kv.Value)
			}
		case e.key("owners"), e.key("reservations"):
			for _, s := range parseSubnets(kv.Value) {
				if name == node {
					switch {
					case s.Addr().Is6() != v6 && dir == e.key("reservations"):
						kept = s
					case s.Addr().Is6() == v6 && dir == e.key("owners"):
						last = s
					}
					continue
				}
				if s.Overlaps(subnet) {
					if dir == e.key("owners") {
						return "", fmt.Errorf("%w: %s overlaps %s, the subnet last held by node %s (if it is gone for good, run `netagent leave --node-name %s` first)", lease.ErrConflict, subnet, s, name, name)
					}
					return "", fmt.Errorf("%w: %s overlaps %s, reserved for node %s", lease.ErrConflict, subnet, s, name)
				}
			}
		}
	}
	for _, cur := range []netip.Prefix{own, last} {
		if cur.IsValid() && cur != subnet && !force {
			return "", fmt.Errorf("%w: node %s holds %s; reserving %s moves it there at its next restart while its pods keep addresses in %s and are cut off until recreated (drain the node first, then use --force)",
				ErrRenumber, node, cur, subnet, cur)
		}
	}
	return formatSubnets(kept, subnet), nil
}

// parseSubnets reads an owners/ or reservations/ value: prefixes separated by commas (one
// per family); unparsable ones are skipped.
func parseSubnets(b []byte) []netip.Prefix {
	var out []netip.Prefix
	for f := range strings.SplitSeq(string(b), ",") {
		if p, err := netip.ParsePrefix(strings.TrimSpace(f)); err == nil {
			out = append(out, p)
		}
	}
	return out
}

// formatSubnets is parseSubnets' inverse, IPv4 first; invalid prefixes are left out, so a
// single-family value is one prefix, as before IPv6.
func formatSubnets(ps ...netip.Prefix) string {
	var v4, v6 []string
	for _, p := range ps {
		switch {
		case !p.IsValid():
		case p.Addr().Is4():
			v4 = append(v4, p.String())
		default:
			v6 = append(v6, p.String())
		}
	}
	return strings.Join(append(v4, v6...), ",")
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// Acquire claims a subnet per enabled family for self (Node, PublicIP/PublicIP6, Backend,
// VTEPMAC set), both in one transaction. For each family the order of preference is: the
// node's reservation, the subnet the store remembers for it, the hint (the subnet this node
// used last, from local state: hint for IPv4, self.Subnet6 for IPv6), then a free subnet
// chosen at random.
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

// conflictError is a claim lost on one subnet: the caller tries another.
type conflictError struct {
	subnet netip.Prefix
	msg    string
}

func (c *conflictError) Error() string { return lease.ErrConflict.Error() + ": " + c.msg }
func (c *conflictError) Unwrap() error { return lease.ErrConflict }

// sameHost reports whether a and b name the same host: an underlay address in common.
func sameHost(a, b lease.Lease) bool {
	return a.PublicIP.IsValid() && a.PublicIP == b.PublicIP || a.PublicIP6.IsValid() && a.PublicIP6 == b.PublicIP6
}

// identity refuses self when a live lease names self's node with other public IPs: two
// hosts run with the same node name. A live lease with a public IP in common is this
// host's own from a previous run (a restart, or kill -9 before its TTL ran out): adopted.
func identity(self lease.Lease, leases map[string]decoded, ttl time.Duration) error {
	for _, d := range leases {
		if l, s := d.l, d.l.Primary(); d.err == nil && l.Node == self.Node && !sameHost(l, self) {
			return fmt.Errorf("%w: node name %q holds %s, live, for public IP %s, and this agent's public IP is %s: give each host its own --node-name (cloned machines and network namespaces share the hostname); if that agent is gone, its lease expires within %s",
				lease.ErrIdentity, self.Node, s, ips(l), ips(self), ttl)
		}
	}
	return nil
}

// ips names a lease's public IPs.
func ips(l lease.Lease) string {
	var out []string
	for _, a := range [2]netip.Addr{l.PublicIP, l.PublicIP6} {
		if a.IsValid() {
			out = append(out, a.String())
		}
	}
	return strings.Join(out, ",")
}

// storeState is what a claim is chosen from.
type storeState struct {
	leases   map[string]decoded      // the lease keys (live leases and unusable values), by key
	claims   map[netip.Prefix]string // every subnet live leases and IPv6 claim keys hold -> node
	owners   map[string][]netip.Prefix
	reserved map[string][]netip.Prefix
}

// families are the subnet families a config enables, IPv4 first.
func families(cfg config.Network) []bool {
	var out []bool
	if cfg.HasV4() {
		out = append(out, false)
	}
	if cfg.HasV6() {
		out = append(out, true)
	}
	return out
}

// ofFamily picks the prefix of family v6 out of ps.
func ofFamily(ps []netip.Prefix, v6 bool) (netip.Prefix, bool) {
	for _, p := range ps {
		if p.Addr().Is6() == v6 {
			return p, true
		}
	}
	return netip.Prefix{}, false
}

func (e *Store) acquire(ctx context.Context, cfg config.Network, self lease.Lease, hint netip.Prefix) (lease.Held, error) {
	// The owner record's revision is read before the rest: a claim for this name that
	// lands in between is then either in the listing or fails our claim's comparison.
	ownerRev, err := e.ownerRev(ctx, self.Node)
	if err != nil {
		return lease.Held{}, err
	}
	st, err := e.state(ctx)
	if err != nil {
		return lease.Held{}, err
	}
	if err := identity(self, st.leases, e.ttl); err != nil {
		return lease.Held{}, err
	}
	// Others' live subnets, remembered subnets and reservations are not ours to take.
	blocked := map[netip.Prefix]bool{}
	for s, n := range st.claims {
		if n != self.Node {
			blocked[s] = true
		}
	}
	for _, m := range []map[string][]netip.Prefix{st.owners, st.reserved} {
		for node, ss := range m {
			if node != self.Node {
				for _, s := range ss {
					blocked[s] = true
				}
			}
		}
	}
	// Subnets of the configured length are equal or disjoint: a map lookup settles them;
	// others (left from before a config change, or forged) are checked for overlap.
	var odd []netip.Prefix
	for b := range blocked {
		if b.Bits() != cfg.SubnetLenOf(b) {
			odd = append(odd, b)
		}
	}
	free := func(s netip.Prefix) bool {
		if blocked[s] {
			return false
		}
		for _, b := range odd {
			if b.Overlaps(s) {
				return false
			}
		}
		return true
	}
	reserved, isReserved := st.reserved[self.Node]
	var want [2]netip.Prefix // per family: [0] IPv4, [1] IPv6
	for _, v6 := range families(cfg) {
		var prefer []netip.Prefix
		if r, ok := ofFamily(reserved, v6); ok {
			if !cfg.NetworkOf(r).Contains(r.Addr()) {
				return lease.Held{}, fmt.Errorf("reservation %s of %s is outside network %s", r, self.Node, cfg.NetworkOf(r))
			}
			if !free(r) {
				return lease.Held{}, fmt.Errorf("reserved subnet %s: %w: held or remembered for another node", r, lease.ErrConflict)
			}
			want[btoi(v6)] = r
			continue
		}
		for s, n := range st.claims {
			if n == self.Node && s.Addr().Is6() == v6 {
				prefer = append(prefer, s)
			}
		}
		if s, ok := ofFamily(st.owners[self.Node], v6); ok {
			prefer = append(prefer, s)
		}
		h := hint
		if v6 {
			h = self.Subnet6
		}
		if h.IsValid() && h.Addr().Is6() == v6 && cfg.Contains(h) {
			prefer = append(prefer, h)
		}
		for _, s := range prefer {
			if cfg.NetworkOf(s).Contains(s.Addr()) && s.Bits() >= cfg.NetworkOf(s).Bits() && free(s) {
				want[btoi(v6)] = s
				break
			}
			e.log.Warn("preferred subnet is taken", "subnet", s)
		}
	}
	for attempt := 0; attempt < 16; attempt++ {
		for _, v6 := range families(cfg) {
			if want[btoi(v6)].IsValid() {
				continue
			}
			s, ok := pickFree(cfg, v6, free)
			if !ok {
				network := cfg.Network
				if v6 {
					network = cfg.IPv6Network
				}
				return lease.Held{}, fmt.Errorf("no free subnet in %s (%d in use or reserved)", network, len(blocked))
			}
			want[btoi(v6)] = s
		}
		h, err := e.claim(ctx, self, want[0], want[1], ownerRev)
		if err == nil {
			e.mu.Lock()
			if !e.watching {
				e.claimed = st.leases
			}
			e.mu.Unlock()
		}
		var lost *conflictError
		if !errors.As(err, &lost) {
			return h, err
		}
		if isReserved {
			if _, ok := ofFamily(reserved, lost.subnet.Addr().Is6()); ok {
				return lease.Held{}, fmt.Errorf("reserved subnet %s: %w", lost.subnet, err)
			}
		}
		e.log.Warn("subnet is taken", "subnet", lost.subnet, "err", err)
		blocked[lost.subnet] = true // lost a race: try another
		want[btoi(lost.subnet.Addr().Is6())] = netip.Prefix{}
	}
	return lease.Held{}, fmt.Errorf("could not claim a subnet after 16 races")
}

// pickFree finds a free subnet of family v6: random probing finds one fast when the pool is
// sparse; a full scan settles the dense case (IPv4 only: an IPv6 network's subnets are too
// many to scan, and too many to fill).
func pickFree(cfg config.Network, v6 bool, free func(netip.Prefix) bool) (netip.Prefix, bool) {
	if v6 {
		total := cfg.Subnets6()
		for range 256 {
			if s := cfg.Subnet6At(rand.Uint64N(total)); free(s) {
				return s, true
			}
		}
		if total <= 1<<16 {
			for i := range total {
				if s := cfg.Subnet6At(i); free(s) {
					return s, true
				}
			}
		}
		return netip.Prefix{}, false
	}
	total := cfg.Subnets()
	for range 64 {
		if s := cfg.SubnetAt(rand.IntN(total)); free(s) {
			return s, true
		}
	}
	for i := range total {
		if s := cfg.SubnetAt(i); free(s) {
			return s, true
		}
	}
	return netip.Prefix{}, false
}

// state lists live leases, IPv6 claims, remembered owners and reservations.
func (e *Store) state(ctx context.Context) (storeState, error) {
	st := storeState{leases: map[string]decoded{}, claims: map[netip.Prefix]string{},
		owners: map[string][]netip.Prefix{}, reserved: map[string][]netip.Prefix{}}
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	resp, err := e.cli.Get(ctx, e.prefix+"/", clientv3.WithPrefix())
	if err != nil {
		return storeState{}, fmt.Errorf("list leases: %w", err)
	}
	for _, kv := range resp.Kvs {
		k := string(kv.Key)
		switch path.Dir(k) {
		case e.key("subnets"):
			d := decodeKV(kv, nil)
			st.leases[k] = d
			if l := d.l; d.err == nil {
				for _, s := range l.Subnets() {
					if _, dup := st.claims[s]; !dup {
						st.claims[s] = l.Node
					}
				}
			} else if s, perr := lease.ParseSubnetKey(path.Base(k)); perr == nil {
				st.claims[s] = "" // unusable (or forged), but the key is still in use
			}
		case e.key("subnets6"):
			if s, err := lease.ParseSubnetKey(path.Base(k)); err == nil {
				st.claims[s] = string(kv.Value)
			}
		case e.key("owners"):
			st.owners[path.Base(k)] = parseSubnets(kv.Value)
		case e.key("reservations"):
			st.reserved[path.Base(k)] = parseSubnets(kv.Value)
		}
	}
	return st, nil
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

// claimKey is one key a claim writes: the lease under its primary subnet, or a dual-stack
// lease's IPv6 claim.
type claimKey struct {
	key    string
	subnet netip.Prefix
	value  string
	lease  bool // the value is a lease (else the node's name)
}

// claim takes subnets s4 and s6 (either may be invalid: that family is off) for self if
// they are free or already self's, in one transaction, with a fresh etcd lease. ownerRev >=
// 0 also requires self's owner record to be unchanged since it was read at that revision
// (errOwnerMoved), so two agents starting with the same node name cannot both claim.
func (e *Store) claim(ctx context.Context, self lease.Lease, s4, s6 netip.Prefix, ownerRev int64) (lease.Held, error) {
	ctx, cancel := context.WithTimeout(ctx, claimTimeout)
	defer cancel()
	self.Subnet, self.Subnet6 = s4, s6
	keys := []claimKey{{key: e.key("subnets", lease.SubnetKey(self.Primary())), subnet: self.Primary(), value: string(self.Encode()), lease: true}}
	if s4.IsValid() && s6.IsValid() {
		keys = append(keys, claimKey{key: e.key("subnets6", lease.SubnetKey(s6)), subnet: s6, value: self.Node})
	}
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
	var cmps []clientv3.Cmp
	var ops []clientv3.Op
	var previous []clientv3.LeaseID // our earlier etcd leases on these keys
	for _, c := range keys {
		cur, err := e.cli.Get(ctx, c.key)
		if err != nil {
			revoke()
			return lease.Held{}, fmt.Errorf("read %s: %w", c.key, err)
		}
		if len(cur.Kvs) == 0 {
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(c.key), "=", 0))
		} else {
			holder, ours := string(cur.Kvs[0].Value), string(cur.Kvs[0].Value) == self.Node
			if c.lease {
				old, derr := lease.Decode(cur.Kvs[0].Value)
				holder, ours = old.Node, derr == nil && old.Node == self.Node
				if derr != nil {
					holder = "an undecodable lease"
				}
			}
			if !ours {
				revoke()
				return lease.Held{}, &conflictError{c.subnet, fmt.Sprintf("%s is held by %s", c.subnet, holder)}
			}
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(c.key), "=", cur.Kvs[0].ModRevision))
			if id := clientv3.LeaseID(cur.Kvs[0].Lease); id != 0 && id != grant.ID {
				previous = append(previous, id)
			}
		}
		ops = append(ops, clientv3.OpPut(c.key, c.value, clientv3.WithLease(grant.ID)))
	}
	if ownerRev >= 0 {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(ownerKey), "=", ownerRev))
	}
	ops = append(ops, clientv3.OpPut(ownerKey, formatSubnets(s4, s6)))
	txn, err := e.cli.Txn(ctx).If(cmps...).Then(ops...).Else(clientv3.OpGet(ownerKey)).Commit()
	if err != nil {
		revoke()
		return lease.Held{}, fmt.Errorf("claim %s: %w", formatSubnets(s4, s6), err)
	}
	if !txn.Succeeded {
		revoke()
		if ownerRev >= 0 && ownerRevIn(txn) != ownerRev {
			return lease.Held{}, errOwnerMoved
		}
		return lease.Held{}, &conflictError{self.Primary(), fmt.Sprintf("%s was taken concurrently", formatSubnets(s4, s6))}
	}
	for _, id := range previous {
		// Our previous etcd lease (from before a restart) is no longer needed; revoking it
		// also removes whatever else it kept (an IPv6 claim on a subnet given up).
		rctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, _ = e.cli.Revoke(rctx, id)
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
	return e.claim(ctx, h.Lease, h.Lease.Subnet, h.Lease.Subnet6, -1)
}

// stillOurs refuses to re-claim a lease that another agent run under our node name has
// rewritten (lease.ErrIdentity): taking it back would start a fight that flips the lease between
// two hosts.
func (e *Store) stillOurs(ctx context.Context, h lease.Held) error {
	k := e.key("subnets", lease.SubnetKey(h.Lease.Primary()))
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
		lease.ErrIdentity, h.Lease.Node, h.Lease.Primary(), l.Instance, ips(l))
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

// Release gives up node's subnets for good (netagent leave): the live lease under subnet
// (its primary subnet), its IPv6 claim, the remembered owner record and the etcd lease.
func (e *Store) Release(ctx context.Context, node string, subnet netip.Prefix) error {
	ctx, cancel := context.WithTimeout(ctx, claimTimeout)
	defer cancel()
	k := e.key("subnets", lease.SubnetKey(subnet))
	cur, err := e.cli.Get(ctx, k)
	if err != nil {
		return err
	}
	ops := []clientv3.Op{clientv3.OpDelete(e.key("owners", node))}
	var cmps []clientv3.Cmp
	if len(cur.Kvs) > 0 {
		if l, err := lease.Decode(cur.Kvs[0].Value); err == nil && l.Node == node {
			ops = append(ops, clientv3.OpDelete(k))
			if l.Subnet.IsValid() && l.Subnet6.IsValid() {
				// Only if it is still this node's claim.
				k6 := e.key("subnets6", lease.SubnetKey(l.Subnet6))
				cmps = append(cmps, clientv3.Compare(clientv3.Value(k6), "=", node))
				ops = append(ops, clientv3.OpDelete(k6))
			}
			if cur.Kvs[0].Lease != 0 {
				defer func() { _, _ = e.cli.Revoke(ctx, clientv3.LeaseID(cur.Kvs[0].Lease)) }()
			}
		}
	}
	// Without the IPv6 claim (someone else's now, or gone), the rest still goes.
	_, err = e.cli.Txn(ctx).If(cmps...).Then(ops...).Else(ops[:min(len(ops), 2)]...).Commit()
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
	e.mu.Lock()
	e.watching = true
	e.mu.Unlock()
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
	e.mu.Lock()
	known := e.claimed
	e.claimed = nil
	e.mu.Unlock()
	leases := make(map[string]lease.Entry, len(resp.Kvs))
	bad := map[string]string{}
	for _, kv := range resp.Kvs {
		d := decodeKV(kv, known)
		if d.err != nil {
			bad[string(kv.Key)] = d.err.Error()
			continue
		}
		leases[string(kv.Key)] = lease.Entry{Lease: d.l, Rev: kv.CreateRevision}
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

// Leave releases whatever node holds or is remembered for (netagent leave); it returns the
// subnets released.
func (e *Store) Leave(ctx context.Context, node string) ([]netip.Prefix, error) {
	st, err := e.state(ctx)
	if err != nil {
		return nil, err
	}
	subnets := st.owners[node]
	var primary netip.Prefix
	for _, d := range st.leases {
		if l := d.l; d.err == nil && l.Node == node {
			primary = l.Primary()
			subnets = append(subnets, l.Subnets()...)
		}
	}
	if len(subnets) == 0 {
		return nil, fmt.Errorf("node %s holds no subnet", node)
	}
	if !primary.IsValid() {
		primary = subnets[0]
	}
	slices.SortFunc(subnets, func(a, b netip.Prefix) int {
		return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
	})
	return slices.Compact(subnets), e.Release(ctx, node, primary)
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

package antispoof

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"

	"golang.org/x/sys/unix"

	"github.com/vishvananda/netlink"

	"github.com/netagent/netagent/pkg/bridge"
	"github.com/netagent/netagent/pkg/ipam"
	"github.com/netagent/netagent/pkg/nlattr"
	"github.com/netagent/netagent/pkg/nldump"
)

// Stats says what a Sync found and changed.
type Stats struct {
	Entries  int  // entries in the set afterwards
	Added    int  // entries added
	Removed  int  // entries removed
	Repaired bool // the table, chain or rules were missing or not as written, and were rewritten
	Chains   int  // routed pods' chains written (missing or not as written) or removed (routed.go)
}

// Sync makes the kernel's set equal to desired and the rule set as this package writes it,
// in one transaction. When everything already matches it writes nothing. Entries the
// kernel has and desired lacks are removed, so desired must be complete: see SyncDataDir
// for the race this leaves with a plugin that adds a pod meanwhile, and how it avoids it.
func Sync(ctx context.Context, desired []Entry) (Stats, error) {
	st, _, err := sync(ctx, func() []Entry { return desired }, true, nil)
	return st, err
}

// sync adds what desired has and the set lacks, removes what it has and desired lacks when
// removeStale, and rewrites the rule set when it is not intact. desired is called after the
// kernel's set was read (see SyncDataDir for why the order matters).
//
// addOK, when set, decides which missing entries are added while the rule set is intact;
// the others are returned as withheld (a rebuilt rule set gets every entry at once).
func sync(ctx context.Context, desired func() []Entry, removeStale bool, addOK func(Entry) bool) (Stats, []Entry, error) {
	c, err := dial(ctx)
	if err != nil {
		return Stats{}, nil, err
	}
	defer c.close()

	cur, err := list(c)
	installed := !errors.Is(err, ErrNotInstalled)
	if err != nil && installed {
		return Stats{}, nil, err
	}
	d := desired()
	want := make(map[string]Entry, len(d))
	var errs []error
	for _, e := range d {
		k, err := e.key()
		if err != nil {
			errs = append(errs, err)
			continue
		}
		want[string(k)] = e
	}
	var st Stats
	var msgs []msg
	if !installed || !intact(c) {
		msgs = ensureMsgs()
		st.Repaired = true
	}
	have := make(map[string]bool, len(cur))
	var del, add [][]byte
	for _, e := range cur {
		k, err := e.key()
		if err != nil {
			continue // not an element we could have written; leave it
		}
		have[string(k)] = true
		if _, ok := want[string(k)]; !ok && removeStale {
			del = append(del, k)
		}
	}
	var withheld []Entry
	for k, e := range want {
		switch {
		case have[k]:
		case addOK != nil && !st.Repaired && !addOK(e):
			withheld = append(withheld, e)
		default:
			add = append(add, []byte(k))
		}
	}
	msgs = append(msgs, elementMsgs(unix.NFT_MSG_DELSETELEM, del)...)
	msgs = append(msgs, elementMsgs(unix.NFT_MSG_NEWSETELEM, add)...)
	if err := c.transact(msgs); err != nil {
		return Stats{}, nil, fmt.Errorf("sync anti-spoofing set (%d to add, %d to remove, repair %v): %w", len(add), len(del), st.Repaired, err)
	}
	st.Added, st.Removed = len(add), len(del)
	st.Entries = len(cur) + len(add) - len(del)
	return st, withheld, errors.Join(errs...)
}

// FromRecords is the desired set of an IPAM store's records: each record's EntriesFor its
// host veth (bridge.HostVethName of its attachment) and addresses, but for routed pods'.
func FromRecords(recs []ipam.Record) []Entry {
	out := make([]Entry, 0, len(recs))
	for _, r := range recs {
		if isRouted(r) {
			continue // its own chain (routed.go), not the bridge set
		}
		out = append(out, EntriesFor(bridge.HostVethName(r.ContainerID, r.IfName), r.Addrs()...)...)
	}
	return out
}

// isRouted reports whether the plugin recorded r as a routed pod ("routed" in its extra).
func isRouted(r ipam.Record) bool {
	if !bytes.Contains(r.Extra, []byte(`"routed"`)) {
		return false // the common case, without decoding
	}
	var x struct {
		Routed bool `json:"routed"`
	}
	return json.Unmarshal(r.Extra, &x) == nil && x.Routed
}

// Entries reads the desired set from the plugin's data directory (one IPAM store per
// network below it), store by store (for status and diagnostics; Sync with SyncDataDir).
func Entries(dataDir string) ([]Entry, error) {
	stores, err := openStores(dataDir)
	if err != nil {
		return nil, err
	}
	var out []Entry
	for _, s := range stores {
		recs, err := s.Records()
		if err != nil {
			return nil, err
		}
		out = append(out, FromRecords(recs)...)
	}
	return out, nil
}

// CountPods counts the pods netagent-cni recorded under dataDir, bridged and routed
// (none when the directory does not exist).
func CountPods(dataDir string) (bridged, routed int, err error) {
	stores, err := openStores(dataDir)
	if err != nil {
		return 0, 0, err
	}
	for _, s := range stores {
		recs, err := s.Records()
		if err != nil {
			return 0, 0, err
		}
		for _, r := range recs {
			if isRouted(r) {
				routed++
			} else {
				bridged++
			}
		}
	}
	return bridged, routed, nil
}

// ErrNoDataDir means the plugin's data directory is missing while pods have entries.
var ErrNoDataDir = errors.New("no CNI data dir")

// SyncDataDir syncs the set with the pods netagent-cni recorded under dataDir (its
// "dataDir" setting, /var/lib/cni/netagent by default): the agent's one call.
//
// It holds the lock of every address store while it reads the records and writes the
// kernel. That closes the race a plain Sync would have: a pod whose address is recorded
// after the records were read, and whose entry the plugin added before Sync wrote, would
// be removed as stale. The plugin records an address before it adds the entry, and removes
// entries under the same lock as it releases the address, so under the locks the records
// and the set cannot move apart.
//
// A dataDir that does not exist (no pod was ever added here, or the agent cannot see the
// plugin's directory) changes nothing: installing the rule set without the pods' entries,
// or emptying the set, would cut every pod off. If the set has entries, the error says so.
func SyncDataDir(ctx context.Context, dataDir string) (Stats, error) {
	st, _, err := SyncDataDirFunc(ctx, dataDir, nil)
	return st, err
}

// SyncDataDirFunc is SyncDataDir where addOK decides which missing entries of live pods
// are added while the rule set is intact; it returns the others. The agent uses it so as
// not to race the plugin: an entry missing once may be a pod between its veth and its
// entry (ADD) or between its entry and its address (DEL), so it adds only entries that
// stay missing across two checks.
func SyncDataDirFunc(ctx context.Context, dataDir string, addOK func(Entry) bool) (Stats, []Entry, error) {
	if _, err := os.Stat(dataDir); errors.Is(err, fs.ErrNotExist) {
		cur, err := List(ctx)
		if errors.Is(err, ErrNotInstalled) {
			return Stats{}, nil, nil // no pod was ever wired here: the plugin installs it with the first
		}
		if err != nil {
			return Stats{}, nil, err
		}
		st := Stats{Entries: len(cur)}
		if len(cur) > 0 {
			err = fmt.Errorf("CNI data dir %s does not exist, yet the anti-spoofing set holds %d entries: kept them (is the plugin's dataDir visible to the agent?): %w", dataDir, len(cur), ErrNoDataDir)
		}
		return st, nil, err
	}
	stores, err := openStores(dataDir)
	if err != nil {
		return Stats{}, nil, err
	}
	var st Stats
	var withheld []Entry
	err = withLocked(stores, nil, func(recs []ipam.Record) error {
		var err error
		st, withheld, err = sync(ctx, func() []Entry { return withVeth(FromRecords(recs)) }, true, addOK)
		n, rerr := syncRouted(ctx, recs)
		st.Chains = n
		return errors.Join(err, rerr)
	})
	return st, withheld, err
}

// withVeth keeps the entries whose host veth exists. A DEL removes the veth and the entry
// before it releases the address (outside the store lock, so the kernel's waits overlap):
// a record without its veth is a pod on its way out, and putting its entry back would
// leave it behind. Called after the set was read: a plugin adds an entry only once the
// veth exists, so an entry in what was read has its veth in what is listed here, unless it
// really is gone.
func withVeth(entries []Entry) []Entry {
	have, err := linkNames()
	if err != nil {
		return entries // cannot tell: keep what the records say
	}
	return slices.DeleteFunc(entries, func(e Entry) bool { return !have[e.HostVeth] })
}

// linkNames are the names of the links in the calling thread's namespace.
func linkNames() (map[string]bool, error) {
	links, err := nldump.Retry(netlink.LinkList) // pods come and go during the dump
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	have := make(map[string]bool, len(links))
	for _, l := range links {
		have[l.Attrs().Name] = true
	}
	return have, nil
}

// withLocked holds the locks of stores, in order, and calls fn with all their records.
// The plugin takes one store's lock at a time, so the nesting cannot deadlock with it.
func withLocked(stores []*ipam.Store, recs []ipam.Record, fn func([]ipam.Record) error) error {
	if len(stores) == 0 {
		return fn(recs)
	}
	return stores[0].View(func(tx *ipam.Tx) error {
		return withLocked(stores[1:], append(recs, tx.Records()...), fn)
	})
}

// openStores opens the address stores directly below dataDir (the plugin keeps one per
// network name), sorted by name.
func openStores(dataDir string) ([]*ipam.Store, error) {
	ents, err := os.ReadDir(dataDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read CNI data dir: %w", err)
	}
	var out []*ipam.Store
	for _, e := range ents {
		dir := filepath.Join(dataDir, e.Name())
		if !e.IsDir() || !ipam.IsStore(dir) {
			continue
		}
		s, err := ipam.Open(dir)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Dir() < out[j].Dir() })
	return out, nil
}

// betweenRoutedReads runs between syncRouted's reads of the chains and of the links (a
// test's hook: a pod's ADD happening there).
var betweenRoutedReads = func() {}

// syncRouted makes the routed pods' chains (routed.go) match the records: each routed pod
// whose host veth exists gets its chain as AddRouted writes it; a chain whose veth is gone
// and that no routed record names is removed (a chain of a veth that exists and is not
// recorded may be another data directory's: left); a dormant table is woken. One dump
// each of the table, its chains and their rules, and at most one transaction. It returns
// how many chains it wrote or removed (and 1 for waking the table).
//
// The plugin writes these chains outside the store lock, so a pass can meet a pod between
// its veth and its chain (ADD: writing the same chain is harmless) or between removing its
// chain and releasing its record (DEL: the chain comes back and, once the veth and the
// record are gone, the next pass removes it).
func syncRouted(ctx context.Context, recs []ipam.Record) (int, error) {
	var want []Routed
	named := map[string]bool{}
	for _, r := range recs {
		if isRouted(r) {
			veth := bridge.HostVethName(r.ContainerID, r.IfName)
			named[veth] = true
			want = append(want, Routed{HostVeth: veth, IPs: r.Addrs()})
		}
	}
	c, err := dial(ctx)
	if err != nil {
		if isAbsent(err) && len(want) == 0 {
			return 0, nil
		}
		return 0, err
	}
	defer c.close()
	chains, err := c.dumpFam(unix.NFPROTO_NETDEV, unix.NFT_MSG_GETCHAIN, true, []attr{str(unix.NFTA_CHAIN_TABLE, RoutedTable)})
	if err != nil && !isAbsent(err) {
		return 0, fmt.Errorf("list routed pods' chains: %w", err)
	}
	rules, err := c.dumpFam(unix.NFPROTO_NETDEV, unix.NFT_MSG_GETRULE, true, []attr{str(unix.NFTA_RULE_TABLE, RoutedTable)})
	if err != nil && !isAbsent(err) {
		return 0, fmt.Errorf("list routed pods' rules: %w", err)
	}
	// The links after the chains: the plugin adds a chain once its veth exists, so a chain
	// read above has its veth listed here unless it is really gone. Listed first, a pod
	// whose veth and chain both came in between (one these records do not name: another
	// data directory's, or a network's first, its store opened after ours) lost its chain.
	betweenRoutedReads()
	exists, err := linkNames()
	if err != nil {
		return 0, err
	}
	have := byName(chains, unix.NFTA_CHAIN_TABLE, unix.NFTA_CHAIN_NAME) // a chain's attributes: its one body
	ruleOf := byName(rules, unix.NFTA_RULE_TABLE, unix.NFTA_RULE_CHAIN)
	var msgs []msg
	n := 0
	for _, w := range want {
		if !exists[w.HostVeth] || w.validate() != nil {
			continue
		}
		b, ok := have[w.HostVeth]
		hooked := ok && nlattr.Contains(b[0], routedChainAttrs(w.HostVeth))
		if hooked && rulesEqual(ruleOf[w.HostVeth], routedRules(w)) {
			continue
		}
		if ok && !hooked {
			// A chain of this name that is not our base chain (a regular one, another
			// hook or priority): the kernel refuses to update it into ours (EOPNOTSUPP),
			// which would fail every other repair of this transaction too. Replaced.
			msgs = append(msgs, routedDelMsgs(w.HostVeth)...)
		}
		msgs = append(msgs, routedChainMsgs(w)...)
		n++
	}
	for name := range have {
		if !named[name] && !exists[name] {
			msgs = append(msgs, routedDelMsgs(name)...)
			n++
		}
	}
	// A dormant table unhooks every chain in it: the base messages wake it.
	tableOK, err := routedTableIntact(c)
	if err != nil {
		return 0, fmt.Errorf("read routed pods' table: %w", err)
	}
	wake := !tableOK && len(have) > 0
	if wake {
		n++
	}
	if len(msgs) > 0 || wake {
		msgs = append(routedBaseMsgs(), msgs...)
	}
	if err := c.transact(msgs); err != nil {
		return 0, fmt.Errorf("sync routed pods' anti-spoofing chains (%d): %w", n, err)
	}
	return n, nil
}

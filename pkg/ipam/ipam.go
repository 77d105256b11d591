// Package ipam allocates pod addresses from a node's subnet.
//
// Design: one network's allocations are a small JSON document, read and rewritten whole
// under an exclusive flock on a lock file in the store directory. With at most a few
// hundred pods per node it stays a few tens of KiB, so one read and one write per call beat
// host-local's file-per-address layout, which lists a directory on every allocation.
//
// Crash safety without rename: the document is written alternately into two slot files
// (slot.a, slot.b), each with a header carrying a generation number, the length and a
// CRC-32 of the body, overwritten in place. A reader takes the valid slot with the higher
// generation, so a process killed in the middle of a write (kill -9 included) leaves the
// previous state in the other slot, never a torn one; the flock dies with the process. On
// ext4 this is much cheaper than the classic write-temp-and-rename, which allocates a new
// inode (and frees the old one's blocks) on every ADD and DEL (BENCHMARKS.md, CNI
// plugin). The slots are not fsynced: they describe pods that do not survive a reboot
// anyway, and the runtime's GC reconciles after one.
//
// Allocation is round-robin from the address after the last one handed out, so a freed
// address is not reused at once (a late packet for a deleted pod does not reach its
// successor). The network, broadcast and gateway addresses are never handed out.
package ipam

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"math"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
)

// ErrExhausted means every address of the range is in use.
var ErrExhausted = errors.New("no free address in range")

// ErrCorrupt means the state file could not be decoded.
var ErrCorrupt = errors.New("ipam state is corrupt")

const stateVersion = 1

// DefaultDataDir is where netagent-cni keeps its stores unless its config's "dataDir" says
// otherwise (the agent reads them there too, for anti-spoofing).
const DefaultDataDir = "/var/lib/cni/netagent"

// Key identifies one attachment, as the CNI spec does: container ID plus interface name.
type Key struct {
	ContainerID string `json:"id"`
	IfName      string `json:"if"`
}

func (k Key) String() string { return k.ContainerID + "/" + k.IfName }

// Record is one allocation with the per-attachment facts the plugin needs for DEL, CHECK
// and GC. Extra is opaque to this package.
type Record struct {
	Key
	IP    netip.Addr      `json:"ip"`
	Netns string          `json:"netns,omitempty"`
	Extra json.RawMessage `json:"extra,omitempty"`
}

// Range is the part of a subnet addresses are handed out from.
type Range struct {
	Subnet  netip.Prefix
	Start   netip.Addr // first usable address (inclusive)
	End     netip.Addr // last usable address (inclusive)
	Gateway netip.Addr // never handed out
}

// NewRange validates a subnet with optional start, end and gateway (zero values mean
// "default": start after the network address, end before the broadcast address, gateway
// the first address).
func NewRange(subnet netip.Prefix, start, end, gw netip.Addr) (Range, error) {
	subnet = subnet.Masked()
	if !subnet.IsValid() {
		return Range{}, errors.New("subnet is not a valid prefix")
	}
	bits := subnet.Addr().BitLen()
	if bits-subnet.Bits() < 2 {
		return Range{}, fmt.Errorf("subnet %s is too small (needs at least 2 host bits)", subnet)
	}
	first := subnet.Addr().Next()
	last := lastAddr(subnet)
	if subnet.Addr().Is4() {
		last = last.Prev() // broadcast
	}
	if !gw.IsValid() {
		gw = first
	}
	if !start.IsValid() {
		start = first
	}
	if !end.IsValid() {
		end = last
	}
	for _, c := range []struct {
		name string
		a    netip.Addr
	}{{"gateway", gw}, {"rangeStart", start}, {"rangeEnd", end}} {
		if c.a.Is4() != subnet.Addr().Is4() || !subnet.Contains(c.a) {
			return Range{}, fmt.Errorf("%s %s is outside subnet %s", c.name, c.a, subnet)
		}
		if c.a.Compare(first) < 0 || c.a.Compare(last) > 0 {
			return Range{}, fmt.Errorf("%s %s is the network or broadcast address of %s", c.name, c.a, subnet)
		}
	}
	if start.Compare(end) > 0 {
		return Range{}, fmt.Errorf("rangeStart %s is after rangeEnd %s", start, end)
	}
	return Range{Subnet: subnet, Start: start, End: end, Gateway: gw}, nil
}

// Size is the number of addresses the range can hand out.
func (r Range) Size() int {
	n := addrDiff(r.Start, r.End) + 1
	if r.Gateway.Compare(r.Start) >= 0 && r.Gateway.Compare(r.End) <= 0 {
		n--
	}
	return n
}

func (r Range) contains(a netip.Addr) bool {
	return a.Compare(r.Start) >= 0 && a.Compare(r.End) <= 0
}

// Store is the allocation state of one network in one directory.
type Store struct {
	dir string
}

// Open returns the store in dir, creating the directory (mode 0700: it maps containers to
// addresses, nothing anyone else needs to read).
func Open(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("ipam store %s: %w", dir, err)
	}
	return &Store{dir: dir}, nil
}

// Dir is the store's directory.
func (s *Store) Dir() string { return s.dir }

type state struct {
	gen         uint64     // slot generation it was read from
	Version     int        `json:"version"`
	Last        netip.Addr `json:"last,omitzero"`
	Allocations []Record   `json:"allocations"`

	byIP  map[netip.Addr]int
	byKey map[Key]int
}

// Tx is a locked view of the store, valid inside Update or View.
type Tx struct {
	st      *state
	changed bool
}

// Update runs fn with the store locked and writes the state back if fn changed it and
// returned nil. An error from fn leaves the stored state untouched.
func (s *Store) Update(fn func(*Tx) error) error {
	return s.withLock(func() error {
		st, err := s.load()
		if err != nil {
			return err
		}
		tx := &Tx{st: st}
		if err := fn(tx); err != nil {
			return err
		}
		if !tx.changed {
			return nil
		}
		return s.save(st)
	})
}

// View runs fn with the store locked, read-only.
func (s *Store) View(fn func(*Tx) error) error {
	return s.withLock(func() error {
		st, err := s.load()
		if err != nil {
			return err
		}
		return fn(&Tx{st: st})
	})
}

// Allocate returns the record for key, allocating an address in r when key has none yet
// (so a repeated ADD gets the same address). rec supplies Netns and Extra for a new record.
func (tx *Tx) Allocate(r Range, key Key, rec Record) (Record, error) {
	if i, ok := tx.st.byKey[key]; ok {
		return tx.st.Allocations[i], nil
	}
	ip, err := tx.next(r)
	if err != nil {
		return Record{}, err
	}
	rec.Key = key
	rec.IP = ip
	tx.st.add(rec)
	tx.st.Last = ip
	tx.changed = true
	return rec, nil
}

func (tx *Tx) next(r Range) (netip.Addr, error) {
	start := r.Start
	if tx.st.Last.IsValid() && r.contains(tx.st.Last) {
		start = tx.st.Last.Next()
		if !r.contains(start) {
			start = r.Start
		}
	}
	a := start
	for {
		if a != r.Gateway {
			if _, used := tx.st.byIP[a]; !used {
				return a, nil
			}
		}
		a = a.Next()
		if !r.contains(a) {
			a = r.Start
		}
		if a == start {
			return netip.Addr{}, fmt.Errorf("%w %s-%s (%d in use)", ErrExhausted, r.Start, r.End, len(tx.st.Allocations))
		}
	}
}

// Get returns the record for key.
func (tx *Tx) Get(key Key) (Record, bool) {
	i, ok := tx.st.byKey[key]
	if !ok {
		return Record{}, false
	}
	return tx.st.Allocations[i], true
}

// Release removes key's record and returns it; releasing an unknown key is not an error.
func (tx *Tx) Release(key Key) (Record, bool) {
	i, ok := tx.st.byKey[key]
	if !ok {
		return Record{}, false
	}
	rec := tx.st.Allocations[i]
	tx.st.Allocations = slices.Delete(tx.st.Allocations, i, i+1)
	tx.st.index()
	tx.changed = true
	return rec, true
}

// SetExtra replaces the opaque data of key's record.
func (tx *Tx) SetExtra(key Key, extra json.RawMessage) bool {
	i, ok := tx.st.byKey[key]
	if !ok {
		return false
	}
	tx.st.Allocations[i].Extra = extra
	tx.changed = true
	return true
}

// Records returns a copy of every record, sorted by address.
func (tx *Tx) Records() []Record {
	out := slices.Clone(tx.st.Allocations)
	sort.Slice(out, func(i, j int) bool { return out[i].IP.Less(out[j].IP) })
	return out
}

// Used counts the allocations inside r.
func (tx *Tx) Used(r Range) int {
	n := 0
	for _, a := range tx.st.Allocations {
		if r.contains(a.IP) && a.IP != r.Gateway {
			n++
		}
	}
	return n
}

func (st *state) add(rec Record) {
	st.Allocations = append(st.Allocations, rec)
	st.byIP[rec.IP] = len(st.Allocations) - 1
	st.byKey[rec.Key] = len(st.Allocations) - 1
}

func (st *state) index() {
	st.byIP = make(map[netip.Addr]int, len(st.Allocations))
	st.byKey = make(map[Key]int, len(st.Allocations))
	for i, a := range st.Allocations {
		st.byIP[a.IP] = i
		st.byKey[a.Key] = i
	}
}

// The two slot files and the size of their header.
var slotNames = [2]string{"slot.a", "slot.b"}

const headerLen = 64

func (s *Store) slotPath(i int) string { return filepath.Join(s.dir, slotNames[i]) }

// slot is one slot file's verdict.
type slot struct {
	gen  uint64
	body []byte
	err  error // nil: valid
	none bool  // the file does not exist
}

func readSlot(path string) slot {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return slot{none: true}
	}
	if err != nil {
		return slot{err: err}
	}
	if len(b) < headerLen {
		return slot{err: fmt.Errorf("%w: %s: short header", ErrCorrupt, path)}
	}
	var gen, n uint64
	var sum uint32
	if _, err := fmt.Sscanf(string(b[:headerLen]), "netagent-ipam 1 %d %d %d", &gen, &n, &sum); err != nil {
		return slot{err: fmt.Errorf("%w: %s: bad header: %v", ErrCorrupt, path, err)}
	}
	if n > uint64(len(b)-headerLen) {
		return slot{err: fmt.Errorf("%w: %s: truncated body", ErrCorrupt, path)}
	}
	body := b[headerLen : headerLen+int(n)]
	if crc32.ChecksumIEEE(body) != sum {
		return slot{err: fmt.Errorf("%w: %s: checksum mismatch (torn write)", ErrCorrupt, path)}
	}
	return slot{gen: gen, body: body}
}

func (s *Store) withLock(fn func() error) error {
	f, err := os.OpenFile(filepath.Join(s.dir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("ipam lock: %w", err)
	}
	defer f.Close()
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX)
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("ipam lock %s: %w", f.Name(), err)
	}
	// Closing the file releases the lock.
	return fn()
}

func (s *Store) load() (*state, error) {
	a, b := readSlot(s.slotPath(0)), readSlot(s.slotPath(1))
	var cur slot
	switch {
	case a.err == nil && !a.none && (b.err != nil || b.none || a.gen > b.gen):
		cur = a
	case b.err == nil && !b.none:
		cur = b
	case a.none && b.none:
		st := &state{Version: stateVersion}
		st.index()
		return st, nil
	default:
		// Neither slot is valid: not a torn write (that leaves the other slot intact).
		return nil, fmt.Errorf("ipam store %s: %w", s.dir, errors.Join(a.err, b.err))
	}
	st, err := Decode(cur.body)
	if err != nil {
		return nil, fmt.Errorf("ipam store %s: %w", s.dir, err)
	}
	st.gen = cur.gen
	return st, nil
}

// The body is line-oriented text, one allocation a line, because decoding it is about ten
// times cheaper than JSON through reflection (this runs on every ADD and DEL):
//
//	last 10.244.1.7
//	a 10.244.1.5 "containerid" "eth0" "/var/run/netns/x" "{\"hostVeth\":...}"
//
// Strings are Go-quoted, so any byte is safe in them.

// Encode renders the body.
func (st *state) Encode() []byte {
	var b bytes.Buffer
	b.Grow(64 + 160*len(st.Allocations))
	if st.Last.IsValid() {
		b.WriteString("last ")
		b.WriteString(st.Last.String())
		b.WriteByte('\n')
	}
	for _, a := range st.Allocations {
		b.WriteString("a ")
		b.WriteString(a.IP.String())
		for _, f := range []string{a.ContainerID, a.IfName, a.Netns, string(a.Extra)} {
			b.WriteByte(' ')
			b.WriteString(strconv.Quote(f))
		}
		b.WriteByte('\n')
	}
	return b.Bytes()
}

// Decode parses a state body, rejecting anything that would make allocation unsafe
// (unknown lines, invalid or duplicate addresses, duplicate keys).
func Decode(b []byte) (*state, error) {
	st := &state{Version: stateVersion}
	n := bytes.Count(b, []byte("\n"))
	st.Allocations = make([]Record, 0, n)
	st.byIP = make(map[netip.Addr]int, n)
	st.byKey = make(map[Key]int, n)
	for lineNo := 1; len(b) > 0; lineNo++ {
		line := b
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			line, b = b[:i], b[i+1:]
		} else {
			b = nil
		}
		if len(line) == 0 {
			continue
		}
		kind, rest, _ := bytes.Cut(line, []byte(" "))
		switch string(kind) {
		case "last":
			a, err := netip.ParseAddr(string(rest))
			if err != nil {
				return nil, fmt.Errorf("%w: line %d: %v", ErrCorrupt, lineNo, err)
			}
			st.Last = a
		case "a":
			rec, err := decodeRecord(string(rest))
			if err != nil {
				return nil, fmt.Errorf("%w: line %d: %v", ErrCorrupt, lineNo, err)
			}
			if _, dup := st.byIP[rec.IP]; dup {
				return nil, fmt.Errorf("%w: address %s allocated twice", ErrCorrupt, rec.IP)
			}
			if _, dup := st.byKey[rec.Key]; dup {
				return nil, fmt.Errorf("%w: attachment %s allocated twice", ErrCorrupt, rec.Key)
			}
			st.add(rec)
		default:
			return nil, fmt.Errorf("%w: line %d: unknown record %q", ErrCorrupt, lineNo, kind)
		}
	}
	return st, nil
}

func decodeRecord(s string) (Record, error) {
	ipStr, s, ok := strings.Cut(s, " ")
	if !ok {
		return Record{}, errors.New("want an address and 4 quoted fields")
	}
	ip, err := netip.ParseAddr(ipStr)
	if err != nil {
		return Record{}, err
	}
	var f [4]string
	for i := range f {
		q, err := strconv.QuotedPrefix(s)
		if err != nil {
			return Record{}, fmt.Errorf("field %d: %v", i+2, err)
		}
		if f[i], err = strconv.Unquote(q); err != nil {
			return Record{}, fmt.Errorf("field %d: %v", i+2, err)
		}
		s = strings.TrimPrefix(s[len(q):], " ")
	}
	if s != "" {
		return Record{}, errors.New("trailing data")
	}
	if f[0] == "" || f[1] == "" {
		return Record{}, fmt.Errorf("allocation %s has an empty container ID or interface", ip)
	}
	rec := Record{Key: Key{ContainerID: f[0], IfName: f[1]}, IP: ip, Netns: f[2]}
	if f[3] != "" {
		rec.Extra = json.RawMessage(f[3])
	}
	return rec, nil
}

func (s *Store) save(st *state) error {
	body := st.Encode()
	gen := st.gen + 1
	buf := make([]byte, headerLen, headerLen+len(body))
	h := fmt.Sprintf("netagent-ipam 1 %d %d %d", gen, len(body), crc32.ChecksumIEEE(body))
	copy(buf, h)
	for i := len(h); i < headerLen-1; i++ {
		buf[i] = ' '
	}
	buf[headerLen-1] = '\n'
	buf = append(buf, body...)
	// Overwrite the slot that does not hold the current state (odd generations go to b).
	path := s.slotPath(int(gen % 2))
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("write ipam state: %w", err)
	}
	_, werr := f.WriteAt(buf, 0)
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		return fmt.Errorf("write ipam state %s: %w", path, werr)
	}
	st.gen = gen
	return nil
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	bits := p.Bits()
	for i := range b {
		for j := 0; j < 8; j++ {
			if i*8+j >= bits {
				b[i] |= 0x80 >> j
			}
		}
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// addrDiff returns b-a for addresses in the same family, capped to fit an int.
func addrDiff(a, b netip.Addr) int {
	ab, bb := a.As16(), b.As16()
	d := new(big.Int).Sub(new(big.Int).SetBytes(bb[:]), new(big.Int).SetBytes(ab[:]))
	if !d.IsInt64() || d.Int64() > math.MaxInt32 {
		return math.MaxInt32
	}
	return int(d.Int64())
}

// Put records an address allocated elsewhere (a delegated IPAM plugin) for key.
func (tx *Tx) Put(rec Record) error {
	if i, ok := tx.st.byIP[rec.IP]; ok && tx.st.Allocations[i].Key != rec.Key {
		return fmt.Errorf("address %s is already recorded for %s", rec.IP, tx.st.Allocations[i].Key)
	}
	if i, ok := tx.st.byKey[rec.Key]; ok {
		tx.st.Allocations[i] = rec
		tx.st.index()
	} else {
		tx.st.add(rec)
	}
	tx.changed = true
	return nil
}

// Records returns every allocation (for tools and tests; it takes the lock).
func (s *Store) Records() ([]Record, error) {
	var out []Record
	err := s.View(func(tx *Tx) error { out = tx.Records(); return nil })
	return out, err
}

// IsStore reports whether dir holds a store (so tools can tell it from other layouts).
func IsStore(dir string) bool {
	for i := range slotNames {
		if _, err := os.Stat(filepath.Join(dir, slotNames[i])); err == nil {
			return true
		}
	}
	return false
}

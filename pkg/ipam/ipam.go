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
//
// Dual stack: an attachment has one address per family its network enables, all taken in
// one Update (so one write of one slot: a crash leaves all of them or none) and released
// together. Its record holds the IPv4 address (or the IPv6 one, for IPv6 only) in IP and
// the IPv6 address of a dual-stack attachment in IP6; each family keeps its own
// round-robin position.
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
	IP    netip.Addr      `json:"ip"`           // the IPv4 address, else the IPv6 one
	IP6   netip.Addr      `json:"ip6,omitzero"` // the IPv6 address when IP is the IPv4 one
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
	Last6       netip.Addr `json:"last6,omitzero"` // IPv6's round-robin position
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
	return tx.AllocateEach([]Range{r}, key, rec)
}

// AllocateEach is Allocate with one range per family (an IPv4 and an IPv6 one for dual
// stack; at most one of each): key gets an address from each. A repeated ADD keeps the
// addresses it has and gets one in a family it lacks (a network that became dual stack).
func (tx *Tx) AllocateEach(rs []Range, key Key, rec Record) (Record, error) {
	var v4, v6 *Range
	for i := range rs {
		p := &v4
		if !rs[i].Subnet.Addr().Is4() {
			p = &v6
		}
		if *p != nil {
			return Record{}, fmt.Errorf("two ranges of one family: %s and %s", (*p).Subnet, rs[i].Subnet)
		}
		*p = &rs[i]
	}
	if v4 == nil && v6 == nil {
		return Record{}, errors.New("no address range")
	}
	i, exists := tx.st.byKey[key]
	if exists {
		rec = tx.st.Allocations[i]
	}
	has4, has6 := rec.IP.Is4(), rec.IP.Is6() || rec.IP6.IsValid()
	if !exists {
		rec.Key, rec.IP, rec.IP6 = key, netip.Addr{}, netip.Addr{}
		has4, has6 = false, false
	}
	var new4, new6 netip.Addr
	var err error
	if v4 != nil && !has4 {
		if new4, err = tx.next(*v4, tx.st.Last); err != nil {
			return Record{}, err
		}
	}
	if v6 != nil && !has6 {
		if new6, err = tx.next(*v6, tx.st.Last6); err != nil {
			return Record{}, err
		}
	}
	if !new4.IsValid() && !new6.IsValid() {
		return rec, nil
	}
	if exists {
		// Re-add the record with its new address (in IP when it had none of IPv4).
		tx.st.Allocations = slices.Delete(tx.st.Allocations, i, i+1)
		tx.st.index()
	}
	if new4.IsValid() {
		rec.IP6 = rec.V6()
		rec.IP = new4
		tx.st.Last = new4
	}
	if new6.IsValid() {
		if rec.IP.IsValid() {
			rec.IP6 = new6
		} else {
			rec.IP = new6
		}
		tx.st.Last6 = new6
	}
	tx.st.add(rec)
	tx.changed = true
	return rec, nil
}

// V4 is the record's IPv4 address (invalid when it has none).
func (r Record) V4() netip.Addr {
	if r.IP.Is4() {
		return r.IP
	}
	return netip.Addr{}
}

// V6 is the record's IPv6 address (invalid when it has none).
func (r Record) V6() netip.Addr {
	if r.IP.Is6() {
		return r.IP
	}
	return r.IP6
}

// Addrs are the record's addresses, IPv4 first.
func (r Record) Addrs() []netip.Addr {
	if r.IP6.IsValid() {
		return []netip.Addr{r.IP, r.IP6}
	}
	return []netip.Addr{r.IP}
}

func (tx *Tx) next(r Range, last netip.Addr) (netip.Addr, error) {
	start := r.Start
	if last.IsValid() && r.contains(last) {
		start = last.Next()
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
			return netip.Addr{}, fmt.Errorf("%w %s-%s (%d in use)", ErrExhausted, r.Start, r.End, tx.Used(r))
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
		for _, ip := range a.Addrs() {
			if r.contains(ip) && ip != r.Gateway {
				n++
			}
		}
	}
	return n
}

func (st *state) add(rec Record) {
	st.Allocations = append(st.Allocations, rec)
	for _, ip := range rec.Addrs() {
		st.byIP[ip] = len(st.Allocations) - 1
	}
	st.byKey[rec.Key] = len(st.Allocations) - 1
}

func (st *state) index() {
	st.byIP = make(map[netip.Addr]int, len(st.Allocations))
	st.byKey = make(map[Key]int, len(st.Allocations))
	for i, a := range st.Allocations {
		for _, ip := range a.Addrs() {
			st.byIP[ip] = i
		}
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
//	last fd00:0:0:1::7
//	a 10.244.1.5 "containerid" "eth0" "/var/run/netns/x" "{\"hostVeth\":...}"
//	a 10.244.1.6,fd00:0:0:1::7 "containerid2" "eth0" "/var/run/netns/y" "{...}"
//
// Strings are Go-quoted, so any byte is safe in them. A dual-stack attachment's addresses
// are joined by a comma, IPv4 first; "last" appears once per family. A store written
// before dual stack (one address a line, one "last") reads as it always did.

// Encode renders the body.
func (st *state) Encode() []byte {
	var b bytes.Buffer
	b.Grow(64 + 160*len(st.Allocations))
	for _, l := range []netip.Addr{st.Last, st.Last6} {
		if l.IsValid() {
			b.WriteString("last ")
			b.WriteString(l.String())
			b.WriteByte('\n')
		}
	}
	for _, a := range st.Allocations {
		b.WriteString("a ")
		b.WriteString(a.IP.String())
		if a.IP6.IsValid() {
			b.WriteByte(',')
			b.WriteString(a.IP6.String())
		}
		for _, f := range []string{a.ContainerID, a.IfName, a.Netns, string(a.Extra)} {
			b.WriteByte(' ')
			b.Write(appendQuoted(b.AvailableBuffer(), f))
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
			a, err := parseStoredAddr(string(rest))
			if err != nil {
				return nil, fmt.Errorf("%w: line %d: %v", ErrCorrupt, lineNo, err)
			}
			if a.Is4() {
				st.Last = a
			} else {
				st.Last6 = a
			}
		case "a":
			rec, err := decodeRecord(string(rest))
			if err != nil {
				return nil, fmt.Errorf("%w: line %d: %v", ErrCorrupt, lineNo, err)
			}
			for _, ip := range rec.Addrs() {
				if _, dup := st.byIP[ip]; dup {
					return nil, fmt.Errorf("%w: address %s allocated twice", ErrCorrupt, ip)
				}
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

// parseStoredAddr accepts only what Encode writes: a plain IPv4 or IPv6
// address. A zone or an IPv4-mapped form would survive arithmetic (Next keeps
// the zone) and come back as an address no pod can hold.
func parseStoredAddr(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, err
	}
	if a.Zone() != "" || a.Is4In6() {
		return netip.Addr{}, fmt.Errorf("address %q is not a plain IPv4 or IPv6 address", s)
	}
	return a, nil
}

func decodeRecord(s string) (Record, error) {
	ipStr, s, ok := strings.Cut(s, " ")
	if !ok {
		return Record{}, errors.New("want an address and 4 quoted fields")
	}
	ipStr, ip6Str, dual := strings.Cut(ipStr, ",")
	ip, err := parseStoredAddr(ipStr)
	if err != nil {
		return Record{}, err
	}
	var ip6 netip.Addr
	if dual {
		if ip6, err = parseStoredAddr(ip6Str); err != nil {
			return Record{}, err
		}
		if !ip.Is4() || !ip6.Is6() || ip6.Is4In6() {
			return Record{}, fmt.Errorf("addresses %s,%s are not IPv4,IPv6", ip, ip6)
		}
	}
	var f [4]string
	for i := range f {
		var err error
		if f[i], s, err = cutQuoted(s); err != nil {
			return Record{}, fmt.Errorf("field %d: %v", i+2, err)
		}
		s = strings.TrimPrefix(s, " ")
	}
	if s != "" {
		return Record{}, errors.New("trailing data")
	}
	if f[0] == "" || f[1] == "" {
		return Record{}, fmt.Errorf("allocation %s has an empty container ID or interface", ip)
	}
	rec := Record{Key: Key{ContainerID: f[0], IfName: f[1]}, IP: ip, IP6: ip6, Netns: f[2]}
	if f[3] != "" {
		rec.Extra = json.RawMessage(f[3])
	}
	return rec, nil
}

// appendQuoted appends strconv.Quote(s) to b. The fields the plugin writes (IDs, paths,
// JSON) are printable ASCII, quoted by escaping '"' and '\\' alone: that short path makes
// the same bytes without strconv's per-rune work, most of the store's cost on every ADD
// and DEL (BENCHMARKS.md); anything else goes to strconv.
func appendQuoted(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return strconv.AppendQuote(b, s)
		}
	}
	b = append(b, '"')
	for i := 0; i < len(s); i++ {
		if s[i] == '"' || s[i] == '\\' {
			b = append(b, '\\')
		}
		b = append(b, s[i])
	}
	return append(b, '"')
}

// cutQuoted unquotes the Go-quoted string at the start of s and returns it and what
// follows. A field of printable ASCII with only \" and \\ escapes (what appendQuoted's
// short path writes) is decoded here; anything else by strconv, which decides alike.
func cutQuoted(s string) (string, string, error) {
	if len(s) > 0 && s[0] == '"' {
		var buf []byte
	scan:
		for i := 1; i < len(s); i++ {
			switch c := s[i]; {
			case c == '"':
				if buf == nil {
					return s[1:i], s[i+1:], nil
				}
				return string(buf), s[i+1:], nil
			case c == '\\':
				if i+1 == len(s) || (s[i+1] != '"' && s[i+1] != '\\') {
					break scan
				}
				if buf == nil {
					buf = append(make([]byte, 0, len(s)), s[1:i]...)
				}
				i++
				buf = append(buf, s[i])
			case c < 0x20 || c > 0x7e:
				break scan
			case buf != nil:
				buf = append(buf, c)
			}
		}
	}
	q, err := strconv.QuotedPrefix(s)
	if err != nil {
		return "", "", err
	}
	u, err := strconv.Unquote(q)
	return u, s[len(q):], err
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
	if rec.IP6.IsValid() && (!rec.IP.Is4() || !rec.IP6.Is6()) {
		return fmt.Errorf("addresses %s,%s are not IPv4,IPv6", rec.IP, rec.IP6)
	}
	for _, ip := range rec.Addrs() {
		if i, ok := tx.st.byIP[ip]; ok && tx.st.Allocations[i].Key != rec.Key {
			return fmt.Errorf("address %s is already recorded for %s", ip, tx.st.Allocations[i].Key)
		}
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

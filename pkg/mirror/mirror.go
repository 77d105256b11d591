// Package mirror is the one bookkeeping behind the reconcilers' kernel mirrors: a copy of
// what netagent owns in one kernel table, keyed as the reconciler compares it, that the
// kernel's notifications (Observe) and netagent's own writes (Write) keep current, so a
// pass diffs the plan against memory instead of dumping the table.
//
// A mirror is valid from a Load (a dump) until Invalidate (a lost notification, someone
// else's change, the resync ticker); while it is invalid the reconciler dumps the table
// again. Write records its outcome before it writes, so the kernel's echo of our own
// change finds the mirror already right and triggers nothing.
package mirror

import (
	"errors"
	"maps"
	"sync"
)

// Mirror is a mirror of one kernel table. The zero value is off: Load does not keep what
// it is given until Enable.
type Mirror[K comparable, V comparable] struct {
	mu sync.Mutex
	on bool
	m  map[K]V // nil: not valid
}

// Enable makes Load keep the table it is given; the mirror is invalid until then.
func (m *Mirror[K, V]) Enable() {
	m.mu.Lock()
	m.on, m.m = true, nil
	m.mu.Unlock()
}

// Enabled reports whether the mirror is on (valid or not).
func (m *Mirror[K, V]) Enabled() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.on
}

// Invalidate makes the next reader dump the table again.
func (m *Mirror[K, V]) Invalidate() {
	m.mu.Lock()
	m.m = nil
	m.mu.Unlock()
}

// Valid reports whether the mirror holds the table.
func (m *Mirror[K, V]) Valid() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.m != nil
}

// Snapshot returns a copy of the mirror (it may change under the caller, Observe runs
// concurrently), or false when it is not valid.
func (m *Mirror[K, V]) Snapshot() (map[K]V, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.m == nil {
		return nil, false
	}
	return maps.Clone(m.m), true
}

// Load makes cur, a fresh dump, the mirror (when enabled; the mirror keeps a copy).
func (m *Mirror[K, V]) Load(cur map[K]V) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.on {
		m.m = maps.Clone(cur)
		if m.m == nil {
			m.m = map[K]V{}
		}
	}
}

// Read runs f on the mirror under its lock (f must not keep or change it); false when
// the mirror is not valid and f did not run.
func (m *Mirror[K, V]) Read(f func(cur map[K]V)) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.m == nil {
		return false
	}
	f(m.m)
	return true
}

// Observe applies a kernel notification: f changes the mirror as the notification says
// and reports whether that changed it. Not valid: f does not run, and Observe reports
// false, false.
func (m *Mirror[K, V]) Observe(f func(cur map[K]V) bool) (changed, valid bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.m == nil {
		return false, false
	}
	return f(m.m), true
}

// Write performs do, a kernel change of key k from prev to next (nil: absent), recording
// next first; if do fails, prev goes back. A deletion failing with gone (the entry was not
// there) counts as done.
func (m *Mirror[K, V]) Write(k K, next, prev *V, gone error, do func() error) error {
	return m.WriteAll([]Change[K, V]{{k, next, prev}}, gone, func() []error { return []error{do()} })[0]
}

// Change is one kernel change of a key from Prev to Next (nil: absent).
type Change[K comparable, V comparable] struct {
	Key        K
	Next, Prev *V
}

// WriteAll is Write for changes made together (one batch of netlink requests): do returns
// each change's outcome, in order. Keys must be distinct (a failed change puts its Prev
// back after every Next was recorded).
func (m *Mirror[K, V]) WriteAll(chs []Change[K, V], gone error, do func() []error) []error {
	for _, c := range chs {
		m.record(c.Key, c.Next)
	}
	errs := do()
	for i, c := range chs {
		if errs[i] != nil && c.Next == nil && gone != nil && errors.Is(errs[i], gone) {
			errs[i] = nil
		}
		if errs[i] != nil {
			m.record(c.Key, c.Prev)
		}
	}
	return errs
}

func (m *Mirror[K, V]) record(k K, v *V) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.m == nil {
		return
	}
	if v == nil {
		delete(m.m, k)
	} else {
		m.m[k] = *v
	}
}

// Ptr returns &v when ok, else nil: the form Write takes for an entry that may be absent.
func Ptr[V any](v V, ok bool) *V {
	if !ok {
		return nil
	}
	return &v
}

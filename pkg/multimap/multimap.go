// Package multimap is a map from a key to a few values (normally one): the agent's indexes
// by subnet or address, where a second claimant is an anomaly (a forged or stale lease).
//
// Memory: a key with one value costs one map entry, not an entry plus a slice and its
// backing array; only keys with more values pay for a slice, in a second map. With
// thousands of peers indexed by subnet, that is a slice header and an allocation less per
// subnet.
package multimap

import "slices"

// Map maps K to values of V, in the order they were added; the zero value is empty and
// ready to use.
type Map[K, V comparable] struct {
	one  map[K]V   // each key's first value
	more map[K][]V // the values after the first, for the few keys with several
}

// New returns an empty map sized for n keys.
func New[K, V comparable](n int) Map[K, V] {
	return Map[K, V]{one: make(map[K]V, n)}
}

// Add adds v to k's values (again if it is there already; see Contains).
func (m *Map[K, V]) Add(k K, v V) {
	if m.one == nil {
		m.one = map[K]V{}
	}
	if _, ok := m.one[k]; !ok {
		m.one[k] = v
		return
	}
	if m.more == nil {
		m.more = map[K][]V{}
	}
	m.more[k] = append(m.more[k], v)
}

// Remove removes the first v from k's values; the others keep their order.
func (m *Map[K, V]) Remove(k K, v V) {
	first, ok := m.one[k]
	if !ok {
		return
	}
	rest := m.more[k]
	if first == v {
		if len(rest) == 0 {
			delete(m.one, k)
			return
		}
		m.one[k], rest = rest[0], rest[1:]
	} else if i := slices.Index(rest, v); i >= 0 {
		rest = slices.Delete(slices.Clip(rest), i, i+1)
	}
	if len(rest) == 0 {
		delete(m.more, k)
	} else {
		m.more[k] = rest
	}
}

// First is k's first value; false: k has none.
func (m *Map[K, V]) First(k K) (V, bool) {
	v, ok := m.one[k]
	return v, ok
}

// Values are k's values, in the order they were added (nil: none). The slice is the
// caller's.
func (m *Map[K, V]) Values(k K) []V {
	first, ok := m.one[k]
	if !ok {
		return nil
	}
	return append([]V{first}, m.more[k]...)
}

// Each calls f with each of k's values in order, without allocating, until f returns false.
func (m *Map[K, V]) Each(k K, f func(V) bool) {
	first, ok := m.one[k]
	if !ok || !f(first) {
		return
	}
	for _, v := range m.more[k] {
		if !f(v) {
			return
		}
	}
}

// Contains reports whether v is one of k's values.
func (m *Map[K, V]) Contains(k K, v V) bool {
	found := false
	m.Each(k, func(x V) bool { found = x == v; return !found })
	return found
}

// Len is the number of keys with a value.
func (m *Map[K, V]) Len() int { return len(m.one) }

// Keys calls f with each key that has a value, in no order, until f returns false.
func (m *Map[K, V]) Keys(f func(K) bool) {
	for k := range m.one {
		if !f(k) {
			return
		}
	}
}

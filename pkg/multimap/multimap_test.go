package multimap

import (
	"math/rand/v2"
	"slices"
	"testing"
)

// TestMapMatchesSlices applies random adds and removes to a Map and to a map of slices
// (what it replaces) and checks they always agree, order included.
func TestMapMatchesSlices(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var m Map[int, string]
	want := map[int][]string{}
	for step := range 20000 {
		k, v := rng.IntN(5), string(rune('a'+rng.IntN(4)))
		if rng.IntN(2) == 0 {
			m.Add(k, v)
			want[k] = append(want[k], v)
		} else {
			m.Remove(k, v)
			if i := slices.Index(want[k], v); i >= 0 {
				want[k] = slices.Delete(want[k], i, i+1)
			}
			if len(want[k]) == 0 {
				delete(want, k)
			}
		}
		if m.Len() != len(want) {
			t.Fatalf("step %d: Len() = %d, want %d", step, m.Len(), len(want))
		}
		for k := range 5 {
			var each []string
			m.Each(k, func(v string) bool { each = append(each, v); return true })
			first, ok := m.First(k)
			if got := m.Values(k); !slices.Equal(got, want[k]) || !slices.Equal(each, want[k]) || ok != (len(want[k]) > 0) || ok && first != want[k][0] {
				t.Fatalf("step %d: key %d: Values %v, Each %v, First %q %v; want %v", step, k, got, each, first, ok, want[k])
			}
			for _, v := range []string{"a", "b", "c", "d"} {
				if m.Contains(k, v) != slices.Contains(want[k], v) {
					t.Fatalf("step %d: Contains(%d, %s) = %v, want %v", step, k, v, !slices.Contains(want[k], v), slices.Contains(want[k], v))
				}
			}
		}
	}
}

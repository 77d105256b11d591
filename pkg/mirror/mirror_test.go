package mirror

import (
	"errors"
	"maps"
	"testing"
)

var errGone = errors.New("gone")

// TestMirror applies loads, writes, notifications and invalidations in order and checks
// what the mirror holds after each.
func TestMirror(t *testing.T) {
	var m Mirror[string, int]
	one, two := 1, 2
	fail := errors.New("kernel says no")
	steps := []struct {
		name    string
		do      func() error
		want    map[string]int // nil: not valid
		wantErr error
	}{
		{"off: a load is not kept", func() error { m.Load(map[string]int{"a": 1}); return nil }, nil, nil},
		{"on: invalid until loaded", func() error { m.Enable(); return nil }, nil, nil},
		{"load", func() error { m.Load(map[string]int{"a": 1}); return nil }, map[string]int{"a": 1}, nil},
		{"write", func() error { return m.Write("b", &two, nil, errGone, func() error { return nil }) }, map[string]int{"a": 1, "b": 2}, nil},
		{"failed write puts prev back", func() error { return m.Write("a", &two, &one, errGone, func() error { return fail }) }, map[string]int{"a": 1, "b": 2}, fail},
		{"failed create leaves nothing", func() error { return m.Write("c", &one, nil, errGone, func() error { return fail }) }, map[string]int{"a": 1, "b": 2}, fail},
		{"delete of what is gone counts", func() error { return m.Write("b", nil, &two, errGone, func() error { return errGone }) }, map[string]int{"a": 1}, nil},
		{"notification", func() error {
			if changed, valid := m.Observe(func(c map[string]int) bool { c["d"] = 4; return true }); !changed || !valid {
				return errors.New("Observe did not report the change")
			}
			return nil
		}, map[string]int{"a": 1, "d": 4}, nil},
		{"invalidate", func() error { m.Invalidate(); return nil }, nil, nil},
		{"writes while invalid are not recorded", func() error { return m.Write("e", &one, nil, errGone, func() error { return nil }) }, nil, nil},
		{"notifications while invalid do not run", func() error {
			if _, valid := m.Observe(func(map[string]int) bool { t.Error("Observe ran on an invalid mirror"); return true }); valid {
				return errors.New("Observe reported valid")
			}
			return nil
		}, nil, nil},
	}
	for _, s := range steps {
		if err := s.do(); !errors.Is(err, s.wantErr) {
			t.Errorf("%s: err %v, want %v", s.name, err, s.wantErr)
		}
		got, ok := m.Snapshot()
		if ok != (s.want != nil) || !maps.Equal(got, s.want) {
			t.Errorf("%s: mirror %v (valid %t), want %v", s.name, got, ok, s.want)
		}
	}
	// A snapshot is a copy.
	m.Load(map[string]int{"a": 1})
	s, _ := m.Snapshot()
	s["x"] = 9
	if got, _ := m.Snapshot(); !maps.Equal(got, map[string]int{"a": 1}) {
		t.Errorf("changing a snapshot changed the mirror: %v", got)
	}
}

package main

import (
	"slices"
	"testing"
	"time"
)

func TestPercentile(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		var ds []time.Duration
		for _, x := range v {
			ds = append(ds, time.Duration(x)*time.Millisecond)
		}
		return ds
	}
	hundred := make([]int, 100)
	for i := range hundred {
		hundred[i] = 100 - i // reversed, so sorting matters
	}
	tests := []struct {
		name string
		ds   []time.Duration
		q    float64
		want time.Duration
	}{
		{"empty", nil, 0.5, 0},
		{"one", ms(7), 0.99, 7 * time.Millisecond},
		{"median of odd", ms(3, 1, 2), 0.5, 2 * time.Millisecond},
		{"median of even takes the lower", ms(4, 1, 3, 2), 0.5, 2 * time.Millisecond},
		{"p90 of 100", ms(hundred...), 0.9, 90 * time.Millisecond},
		{"p99 of 100", ms(hundred...), 0.99, 99 * time.Millisecond},
		{"max", ms(hundred...), 1, 100 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := percentile(tt.ds, tt.q); got != tt.want {
				t.Errorf("percentile(%v, %v) = %v, want %v", tt.ds, tt.q, got, tt.want)
			}
		})
	}
}

func TestOrderAlternates(t *testing.T) {
	a, b, c := &bareRunner{bridge: "a"}, &bareRunner{bridge: "b"}, &bareRunner{bridge: "c"}
	rs := []runner{a, b, c}
	for i, want := range [][]runner{{a, b, c}, {c, b, a}, {a, b, c}} {
		if got := order(rs, i); !slices.Equal(got, want) {
			t.Errorf("order(rs, %d) = %v, want %v", i, got, want)
		}
	}
	if rs[0] != a {
		t.Error("order changed its argument")
	}
}

func TestParseOptions(t *testing.T) {
	o, err := parseOptions([]string{"-n", "30", "-conc", "4, 16"})
	if err != nil {
		t.Fatalf("parseOptions = %v", err)
	}
	if o.n != 30 || len(o.conc) != 2 || o.conc[0] != 4 || o.conc[1] != 16 {
		t.Errorf("parseOptions = n %d conc %v, want n 30 conc [4 16]", o.n, o.conc)
	}
	for _, bad := range [][]string{{"-n", "0"}, {"-conc", "8,x"}, {"-pods", "5000"}, {"-family", "ipv6"}, {"extra"}} {
		if _, err := parseOptions(bad); err == nil {
			t.Errorf("parseOptions(%q) = nil error, want one", bad)
		}
	}
}

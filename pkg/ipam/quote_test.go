package ipam

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strconv"
	"testing"
)

// TestQuoting: the store's quoting writes what strconv.Quote writes and reads back what
// strconv.Unquote reads, for the fields the plugin writes and for any bytes at all (a
// store edited by hand, or damaged).
func TestQuoting(t *testing.T) {
	fields := []string{
		"", "eth0", "/var/run/netns/cni-1234", `{"hostVeth":"na0a2a653b007","gateway6":"fd00::1"}`,
		`back\slash`, `"`, `\`, `\\"`, "tab\there", "newline\n", "nul\x00", "del\x7f", "é utf-8", "\xff\xfe",
		"\u2028", `ends with \`,
	}
	r := rand.New(rand.NewPCG(1, 2))
	for range 2000 {
		b := make([]byte, r.IntN(12))
		for i := range b {
			const alphabet = "ab\"\\\n\x00\x7f\xc3\xa9 {}"
			b[i] = alphabet[r.IntN(len(alphabet))]
		}
		fields = append(fields, string(b))
	}
	for _, f := range fields {
		q := string(appendQuoted(nil, f))
		if want := strconv.Quote(f); q != want {
			t.Fatalf("appendQuoted(%q) = %s, want %s", f, q, want)
		}
		got, rest, err := cutQuoted(q + ` "next"`)
		if err != nil || got != f || rest != ` "next"` {
			t.Fatalf("cutQuoted(%s) = %q, %q, %v; want %q", q, got, rest, err, f)
		}
	}
	// Quoted text as a damaged or hand-edited store may hold: both decoders agree on
	// the value, or both refuse it.
	for _, q := range []string{`"a\"b"`, `"a\qb"`, `"a\x41"`, `"\u00e9"`, `"unterminated`, `"a\"`, `"a` + "\n" + `"`, `noquote`, `""`, `"\\"`, `"a"b`, "\"\xff\""} {
		for _, in := range []string{q, q + " rest"} {
			got, _, err := cutQuoted(in)
			wq, werr := strconv.QuotedPrefix(in)
			var want string
			if werr == nil {
				want, werr = strconv.Unquote(wq)
			}
			if (err == nil) != (werr == nil) || got != want {
				t.Errorf("cutQuoted(%s) = %q, %v; strconv gives %q, %v", in, got, err, want, werr)
			}
		}
	}
}

// BenchmarkUpdate is one ADD's store transaction (allocate and write back) with 60 pods
// recorded, for an IPv4-only network and a dual-stack one (BENCHMARKS.md).
func BenchmarkUpdate(b *testing.B) {
	r4, _ := NewRange(netip.MustParsePrefix("10.244.40.0/22"), netip.Addr{}, netip.Addr{}, netip.Addr{})
	r6, _ := NewRange(netip.MustParsePrefix("fd00:244:40::/64"), netip.Addr{}, netip.Addr{}, netip.Addr{})
	for _, tc := range []struct {
		name   string
		ranges []Range
		extra  string
	}{
		{"ipv4", []Range{r4}, `{"hostVeth":"na0a2a653b007","bridge":"","gateway":"10.244.40.1","prefix":22,"mtu":1500,"routed":true}`},
		{"dual", []Range{r4, r6}, `{"hostVeth":"na0a2a653b007","bridge":"","gateway":"10.244.40.1","prefix":22,"gateway6":"fd00:244:40::1","prefix6":64,"mtu":1500,"routed":true}`},
	} {
		b.Run(tc.name, func(b *testing.B) {
			s, err := Open(b.TempDir())
			if err != nil {
				b.Fatal(err)
			}
			add := func(k Key) {
				if err := s.Update(func(tx *Tx) error {
					_, err := tx.AllocateEach(tc.ranges, k, Record{Netns: "/var/run/netns/cni-0b7a6c1e-5d2f-4c1e-9a8b-3f0e2d1c4b5a", Extra: []byte(tc.extra)})
					return err
				}); err != nil {
					b.Fatal(err)
				}
			}
			for i := range 60 {
				add(Key{ContainerID: fmt.Sprintf("%064d", i), IfName: "eth0"})
			}
			k := Key{ContainerID: "bench", IfName: "eth0"}
			b.ResetTimer()
			for range b.N {
				add(k)
				b.StopTimer()
				if err := s.Update(func(tx *Tx) error { tx.Release(k); return nil }); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}

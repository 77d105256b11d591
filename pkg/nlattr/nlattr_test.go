package nlattr

import (
	"bytes"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	as := []Attr{String(1, "netagent"), Nest(2, Bytes(1, []byte{1, 2, 3}), Nest(3, String(4, "x"))), Bytes(5, nil)}
	b := Append(nil, as)
	if len(b)%4 != 0 {
		t.Fatalf("encoding of %d bytes is not padded", len(b))
	}
	got := Parse(b)
	if len(got) != 3 || got[0].Type != 1 || string(got[0].Data) != "netagent\x00" || got[1].Type != 2 || got[2].Type != 5 || len(got[2].Data) != 0 {
		t.Fatalf("Parse(Append(as)) = %+v", got)
	}
	if !Contains(b, as) {
		t.Error("Contains(Append(as), as) = false")
	}
	if Contains(b, []Attr{Nest(2, Nest(3, String(4, "y")))}) {
		t.Error("Contains found a nested value that differs")
	}
	if inner := Parse(got[1].Data); len(inner) != 2 || !bytes.Equal(inner[0].Data, []byte{1, 2, 3}) {
		t.Errorf("nested list = %+v", inner)
	}
}

// The kernel pads every attribute, but a reader of its bytes must not trust that: a final
// attribute without its padding, or with a length past the end, is read safely.
func TestParseMalformed(t *testing.T) {
	for _, tc := range []struct {
		name string
		b    []byte
		want int
	}{
		{"unpadded last attribute", []byte{5, 0, 1, 0, 'x'}, 1},
		{"length past the end", []byte{8, 0, 1, 0, 'x'}, 0},
		{"length below the header", []byte{2, 0, 1, 0}, 0},
		{"empty", nil, 0},
		{"short", []byte{4, 0}, 0},
	} {
		if got := Parse(tc.b); len(got) != tc.want {
			t.Errorf("%s: Parse() = %+v, want %d attributes", tc.name, got, tc.want)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add(Append(nil, []Attr{String(1, "a"), Nest(2, Bytes(3, []byte{9}))}))
	f.Add([]byte{5, 0, 1, 0, 'x'})
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, a := range Parse(b) {
			Parse(a.Data)
		}
		Contains(b, []Attr{Nest(2, Bytes(3, []byte{9}))})
		for _, typ := range []uint16{1, 2, 3} {
			want, wok := Get(Parse(b), typ)
			if got, ok := Find(b, typ); ok != wok || !bytes.Equal(got, want) || (got == nil) != (want == nil) {
				t.Fatalf("Find(%x, %d) = %x, %v; Get(Parse) has %x, %v", b, typ, got, ok, want, wok)
			}
		}
	})
}

package ipam

import (
	"errors"
	"fmt"
	"hash/crc32"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func allocateEach(t *testing.T, s *Store, rs []Range, id string) (Record, error) {
	t.Helper()
	var rec Record
	err := s.Update(func(tx *Tx) error {
		var err error
		rec, err = tx.AllocateEach(rs, Key{ContainerID: id, IfName: "eth0"}, Record{})
		return err
	})
	return rec, err
}

// slotGen is the generation of the newest valid slot: one per write.
func slotGen(t *testing.T, dir string) uint64 {
	t.Helper()
	var g uint64
	for i := range slotNames {
		if sl := readSlot(filepath.Join(dir, slotNames[i])); sl.err == nil && !sl.none && sl.gen > g {
			g = sl.gen
		}
	}
	return g
}

func TestAllocateDualStack(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(dir)
	r4 := mustRange(t, "10.0.0.0/29", "", "", "")  // .2-.6
	r6 := mustRange(t, "fd00:1::/125", "", "", "") // ::2-::7
	var got []string
	for i := range 3 {
		before := slotGen(t, dir)
		rec, err := allocateEach(t, s, []Range{r4, r6}, fmt.Sprint("c", i))
		if err != nil {
			t.Fatal(err)
		}
		if g := slotGen(t, dir); g != before+1 {
			t.Errorf("dual-stack Allocate wrote %d times, want once", g-before)
		}
		if rec.V4() != rec.IP || !rec.V6().Is6() || rec.IP6 != rec.V6() {
			t.Errorf("record %+v: want IP the IPv4 and IP6 the IPv6 address", rec)
		}
		got = append(got, rec.IP.String()+","+rec.IP6.String())
	}
	if want := "10.0.0.2,fd00:1::2 10.0.0.3,fd00:1::3 10.0.0.4,fd00:1::4"; strings.Join(got, " ") != want {
		t.Errorf("allocated %v, want %s", got, want)
	}
	// Repeated ADD: the same pair.
	if rec, err := allocateEach(t, s, []Range{r4, r6}, "c1"); err != nil || rec.IP.String() != "10.0.0.3" || rec.IP6.String() != "fd00:1::3" {
		t.Errorf("re-Allocate(c1) = %+v, %v", rec, err)
	}
	// Release frees both families: the next allocations wrap round to them.
	_ = s.Update(func(tx *Tx) error { tx.Release(Key{"c0", "eth0"}); return nil })
	_ = s.View(func(tx *Tx) error {
		if n4, n6 := tx.Used(r4), tx.Used(r6); n4 != 2 || n6 != 2 {
			t.Errorf("Used after release = %d, %d; want 2, 2", n4, n6)
		}
		return nil
	})
	// Exhaust IPv6 (::5-::7 left) while IPv4 still has room: the failing ADD takes neither.
	for i := 3; i < 6; i++ {
		if _, err := allocateEach(t, s, []Range{r4, r6}, fmt.Sprint("c", i)); err != nil {
			t.Fatal(err)
		}
	}
	before := slotGen(t, dir)
	if _, err := allocateEach(t, s, []Range{r4, r6}, "c6"); !errors.Is(err, ErrExhausted) {
		t.Fatalf("Allocate with IPv6 exhausted = %v, want ErrExhausted", err)
	}
	if slotGen(t, dir) != before {
		t.Error("a failed dual-stack Allocate wrote the store")
	}
	// Reopened, the store holds the same (no write went missing).
	recs, err := s.Records()
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 5 {
		t.Errorf("store holds %d records, want 5", len(recs))
	}
}

func TestAllocateEachFamilies(t *testing.T) {
	r4 := mustRange(t, "10.0.0.0/24", "", "", "")
	r6 := mustRange(t, "2001:db8:1::/64", "", "", "")
	s, _ := Open(t.TempDir())
	// IPv6 only: the address is in IP.
	rec, err := allocateEach(t, s, []Range{r6}, "v6")
	if err != nil || rec.IP.String() != "2001:db8:1::2" || rec.IP6.IsValid() || rec.V6() != rec.IP || rec.V4().IsValid() {
		t.Errorf("IPv6-only Allocate = %+v, %v", rec, err)
	}
	// IPv4 only, then the network becomes dual stack: a repeated ADD adds IPv6 and keeps IPv4.
	if _, err := allocateEach(t, s, []Range{r4}, "grow"); err != nil {
		t.Fatal(err)
	}
	rec, err = allocateEach(t, s, []Range{r6, r4}, "grow")
	if err != nil || rec.IP.String() != "10.0.0.2" || rec.IP6.String() != "2001:db8:1::3" {
		t.Errorf("growing Allocate = %+v, %v", rec, err)
	}
	// An IPv6-only record that gets IPv4 moves its IPv6 address to IP6.
	rec, err = allocateEach(t, s, []Range{r4, r6}, "v6")
	if err != nil || rec.IP.String() != "10.0.0.3" || rec.IP6.String() != "2001:db8:1::2" {
		t.Errorf("IPv6 record growing IPv4 = %+v, %v", rec, err)
	}
	if _, err := allocateEach(t, s, []Range{r4, r4}, "x"); err == nil {
		t.Error("two IPv4 ranges accepted")
	}
	if _, err := allocateEach(t, s, nil, "x"); err == nil {
		t.Error("no range accepted")
	}
}

// A store written before dual stack (the slot header and body exactly as the old code
// wrote them) loads, and a dual-stack pod is added next to its pods.
func TestOldStoreLoads(t *testing.T) {
	dir := t.TempDir()
	body := "last 10.244.1.7\n" +
		`a 10.244.1.5 "c5" "eth0" "/var/run/netns/a" "{\"hostVeth\":\"na5\",\"bridge\":\"cni0\",\"gateway\":\"10.244.1.1\",\"prefix\":24,\"mtu\":1450}"` + "\n" +
		`a 10.244.1.7 "c7" "eth0" "/var/run/netns/b" ""` + "\n"
	h := fmt.Sprintf("netagent-ipam 1 %d %d %d", 7, len(body), crc32.ChecksumIEEE([]byte(body)))
	slot := h + strings.Repeat(" ", headerLen-1-len(h)) + "\n" + body
	if err := os.WriteFile(filepath.Join(dir, "slot.b"), []byte(slot), 0o600); err != nil {
		t.Fatal(err)
	}
	s, _ := Open(dir)
	recs, err := s.Records()
	if err != nil {
		t.Fatal(err)
	}
	want := []Record{
		{Key: Key{"c5", "eth0"}, IP: netip.MustParseAddr("10.244.1.5"), Netns: "/var/run/netns/a",
			Extra: []byte(`{"hostVeth":"na5","bridge":"cni0","gateway":"10.244.1.1","prefix":24,"mtu":1450}`)},
		{Key: Key{"c7", "eth0"}, IP: netip.MustParseAddr("10.244.1.7"), Netns: "/var/run/netns/b"},
	}
	if diff := cmp.Diff(want, recs, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
		t.Errorf("old store read as (-want +got):\n%s", diff)
	}
	r4 := mustRange(t, "10.244.1.0/24", "", "", "")
	r6 := mustRange(t, "fd00:244:1::/64", "", "", "")
	rec, err := allocateEach(t, s, []Range{r4, r6}, "c8")
	if err != nil || rec.IP.String() != "10.244.1.8" || rec.IP6.String() != "fd00:244:1::2" {
		t.Errorf("dual-stack Allocate on an old store = %+v, %v; want 10.244.1.8 (after last) and fd00:244:1::2", rec, err)
	}
	if recs, _ := s.Records(); len(recs) != 3 {
		t.Errorf("store holds %d records, want 3", len(recs))
	}
}

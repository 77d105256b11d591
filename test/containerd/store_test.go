package containerd

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/netagent/netagent/pkg/ipam"
)

// TestStoreMentions pins down the leak check on IPAM stores, which must see an allocation
// in either layout (netagent's store, host-local's file per address) and must not mistake
// an allocator's cursor for one.
func TestStoreMentions(t *testing.T) {
	const id = "7ba0e8b6ec3785300a83b9ecc44c67ea7433c70117b636058c2ae39f0d112125"
	pods := []*pod{{name: "pod-0", id: id, ip: "10.244.1.2", additional: []string{"fd00:244:1::2"}}}
	rng, err := ipam.NewRange(netip.MustParsePrefix("10.244.1.0/24"), netip.Addr{}, netip.Addr{}, netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	rng6, err := ipam.NewRange(netip.MustParsePrefix("fd00:244:1::/64"), netip.Addr{}, netip.Addr{}, netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	netagentStore := func(t *testing.T, dir string, release bool, rs ...ipam.Range) {
		s, err := ipam.Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		key := ipam.Key{ContainerID: id, IfName: "eth0"}
		if err := s.Update(func(tx *ipam.Tx) error { _, err := tx.AllocateEach(rs, key, ipam.Record{}); return err }); err != nil {
			t.Fatal(err)
		}
		if release {
			_ = s.Update(func(tx *ipam.Tx) error { tx.Release(key); return nil })
		}
	}
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, dir string)
		want  []string
	}{
		{"netagent store with the allocation", func(t *testing.T, dir string) { netagentStore(t, filepath.Join(dir, "netagent"), false, rng) }, []string{id, "10.244.1.2"}},
		{"netagent store after release (cursor and old slot left)", func(t *testing.T, dir string) { netagentStore(t, filepath.Join(dir, "netagent"), true, rng) }, nil},
		{"netagent store with a dual-stack allocation", func(t *testing.T, dir string) { netagentStore(t, filepath.Join(dir, "netagent"), false, rng, rng6) },
			[]string{id, "10.244.1.2", "fd00:244:1::2"}},
		{"netagent store after a dual-stack release", func(t *testing.T, dir string) { netagentStore(t, filepath.Join(dir, "netagent"), true, rng, rng6) }, nil},
		{"host-local allocation", func(t *testing.T, dir string) {
			write(t, dir, map[string]string{"10.244.1.2": id + "\r\neth0", "last_reserved_ip.0": "10.244.1.2", "lock": ""})
		}, []string{id, "10.244.1.2"}},
		{"host-local dual-stack allocation", func(t *testing.T, dir string) {
			write(t, dir, map[string]string{"10.244.1.2": id + "\r\neth0", "fd00:244:1::2": id + "\r\neth0", "last_reserved_ip.0": "10.244.1.2", "last_reserved_ip.1": "fd00:244:1::2", "lock": ""})
		}, []string{id, "10.244.1.2", "fd00:244:1::2"}},
		{"host-local with only the cursor left", func(t *testing.T, dir string) {
			write(t, dir, map[string]string{"last_reserved_ip.0": "10.244.1.2", "lock": ""})
		}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			tc.setup(t, dir)
			if got := storeMentions(t, dir, pods); !slices.Equal(got, tc.want) {
				t.Errorf("storeMentions = %q, want %q", got, tc.want)
			}
		})
	}
	t.Run("missing store", func(t *testing.T) {
		if got := storeMentions(t, filepath.Join(t.TempDir(), "absent"), pods); len(got) != 0 {
			t.Errorf("storeMentions(absent dir) = %q, want none", got)
		}
	})
}

func write(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

package containerd

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// TestStoreMentions pins down the leak check on IPAM stores, which must see an allocation
// in either layout (netagent's one JSON file, host-local's file per address) and must not
// mistake an allocator's cursor or a longer address for one.
func TestStoreMentions(t *testing.T) {
	const id = "7ba0e8b6ec3785300a83b9ecc44c67ea7433c70117b636058c2ae39f0d112125"
	pods := []*pod{{name: "pod-0", id: id, ip: "10.244.1.2"}}
	for _, tc := range []struct {
		name  string
		files map[string]string
		want  []string
	}{
		{
			name:  "netagent state with the allocation",
			files: map[string]string{"state.json": `{"version":1,"last":"10.244.1.2","allocations":[{"id":"` + id + `","if":"eth0","ip":"10.244.1.2"}]}`},
			want:  []string{id, "10.244.1.2"},
		},
		{
			name:  "netagent state with only the cursor left",
			files: map[string]string{"state.json": `{"version":1,"last":"10.244.1.2","allocations":[]}`, "lock": ""},
		},
		{
			name:  "address without owner in a nested value",
			files: map[string]string{"state.json": `{"version":1,"allocations":[{"ip":"10.244.1.2"}]}`},
			want:  []string{"10.244.1.2"},
		},
		{
			name:  "a longer address is not the pod's",
			files: map[string]string{"state.json": `{"version":1,"allocations":[{"id":"other","ip":"10.244.1.23"}]}`},
		},
		{
			name:  "host-local allocation",
			files: map[string]string{"10.244.1.2": id + "\r\neth0", "last_reserved_ip.0": "10.244.1.2", "lock": ""},
			want:  []string{id, "10.244.1.2"},
		},
		{
			name:  "host-local with only the cursor left",
			files: map[string]string{"last_reserved_ip.0": "10.244.1.2", "lock": ""},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			for name, data := range tc.files {
				if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			if got := storeMentions(t, dir, pods); !slices.Equal(got, tc.want) {
				t.Errorf("storeMentions(%v) = %q, want %q", tc.files, got, tc.want)
			}
		})
	}
	t.Run("missing store", func(t *testing.T) {
		if got := storeMentions(t, filepath.Join(t.TempDir(), "absent"), pods); len(got) != 0 {
			t.Errorf("storeMentions(absent dir) = %q, want none", got)
		}
	})
}

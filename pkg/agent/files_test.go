package agent

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/ipam"
	"github.com/netagent/netagent/pkg/subnetfile"
)

func TestWatchFiles(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.conf"), filepath.Join(dir, "sub", "b.env")
	if err := os.MkdirAll(filepath.Dir(b), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{a, b} {
		if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ch := make(chan struct{}, 1)
	go watchFiles(t.Context(), slog.Default(), []string{a, b}, ch)
	time.Sleep(50 * time.Millisecond)
	expect := func(what string, want bool) {
		t.Helper()
		select {
		case <-ch:
			if !want {
				t.Fatalf("%s: signalled", what)
			}
		case <-time.After(300 * time.Millisecond):
			if want {
				t.Fatalf("%s: no signal", what)
			}
		}
	}
	for _, c := range []struct {
		what string
		do   func() error
		want bool
	}{
		{"other file written", func() error { return os.WriteFile(filepath.Join(dir, "other"), []byte("y"), 0o644) }, false},
		{"a removed", func() error { return os.Remove(a) }, true},
		{"a created", func() error { return os.WriteFile(a, []byte("z"), 0o644) }, true},
		{"b overwritten", func() error { return os.WriteFile(b, []byte("z"), 0o644) }, true},
		{"b renamed over", func() error {
			tmp := b + ".tmp"
			if err := os.WriteFile(tmp, []byte("w"), 0o644); err != nil {
				return err
			}
			return os.Rename(tmp, b)
		}, true},
	} {
		if err := c.do(); err != nil {
			t.Fatal(err)
		}
		expect(c.what, c.want)
		// Drain what one operation may signal twice (write + close, or tmp + rename).
		time.Sleep(20 * time.Millisecond)
		select {
		case <-ch:
		default:
		}
	}
}

// TestSharedFileNoFight: two agents given the same subnet file used to repair it after
// each other's writes forever (each write wakes the other's watch). Each now stops after a
// few repairs and reports the other writer.
func TestSharedFileNoFight(t *testing.T) {
	path := filepath.Join(t.TempDir(), "subnet.env")
	var writes atomic.Int64
	errs := make(chan error, 2)
	var kick []chan struct{}
	for i, subnet := range []string{"10.244.1.0/24", "10.244.2.0/24"} {
		info := subnetfile.Info{Network: netip.MustParsePrefix("10.244.0.0/16"), Subnet: netip.MustParsePrefix(subnet), MTU: 1450}
		a := &Agent{files: []file{{path: path, data: info.Marshal()}}}
		if i == 0 {
			if err := a.ensureFiles(); err != nil {
				t.Fatal(err)
			}
		}
		ch := make(chan struct{}, 1)
		go watchFiles(t.Context(), slog.Default(), []string{path}, ch)
		go func() {
			for {
				select {
				case <-t.Context().Done():
					return
				case <-ch:
					writes.Add(1)
					if err := a.ensureFiles(); err != nil {
						errs <- err
					}
				}
			}
		}()
		kick = append(kick, ch)
	}
	time.Sleep(50 * time.Millisecond) // both watches armed
	for _, ch := range kick {
		signal(ch)
	}
	var got []error
	for len(got) < 1 {
		select {
		case err := <-errs:
			got = append(got, err)
		case <-time.After(5 * time.Second):
			t.Fatalf("no agent reported the other writer after %d repairs", writes.Load())
		}
	}
	time.Sleep(500 * time.Millisecond)
	before := writes.Load()
	time.Sleep(500 * time.Millisecond)
	if after := writes.Load(); after != before {
		t.Errorf("still fighting over the file: %d wake-ups in 500ms", after-before)
	}
	if !strings.Contains(got[0].Error(), "another writer (it wrote subnet 10.244.") {
		t.Errorf("error = %v, want it to name the other writer's subnet", got[0])
	}
}

// The conflist feeds the plugin each family: dual-stack adds the node's ipv6Subnet beside
// the subnet file; IPv6-only has ipv6Subnet and the MTU and no subnet file to read.
func TestConfListFamilies(t *testing.T) {
	s6 := netip.MustParsePrefix("fd00:0:0:7::/64")
	for _, tc := range []struct {
		name       string
		subnetFile string
		subnet6    netip.Prefix
		want       map[string]any
	}{
		{"ipv4", "/run/netagent/subnet.env", netip.Prefix{}, map[string]any{"subnetFile": "/run/netagent/subnet.env"}},
		{"dual", "/run/netagent/subnet.env", s6, map[string]any{"subnetFile": "/run/netagent/subnet.env", "ipv6Subnet": "fd00:0:0:7::/64"}},
		{"ipv6", "", s6, map[string]any{"ipv6Subnet": "fd00:0:0:7::/64", "mtu": float64(1430)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var list struct {
				Plugins []map[string]any `json:"plugins"`
			}
			if err := json.Unmarshal(confList(CNIConf{}, tc.subnetFile, tc.subnet6, 1430), &list); err != nil || len(list.Plugins) != 1 {
				t.Fatalf("conflist: %v", err)
			}
			got := list.Plugins[0]
			for _, k := range []string{"subnetFile", "ipv6Subnet", "mtu"} {
				if got[k] != tc.want[k] {
					t.Errorf("%s = %v, want %v", k, got[k], tc.want[k])
				}
			}
		})
	}
}

// auto is routed on a node without bridged pods and bridge on one with some; an explicit
// choice is kept, with a warning when the node's pods are of the other kind.
func TestResolvePodInterface(t *testing.T) {
	rng, err := ipam.NewRange(netip.MustParsePrefix("10.244.1.0/24"), netip.Addr{}, netip.Addr{}, netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	store := func(t *testing.T, bridged, routed int) string {
		dir := t.TempDir()
		s, err := ipam.Open(filepath.Join(dir, "netagent"))
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Update(func(tx *ipam.Tx) error {
			for i := range bridged + routed {
				rec := ipam.Record{}
				if i >= bridged {
					rec.Extra = json.RawMessage(`{"hostVeth":"x","routed":true}`)
				}
				if _, err := tx.Allocate(rng, ipam.Key{ContainerID: fmt.Sprint("c", i), IfName: "eth0"}, rec); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	for _, tc := range []struct {
		asked           string
		bridged, routed int
		want            string
		warn            bool
	}{
		{"auto", 0, 0, "routed", false},
		{"auto", 0, 3, "routed", false},
		{"auto", 2, 0, "bridge", false},
		{"auto", 2, 1, "bridge", true},
		{"routed", 2, 0, "routed", true},
		{"routed", 0, 2, "routed", false},
		{"bridge", 0, 2, "bridge", true},
		{"bridge", 0, 0, "bridge", false},
	} {
		t.Run(fmt.Sprintf("%s,%d-bridged,%d-routed", tc.asked, tc.bridged, tc.routed), func(t *testing.T) {
			got, why, warn, err := resolvePodInterface(tc.asked, store(t, tc.bridged, tc.routed))
			if err != nil || got != tc.want || warn != tc.warn || why == "" {
				t.Errorf("resolvePodInterface = %q (%q), warn %v, %v; want %q, warn %v", got, why, warn, err, tc.want, tc.warn)
			}
		})
	}
	// A node that never had a pod: no data directory at all.
	if got, _, _, err := resolvePodInterface("auto", filepath.Join(t.TempDir(), "none")); err != nil || got != "routed" {
		t.Errorf("no data dir: %q, %v; want routed", got, err)
	}
}

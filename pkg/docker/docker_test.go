package docker

import (
	"encoding/json"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/netagent/netagent/test/netns"
)

func TestWriteConfigMergesAndIsIdempotent(t *testing.T) {
	p := filepath.Join(t.TempDir(), "daemon.json")
	if err := os.WriteFile(p, []byte(`{"log-driver":"journald","bip":"172.17.0.1/16"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	subnet := netip.MustParsePrefix("10.244.7.0/24")
	changed, err := WriteConfig(p, subnet, 1450)
	if err != nil || !changed {
		t.Fatalf("WriteConfig = %v, %v; want a change", changed, err)
	}
	var got map[string]any
	b, _ := os.ReadFile(p)
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if got["bip"] != "10.244.7.1/24" || got["mtu"] != float64(1450) || got["log-driver"] != "journald" {
		t.Errorf("daemon.json = %s", b)
	}
	if changed, err := WriteConfig(p, subnet, 1450); err != nil || changed {
		t.Errorf("second WriteConfig = %v, %v; want no change", changed, err)
	}
	if err := os.WriteFile(p, []byte(`[1,2]`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := WriteConfig(p, subnet, 1450); err == nil || !strings.Contains(err.Error(), "not a JSON object") {
		t.Errorf("WriteConfig on a JSON array = %v", err)
	}
}

func TestCheckBridge(t *testing.T) {
	netns.RequireRoot(t)
	n := netns.New(t, "docker")
	h, err := n.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	subnet := netip.MustParsePrefix("10.244.7.0/24")
	if err := CheckBridge(h, "docker0", subnet); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Errorf("no bridge: %v", err)
	}
	n.MustRun(t, "ip", "link", "add", "docker0", "type", "bridge")
	n.MustRun(t, "ip", "addr", "add", "172.17.0.1/16", "dev", "docker0")
	if err := CheckBridge(h, "docker0", subnet); err == nil || !strings.Contains(err.Error(), "--bip=10.244.7.1/24") {
		t.Errorf("wrong subnet: %v", err)
	}
	n.MustRun(t, "ip", "addr", "add", "10.244.7.1/24", "dev", "docker0")
	if err := CheckBridge(h, "docker0", subnet); err != nil {
		t.Errorf("right subnet: %v", err)
	}
}

func TestFlagConflicts(t *testing.T) {
	proc := t.TempDir()
	for pid, args := range map[string][]string{
		"10": {"/usr/sbin/dockerd", "--bip=10.1.0.1/24", "-H", "fd://"},                // default config file
		"11": {"dockerd", "--config-file", "/etc/other.json", "--mtu", "1400"},         // another file
		"12": {"/usr/bin/dockerd", "--config-file=/etc/docker/daemon.json", "--mtu=1"}, // ours, by flag
		"13": {"/usr/bin/containerd", "--bip=x"},                                       // not dockerd
		"14": {"dockerd", "--data-root", "/var/lib/docker"},                            // no conflict
	} {
		if err := os.MkdirAll(filepath.Join(proc, pid), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(proc, pid, "cmdline"), []byte(strings.Join(args, "\x00")+"\x00"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		cfg  string
		want []string
	}{
		{DefaultConfig, []string{"pid 10: --bip", "pid 12: --mtu"}},
		{"/etc/other.json", []string{"pid 11: --mtu"}},
		{"/elsewhere.json", nil},
	} {
		got := FlagConflicts(proc, tc.cfg)
		slices.Sort(got)
		if !slices.Equal(got, tc.want) {
			t.Errorf("FlagConflicts(%s) = %q, want %q", tc.cfg, got, tc.want)
		}
	}
}

// TestClientErrors: a missing socket is named as such (not as a Docker problem), and the
// Engine's own error text is passed on.
func TestClientErrors(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.sock")
	err := NewClient(missing).EnsureNetwork(t.Context(), "podnet", netip.MustParsePrefix("10.244.7.0/24"), 1450)
	if err == nil || !strings.Contains(err.Error(), "dockerd is not listening on "+missing) {
		t.Errorf("missing socket: %v", err)
	}
	sock := filepath.Join(dir, "docker.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			http.NotFound(w, r)
			return
		}
		w.WriteHeader(http.StatusForbidden)
		_, _ = w.Write([]byte(`{"message":"Pool overlaps with other one on this address space"}`))
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	err = NewClient(sock).EnsureNetwork(t.Context(), "podnet", netip.MustParsePrefix("10.244.7.0/24"), 1450)
	if err == nil || !strings.Contains(err.Error(), "Pool overlaps") {
		t.Errorf("create refused: %v", err)
	}
}

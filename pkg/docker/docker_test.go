package docker

import (
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
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

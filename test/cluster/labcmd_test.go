package cluster_test

import (
	"encoding/xml"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

// TestLabCommand runs `netagent lab` as a newcomer would: up, check, status, then down
// after the lab's state file is lost (as after a crash), which must still remove it all.
func TestLabCommand(t *testing.T) {
	netns.RequireRoot(t)
	bin := testbin.Build(t, "./cmd/netagent", "netagent")
	testbin.Build(t, "./cmd/netagent-etcd", "netagent-etcd")
	testbin.Build(t, "./cmd/cni-plugin", "netagent-cni")
	dir := t.TempDir()
	prefix := fmt.Sprintf("%s%d-labcmd-", netns.Prefix, os.Getpid())
	run := func(args ...string) (string, error) {
		args = append(args, "--dir", dir, "--prefix", prefix)
		out, err := exec.Command(bin, args...).CombinedOutput()
		return string(out), err
	}
	t.Cleanup(func() { _, _ = run("lab", "down") })
	out, err := run("lab", "up", "--nodes", "3", "--backend", "hybrid", "--pods-per-node", "1")
	if err != nil {
		t.Fatalf("lab up: %v\n%s", err, out)
	}
	for _, want := range []string{"agents ready on 3 nodes", "from\\to", "outside", "PEER", "direct", "vxlan", "Poke at it by hand"} {
		if !strings.Contains(out, want) {
			t.Errorf("lab up output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "FAIL") {
		t.Errorf("lab up matrix has failures:\n%s", out)
	}
	if out, err := run("lab", "check"); err != nil || strings.Contains(out, "FAIL") {
		t.Errorf("lab check: %v\n%s", err, out)
	}
	pic := filepath.Join(t.TempDir(), "lab.svg")
	if out, err := run("lab", "status", "--picture", pic); err != nil || strings.Count(out, "ready yes") != 3 {
		t.Errorf("lab status: %v\n%s", err, out)
	}
	svg, err := os.ReadFile(pic)
	if err != nil {
		t.Fatal(err)
	}
	if err := xml.Unmarshal(svg, new(struct{ XMLName xml.Name })); err != nil {
		t.Errorf("the picture is not well-formed SVG: %v", err)
	}
	for _, want := range []string{"node1", "node3", "198.51.100.10", "stroke-dasharray", "switch 192.0.2.0/24", "router"} {
		if !strings.Contains(string(svg), want) {
			t.Errorf("picture lacks %q", want)
		}
	}
	if out, err := run("lab", "up"); err == nil || !strings.Contains(out, "already up") {
		t.Errorf("second lab up = %v, %s; want 'already up'", err, out)
	}
	if err := os.Remove(filepath.Join(dir, "lab.json")); err != nil {
		t.Fatal(err)
	}
	if out, err := run("lab", "down"); err != nil {
		t.Fatalf("lab down: %v\n%s", err, out)
	}
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			t.Errorf("namespace %s left after lab down", e.Name())
		}
	}
	if out, _ := exec.Command("pgrep", "-f", dir).Output(); len(out) > 0 {
		t.Errorf("processes left after lab down: %s", out)
	}
}

// TestLabDockerScenario: `netagent lab up --scenario docker` brings up Docker hosts on
// their leases with containers, and the matrix between containers passes.
func TestLabDockerScenario(t *testing.T) {
	netns.RequireRoot(t)
	if _, err := exec.LookPath("dockerd"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("dockerd is missing (scripts/deps.sh installs docker.io)")
		}
		t.Skip("no dockerd")
	}
	bin := testbin.Build(t, "./cmd/netagent", "netagent")
	testbin.Build(t, "./cmd/netagent-etcd", "netagent-etcd")
	testbin.Build(t, "./cmd/cni-plugin", "netagent-cni")
	dir := t.TempDir()
	prefix := fmt.Sprintf("%s%d-labdk-", netns.Prefix, os.Getpid())
	run := func(args ...string) (string, error) {
		out, err := exec.Command(bin, append(args, "--dir", dir, "--prefix", prefix)...).CombinedOutput()
		return string(out), err
	}
	t.Cleanup(func() { _, _ = run("lab", "down") })
	out, err := run("lab", "up", "--scenario", "docker", "--nodes", "2", "--backend", "host-gw", "--pods-per-node", "1")
	if err != nil {
		t.Fatalf("lab up --scenario docker: %v\n%s", err, out)
	}
	if !strings.Contains(out, "dockerd on 2 hosts") || !strings.Contains(out, "node1-c1") || strings.Contains(out, "FAIL") {
		t.Errorf("lab up --scenario docker output:\n%s", out)
	}
	if out, err := run("lab", "down"); err != nil {
		t.Fatalf("lab down: %v\n%s", err, out)
	}
	if out, _ := exec.Command("pgrep", "-f", dir).Output(); len(out) > 0 {
		t.Errorf("processes left: %s", out)
	}
}

// TestLabUpFailureKeepsLogs: when `lab up` fails (here: etcd cannot start, its binary is
// missing) it fails fast, shows the log's tail, and keeps the logs it points to.
func TestLabUpFailureKeepsLogs(t *testing.T) {
	netns.RequireRoot(t)
	bin := testbin.Build(t, "./cmd/netagent", "netagent")
	cni := testbin.Build(t, "./cmd/cni-plugin", "netagent-cni")
	alone := t.TempDir() // netagent and netagent-cni, without netagent-etcd
	for _, f := range []string{bin, cni} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(alone, filepath.Base(f)), b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	dir := filepath.Join(t.TempDir(), "lab")
	prefix := fmt.Sprintf("%s%d-labfail-", netns.Prefix, os.Getpid())
	start := time.Now()
	out, err := exec.Command(filepath.Join(alone, "netagent"), "lab", "up", "--dir", dir, "--prefix", prefix, "--nodes", "1", "--pods-per-node", "0").CombinedOutput()
	t.Cleanup(func() { _ = exec.Command(bin, "lab", "down", "--dir", dir, "--prefix", prefix).Run() })
	if err == nil {
		t.Fatalf("lab up without netagent-etcd succeeded:\n%s", out)
	}
	if took := time.Since(start); took > 30*time.Second {
		t.Errorf("lab up took %s to notice that etcd exited", took)
	}
	for _, want := range []string{"etcd exited", "netagent-etcd not found", "logs are kept: " + filepath.Join(dir, "etcd.log")} {
		if !strings.Contains(string(out), want) {
			t.Errorf("lab up output lacks %q:\n%s", want, out)
		}
	}
	if b, err := os.ReadFile(filepath.Join(dir, "etcd.log")); err != nil || !strings.Contains(string(b), "netagent-etcd not found") {
		t.Errorf("etcd.log after the failure: %v %q", err, b)
	}
}

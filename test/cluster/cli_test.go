package cluster_test

import (
	"bytes"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

// TestConfigSetUnreachableEtcd: the error names the endpoint that did not answer, not
// only "context deadline exceeded".
func TestConfigSetUnreachableEtcd(t *testing.T) {
	bin := testbin.Build(t, "./cmd/netagent", "netagent")
	ep := "unix://" + filepath.Join(t.TempDir(), "none.sock:2379")
	out, err := exec.Command(bin, "config", "set", "--network", "10.244.0.0/16", "--etcd-endpoints", ep).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "etcd at "+ep+" did not answer within 10s") {
		t.Errorf("config set against nothing: %v\n%s", err, out)
	}
}

// TestConfigSetZeroVNIPort: --vni 0 and --port 0 are rejected, not replaced by the
// defaults (checked before etcd is asked).
func TestConfigSetZeroVNIPort(t *testing.T) {
	bin := testbin.Build(t, "./cmd/netagent", "netagent")
	ep := "unix://" + filepath.Join(t.TempDir(), "none.sock:2379")
	for _, flag := range []string{"--vni", "--port"} {
		out, err := exec.Command(bin, "config", "set", "--network", "10.244.0.0/16", flag, "0", "--etcd-endpoints", ep).CombinedOutput()
		if want := "backend" + strings.Replace(flag, "--", ".", 1) + ": 0 is out of range"; err == nil || !strings.Contains(string(out), want) {
			t.Errorf("config set %s 0: %v\n%s\nwant %q", flag, err, out, want)
		}
	}
}

// TestStopWhileWaitingForConfig: SIGTERM while the agent waits for a network config is a
// clean stop (exit 0), not an error.
func TestStopWhileWaitingForConfig(t *testing.T) {
	netns.RequireRoot(t)
	bin := testbin.Build(t, "./cmd/netagent", "netagent")
	n := netns.New(t, "sigterm")
	n.MustRun(t, "ip", "link", "add", "eth0", "type", "bridge")
	n.MustRun(t, "ip", "addr", "add", "192.0.2.1/24", "dev", "eth0")
	n.MustRun(t, "ip", "link", "set", "eth0", "up")
	dir := t.TempDir()
	cmd := n.Command(t.Context(), bin, "run", "--node-name", "n1", "--iface", "eth0", "--listen", "",
		"--subnet-file", filepath.Join(dir, "subnet.env"), "--cni-conf-dir", "",
		"--etcd-endpoints", "unix://"+filepath.Join(dir, "none.sock:2379"))
	stderr := &syncBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	waitUntil(t, 20*time.Second, "the agent started", func() bool {
		return strings.Contains(stderr.String(), "msg=underlay")
	})
	time.Sleep(500 * time.Millisecond) // now waiting for the config from an etcd that is not there
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-done:
		if err != nil || strings.Contains(stderr.String(), "context canceled") {
			t.Errorf("SIGTERM while waiting for the config: %v\n%s", err, stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the agent did not stop on SIGTERM")
	}
}

// syncBuffer is a bytes.Buffer a child process writes while the test reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

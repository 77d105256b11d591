package agent

import (
	"bytes"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/test/netns"
)

// fakeDocker serves the two Engine API calls EnsureNetwork makes on a unix socket: the
// network is never there, and creating it fails with "Pool overlaps" while refuse is set.
func fakeDocker(t *testing.T, refuse *atomic.Bool) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "docker.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodGet:
			http.NotFound(w, r)
		case refuse.Load():
			w.WriteHeader(http.StatusForbidden)
			_, _ = w.Write([]byte(`{"message":"Pool overlaps with other one on this address space"}`))
		default:
			w.WriteHeader(http.StatusCreated)
		}
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return sock
}

// TestDockerPass: Docker failures are retried with a growing backoff and logged once per
// distinct failure; "Pool overlaps" names the device that holds the lease; a missing
// socket says so; recovery is logged and clears the error.
func TestDockerPass(t *testing.T) {
	netns.RequireRoot(t)
	n := netns.New(t, "dock")
	n.MustRun(t, "ip", "link", "add", "docker0", "type", "bridge")
	n.MustRun(t, "ip", "addr", "add", "10.244.7.1/24", "dev", "docker0")
	h, err := n.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	var refuse atomic.Bool
	refuse.Store(true)
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	self := lease.Lease{Node: "n1", Subnet: netip.MustParsePrefix("10.244.7.0/24")}
	p := plan.Plan{PodMTU: 1450, NAT: plan.NAT{Network: netip.MustParsePrefix("10.244.0.0/16")}}
	newAgent := func(sock string) *Agent {
		return &Agent{h: h,
			opt: Options{Docker: &DockerMode{Network: "podnet", Socket: sock}, Metrics: NewMetrics()}}
	}

	a := newAgent(fakeDocker(t, &refuse))
	var retries []time.Duration
	for range 7 {
		if a.dockerPass(t.Context(), log, self, p) {
			t.Fatal("dockerPass succeeded while Docker refuses the network")
		}
		retries = append(retries, a.opt.Docker.retry)
	}
	want := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second, 30 * time.Second, 30 * time.Second}
	if !slices.Equal(retries, want) {
		t.Errorf("retries = %v, want %v", retries, want)
	}
	if c := strings.Count(logs.String(), "level=WARN"); c != 1 {
		t.Errorf("%d warnings for one repeated failure, want 1:\n%s", c, logs.String())
	}
	if msg := a.status.Errors["docker"]; !strings.Contains(msg, "the leased 10.244.7.0/24 is already on docker0 (10.244.7.1/24)") || !strings.Contains(msg, "remove bip from daemon.json") {
		t.Errorf("error = %q, want it to name docker0 and what to do", msg)
	}
	refuse.Store(false)
	if !a.dockerPass(t.Context(), log, self, p) {
		t.Fatalf("dockerPass failed once Docker accepts: %v", a.status.Errors["docker"])
	}
	if a.opt.Docker.retry != 0 || a.status.Errors["docker"] != "" || !strings.Contains(logs.String(), "docker uses the leased subnet") {
		t.Errorf("recovery: retry %s, error %q, log:\n%s", a.opt.Docker.retry, a.status.Errors["docker"], logs.String())
	}

	logs.Reset()
	a = newAgent(filepath.Join(t.TempDir(), "none.sock"))
	a.dockerPass(t.Context(), log, self, p)
	if !strings.Contains(logs.String(), "dockerd is not listening on") {
		t.Errorf("missing socket logged as:\n%s", logs.String())
	}

	// An IPv6-only cluster: Docker cannot use it, and the error says what to change.
	a = newAgent(fakeDocker(t, &refuse))
	only6 := lease.Lease{Node: "n1", Subnet6: netip.MustParsePrefix("fd00:10:244:7::/64")}
	if a.dockerPass(t.Context(), log, only6, p) {
		t.Fatal("dockerPass succeeded for an IPv6-only lease")
	}
	if msg := a.status.Errors["docker"]; !strings.Contains(msg, "IPv6-only") || !strings.Contains(msg, `"network" beside "ipv6Network"`) {
		t.Errorf("IPv6-only error = %q", msg)
	}
}

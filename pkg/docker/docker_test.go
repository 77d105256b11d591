package docker

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/test/netns"
)

func TestWriteConfigMergesAndIsIdempotent(t *testing.T) {
	p := filepath.Join(t.TempDir(), "daemon.json")
	if err := os.WriteFile(p, []byte(`{"log-driver":"journald","bip":"172.17.0.1/16"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	subnet := Subnets{V4: netip.MustParsePrefix("10.244.7.0/24")}
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

// TestWriteConfigIPv6: a dual-stack host's daemon.json gets ipv6 and fixed-cidr-v6 too; an
// IPv4-only lease leaves the admin's own IPv6 keys alone.
func TestWriteConfigIPv6(t *testing.T) {
	p := filepath.Join(t.TempDir(), "daemon.json")
	if err := os.WriteFile(p, []byte(`{"ipv6":true,"fixed-cidr-v6":"2001:db8:1::/64"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	read := func() map[string]any {
		var got map[string]any
		b, _ := os.ReadFile(p)
		if err := json.Unmarshal(b, &got); err != nil {
			t.Fatal(err)
		}
		return got
	}
	v4 := Subnets{V4: netip.MustParsePrefix("10.244.7.0/24")}
	if _, err := WriteConfig(p, v4, 1450); err != nil {
		t.Fatal(err)
	}
	if got := read(); got["fixed-cidr-v6"] != "2001:db8:1::/64" || got["ipv6"] != true {
		t.Errorf("IPv4-only lease changed the admin's IPv6 keys: %v", got)
	}
	dual := Subnets{V4: v4.V4, V6: netip.MustParsePrefix("fd00:10:244:7::/64")}
	for i, want := range []bool{true, false} {
		changed, err := WriteConfig(p, dual, 1450)
		if err != nil || changed != want {
			t.Fatalf("dual WriteConfig #%d = %v, %v; want changed=%v", i+1, changed, err, want)
		}
	}
	if got := read(); got["fixed-cidr-v6"] != "fd00:10:244:7::/64" || got["ipv6"] != true || got["bip"] != "10.244.7.1/24" {
		t.Errorf("daemon.json = %v", got)
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
	subnet := Subnets{V4: netip.MustParsePrefix("10.244.7.0/24")}
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
	// Dual stack: the IPv6 gateway must be there too (Docker's fe80::1 does not count).
	subnet.V6 = netip.MustParsePrefix("fd00:10:244:7::/64")
	n.MustRun(t, "ip", "addr", "add", "fe80::1/64", "dev", "docker0")
	if err := CheckBridge(h, "docker0", subnet); err == nil || !strings.Contains(err.Error(), "--fixed-cidr-v6=fd00:10:244:7::/64") {
		t.Errorf("no IPv6 gateway: %v", err)
	}
	n.MustRun(t, "ip", "addr", "add", "fd00:10:244:7::1/64", "dev", "docker0", "nodad")
	if err := CheckBridge(h, "docker0", subnet); err != nil {
		t.Errorf("both subnets: %v", err)
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
	err := NewClient(missing).EnsureNetwork(t.Context(), "podnet", Subnets{V4: netip.MustParsePrefix("10.244.7.0/24")}, 1450)
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
	err = NewClient(sock).EnsureNetwork(t.Context(), "podnet", Subnets{V4: netip.MustParsePrefix("10.244.7.0/24")}, 1450)
	if err == nil || !strings.Contains(err.Error(), "Pool overlaps") {
		t.Errorf("create refused: %v", err)
	}
}

// TestEnsureNetworkDualStack: a dual-stack host's network is created with IPv6 enabled and
// both pools; an existing network missing the IPv6 pool is reported, not used.
func TestEnsureNetworkDualStack(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "docker.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var created []network
	existing := map[string]network{}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			n, ok := existing[strings.TrimPrefix(r.URL.Path, "/networks/")]
			if !ok {
				http.NotFound(w, r)
				return
			}
			_ = json.NewEncoder(w).Encode(n)
			return
		}
		var n network
		if err := json.NewDecoder(r.Body).Decode(&n); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		created = append(created, n)
		w.WriteHeader(http.StatusCreated)
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })

	dual := Subnets{V4: netip.MustParsePrefix("10.244.7.0/24"), V6: netip.MustParsePrefix("fd00:10:244:7::/64")}
	c := NewClient(sock)
	if err := c.EnsureNetwork(t.Context(), "podnet", dual, 1450); err != nil {
		t.Fatal(err)
	}
	want := []pool{{"10.244.7.0/24", "10.244.7.1"}, {"fd00:10:244:7::/64", "fd00:10:244:7::1"}}
	if len(created) != 1 || !created[0].EnableIPv6 || !slices.Equal(created[0].IPAM.Config, want) {
		t.Fatalf("created %+v, want IPv6 enabled and pools %v", created, want)
	}
	old := network{Name: "old"}
	old.IPAM.Config = want[:1]
	existing["old"] = old
	if err := c.EnsureNetwork(t.Context(), "old", dual, 1450); err == nil || !strings.Contains(err.Error(), "docker network rm old") {
		t.Errorf("IPv4-only network for a dual-stack lease: %v", err)
	}
	existing["both"] = created[0]
	if err := c.EnsureNetwork(t.Context(), "both", dual, 1450); err != nil || len(created) != 1 {
		t.Errorf("existing dual-stack network: %v (creates: %d)", err, len(created))
	}
}

// TestSkipDAD: the addresses Docker gives its bridge stay tentative until the bridge's
// first carrier and then for a second or two; SkipDAD adds each again without DAD, keeps
// its prefix and connected route, leaves a usable address alone, and the addresses stay
// usable when the bridge loses its carrier and gets it back (the next container).
func TestSkipDAD(t *testing.T) {
	netns.RequireRoot(t)
	n := netns.New(t, "dad")
	h, err := n.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	skip := func() ([]netip.Prefix, error) {
		var done []netip.Prefix
		err := n.Do(func() (err error) { done, err = SkipDAD(h, "docker0"); return err })
		return done, err
	}
	if _, err := skip(); err == nil {
		t.Error("SkipDAD on a missing bridge: no error")
	}
	// The bridge and its future container's port, without a carrier yet: the kernel adds
	// the bridge's own link-local at the first carrier.
	n.MustRun(t, "ip", "link", "add", "docker0", "type", "bridge")
	n.MustRun(t, "ip", "link", "add", "vc", "type", "veth", "peer", "name", "vc-peer")
	n.MustRun(t, "ip", "link", "set", "vc", "master", "docker0", "up")
	n.MustRun(t, "ip", "link", "set", "docker0", "up")
	for _, a := range []string{"fd00:10:244:7::1/64", "fe80::1/64"} {
		n.MustRun(t, "ip", "addr", "add", a, "dev", "docker0")
	}
	n.MustRun(t, "ip", "addr", "add", "fd00:10:244:8::1/64", "dev", "docker0", "nodad")
	tentative := func() []string {
		out := n.MustRun(t, "ip", "-6", "-o", "addr", "show", "dev", "docker0", "tentative")
		var addrs []string
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			if f := strings.Fields(l); len(f) > 3 {
				addrs = append(addrs, f[3])
			}
		}
		slices.Sort(addrs)
		return addrs
	}
	// No carrier yet: DAD waits, as on a Docker host before its first container.
	if got := tentative(); !slices.Contains(got, "fd00:10:244:7::1/64") || !slices.Contains(got, "fe80::1/64") {
		t.Fatalf("tentative before = %v, want Docker's two addresses", got)
	}
	done, err := skip()
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(done, netip.Prefix.Compare)
	got := fmt.Sprint(done)
	if !strings.Contains(got, "fd00:10:244:7::1/64") || !strings.Contains(got, "fe80::1/64") || strings.Contains(got, "fd00:10:244:8::1/64") {
		t.Errorf("re-added %s, want Docker's tentative ones only", got)
	}
	if left := tentative(); len(left) > 0 {
		t.Errorf("still tentative: %v", left)
	}
	if r := n.MustRun(t, "ip", "-6", "route", "show", "fd00:10:244:7::/64"); !strings.Contains(r, "docker0") {
		t.Errorf("connected route of the gateway gone: %q", r)
	}
	if again, err := skip(); err != nil || len(again) > 0 {
		t.Errorf("second SkipDAD = %v, %v; want nothing to do", again, err)
	}
	// A container comes (the first carrier: the kernel adds the bridge's own link-local),
	// goes and comes again: nothing on the bridge is tentative.
	for _, state := range []string{"up", "down", "up"} {
		n.MustRun(t, "ip", "link", "set", "vc-peer", state)
		for start := time.Now(); ; time.Sleep(5 * time.Millisecond) {
			ll := n.MustRun(t, "ip", "-6", "addr", "show", "dev", "docker0", "scope", "link")
			if strings.Count(ll, "inet6") >= 2 {
				break
			}
			if time.Since(start) > 2*time.Second {
				t.Fatalf("the kernel's own link-local missing 2 s after the carrier: %s", ll)
			}
		}
		if left := tentative(); len(left) > 0 {
			t.Errorf("tentative after the container's link went %s: %v", state, left)
		}
	}
}

package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/embedetcd"
	"github.com/netagent/netagent/pkg/lease"
)

func startEtcd(t *testing.T) *clientv3.Client {
	t.Helper()
	srv, err := embedetcd.Start(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{srv.Endpoint}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func testConfig(t *testing.T, js string) config.Network {
	t.Helper()
	n, err := config.Parse([]byte(js))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func self(node, ip string) lease.Lease {
	return lease.Lease{Node: node, PublicIP: netip.MustParseAddr(ip), Backend: "vxlan", VTEPMAC: "0e:00:00:00:00:01"}
}

func TestAcquireKeepsSubnetAcrossRestartAndExpiry(t *testing.T) {
	cli := startEtcd(t)
	ctx := context.Background()
	s := New(cli, "/netagent", 2*time.Second, quiet())
	cfg := testConfig(t, `{"network":"10.244.0.0/16"}`)
	h1, err := s.Acquire(ctx, cfg, self("n1", "192.0.2.1"), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.Contains(h1.Lease.Subnet) {
		t.Fatalf("got %s outside the config", h1.Lease.Subnet)
	}
	// A restart (new process, no local hint) gets the same subnet back while the lease lives.
	h2, err := s.Acquire(ctx, cfg, self("n1", "192.0.2.1"), netip.Prefix{})
	if err != nil || h2.Lease.Subnet != h1.Lease.Subnet {
		t.Fatalf("restart got %v, %v; want %s", h2.Lease.Subnet, err, h1.Lease.Subnet)
	}
	// Let the lease expire (no keepalive): the owner record still brings n1 back to it,
	// and another node does not take it meanwhile.
	if _, err := cli.Revoke(ctx, clientv3.LeaseID(h2.Token)); err != nil {
		t.Fatal(err)
	}
	other, err := s.Acquire(ctx, cfg, self("n2", "192.0.2.2"), netip.Prefix{})
	if err != nil || other.Lease.Subnet == h1.Lease.Subnet {
		t.Fatalf("n2 got %v, %v; must not take n1's remembered subnet", other.Lease.Subnet, err)
	}
	h3, err := s.Acquire(ctx, cfg, self("n1", "192.0.2.1"), netip.Prefix{})
	if err != nil || h3.Lease.Subnet != h1.Lease.Subnet {
		t.Fatalf("after expiry n1 got %v, %v; want %s", h3.Lease.Subnet, err, h1.Lease.Subnet)
	}
	// Leave releases it for good.
	if err := s.Release(ctx, "n1", h3.Lease.Subnet); err != nil {
		t.Fatal(err)
	}
	st, err := s.state(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := st.leases[s.key("subnets", lease.SubnetKey(h3.Lease.Subnet))]; ok || len(st.owners["n1"]) > 0 {
		t.Errorf("after Release: leases=%v owners=%v", st.leases, st.owners)
	}
}

func TestReservation(t *testing.T) {
	cli := startEtcd(t)
	ctx := context.Background()
	s := New(cli, "/netagent", 10*time.Second, quiet())
	cfg := testConfig(t, `{"network":"10.244.0.0/16"}`)
	want := netip.MustParsePrefix("10.244.77.0/24")
	if err := s.SetConfig(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	if err := s.Reserve(ctx, "n1", want, false); err != nil {
		t.Fatal(err)
	}
	for i := range 20 { // nobody else gets it
		h, err := s.Acquire(ctx, cfg, self(fmt.Sprint("x", i), "192.0.2.9"), netip.Prefix{})
		if err != nil || h.Lease.Subnet == want {
			t.Fatalf("x%d got %v, %v", i, h.Lease.Subnet, err)
		}
	}
	h, err := s.Acquire(ctx, cfg, self("n1", "192.0.2.1"), netip.Prefix{})
	if err != nil || h.Lease.Subnet != want {
		t.Fatalf("n1 got %v, %v; want its reservation %s", h.Lease.Subnet, err, want)
	}
}

func TestRacingAgentsGetDistinctSubnets(t *testing.T) {
	cli := startEtcd(t)
	ctx := context.Background()
	cfg := testConfig(t, `{"network":"10.244.0.0/20","subnetLen":26}`) // 63 subnets
	var wg sync.WaitGroup
	var mu sync.Mutex
	got := map[netip.Prefix]string{}
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := New(cli, "/netagent", 30*time.Second, quiet())
			node := fmt.Sprint("node", i)
			h, err := s.Acquire(ctx, cfg, self(node, "192.0.2.9"), netip.Prefix{})
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				t.Error(err)
				return
			}
			if prev, dup := got[h.Lease.Subnet]; dup {
				t.Errorf("%s given to %s and %s", h.Lease.Subnet, prev, node)
			}
			got[h.Lease.Subnet] = node
		}()
	}
	wg.Wait()
	if len(got) != 40 {
		t.Errorf("%d distinct subnets, want 40", len(got))
	}
}

type countRestarts struct {
	mu sync.Mutex
	n  int
}

func (c *countRestarts) WatchRestart(string) { c.mu.Lock(); c.n++; c.mu.Unlock() }

func TestWatchSeesJoinAndLeave(t *testing.T) {
	cli := startEtcd(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := New(cli, "/netagent", 30*time.Second, quiet())
	cfg := testConfig(t, `{"network":"10.244.0.0/16"}`)
	peers := lease.NewPeers()
	changed := make(chan struct{}, 1)
	go s.Watch(ctx, peers, changed, &countRestarts{})
	waitLen := func(n int) {
		t.Helper()
		deadline := time.After(5 * time.Second)
		for peers.Len() != n {
			select {
			case <-changed:
			case <-deadline:
				t.Fatalf("peers = %d, want %d", peers.Len(), n)
			}
		}
	}
	h, err := s.Acquire(ctx, cfg, self("n1", "192.0.2.1"), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	waitLen(1)
	if _, err := s.Acquire(ctx, cfg, self("n2", "192.0.2.2"), netip.Prefix{}); err != nil {
		t.Fatal(err)
	}
	waitLen(2)
	if err := s.Release(ctx, "n1", h.Lease.Subnet); err != nil {
		t.Fatal(err)
	}
	waitLen(1)
	if got := peers.Snapshot()[0].Node; got != "n2" {
		t.Errorf("remaining peer %s, want n2", got)
	}
}

// Reserve refuses conflicts and a silent renumbering of a node, atomically.
func TestReserveRefuses(t *testing.T) {
	cli := startEtcd(t)
	ctx := context.Background()
	s := New(cli, "/netagent", 10*time.Second, quiet())
	cfg := testConfig(t, `{"network":"10.244.0.0/16"}`)
	if err := s.SetConfig(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	// Their subnets given as hints: a random one could be one the cases below reserve
	// (10.244.200-203.0/24), failing them for the wrong reason.
	live, err := s.Acquire(ctx, cfg, self("live", "192.0.2.1"), netip.MustParsePrefix("10.244.1.0/24"))
	if err != nil || live.Lease.Subnet != netip.MustParsePrefix("10.244.1.0/24") {
		t.Fatalf("live: %v, %v", live.Lease.Subnet, err)
	}
	gone, err := s.Acquire(ctx, cfg, self("gone", "192.0.2.2"), netip.MustParsePrefix("10.244.2.0/24"))
	if err != nil || gone.Lease.Subnet != netip.MustParsePrefix("10.244.2.0/24") {
		t.Fatalf("gone: %v, %v", gone.Lease.Subnet, err)
	}
	if _, err := cli.Revoke(ctx, clientv3.LeaseID(gone.Token)); err != nil { // down: only its owner record is left
		t.Fatal(err)
	}
	if err := s.Reserve(ctx, "pinned", netip.MustParsePrefix("10.244.200.0/24"), false); err != nil {
		t.Fatal(err)
	}
	free := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, 201, 0}), 24)
	tests := []struct {
		name, node string
		subnet     netip.Prefix
		force      bool
		want       error
		wantText   string
	}{
		{"another node's live subnet", "new", live.Lease.Subnet, false, lease.ErrConflict, "live lease of node live"},
		{"another node's live subnet, forced", "new", live.Lease.Subnet, true, lease.ErrConflict, "live lease of node live"},
		{"a down node's remembered subnet", "new", gone.Lease.Subnet, false, lease.ErrConflict, "last held by"},
		{"another node's reservation", "new", netip.MustParsePrefix("10.244.200.0/24"), false, lease.ErrConflict, "reserved for node pinned"},
		{"outside the network", "new", netip.MustParsePrefix("10.99.1.0/24"), false, nil, "not a /24 subnet"},
		{"wrong length", "new", netip.MustParsePrefix("10.244.201.0/25"), false, nil, "not a /24 subnet"},
		{"invalid node name", "a/b", free, false, nil, "invalid node name"},
		{"moves a live node", "live", free, false, ErrRenumber, "pods keep addresses"},
		{"moves a down node", "gone", free, false, ErrRenumber, "pods keep addresses"},
		{"pins a live node where it is", "live", live.Lease.Subnet, false, nil, ""},
		{"a new node", "new", free, false, nil, ""},
		{"the same subnet for a second node", "new2", free, false, lease.ErrConflict, "reserved for node new"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := s.Reserve(ctx, tt.node, tt.subnet, tt.force)
			if (tt.wantText == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.wantText)) || (tt.want != nil && !errors.Is(err, tt.want)) {
				t.Fatalf("Reserve(%s, %s, force=%v) = %v, want %v %q", tt.node, tt.subnet, tt.force, err, tt.want, tt.wantText)
			}
		})
	}
	// Forced: the live node gets the new subnet at its next start (its pods keep the old
	// addresses: what --force documents).
	moved := netip.MustParsePrefix("10.244.202.0/24")
	if err := s.Reserve(ctx, "live", moved, true); err != nil {
		t.Fatalf("forced: %v", err)
	}
	if _, err := cli.Revoke(ctx, clientv3.LeaseID(live.Token)); err != nil {
		t.Fatal(err)
	}
	if h, err := s.Acquire(ctx, cfg, self("live", "192.0.2.1"), netip.Prefix{}); err != nil || h.Lease.Subnet != moved {
		t.Fatalf("after the forced reservation the node got %v, %v; want %s", h.Lease.Subnet, err, moved)
	}
	// Racing reservations of one subnet for two nodes: exactly one wins.
	race := netip.MustParsePrefix("10.244.203.0/24")
	errs := make(chan error, 2)
	for _, n := range []string{"r1", "r2"} {
		go func() { errs <- New(cli, "/netagent", 10*time.Second, quiet()).Reserve(ctx, n, race, false) }()
	}
	e1, e2 := <-errs, <-errs
	if (e1 == nil) == (e2 == nil) {
		t.Errorf("racing reservations: %v and %v; want exactly one to succeed", e1, e2)
	}
}

// Two hosts with one node name: the second is refused with an error naming the first,
// also when both start at once; a restart of the same host (same public IP) adopts.
func TestAcquireRefusesADuplicateNodeName(t *testing.T) {
	cli := startEtcd(t)
	ctx := context.Background()
	cfg := testConfig(t, `{"network":"10.244.0.0/16"}`)
	s := New(cli, "/netagent", 30*time.Second, quiet())
	for round := range 5 { // at once: exactly one wins
		node := fmt.Sprint("twin", round)
		errs := make(chan error, 2)
		for _, ip := range []string{"192.0.2.1", "192.0.2.2"} {
			go func() {
				_, err := New(cli, "/netagent", 30*time.Second, quiet()).Acquire(ctx, cfg, self(node, ip), netip.Prefix{})
				errs <- err
			}()
		}
		e1, e2 := <-errs, <-errs
		if (e1 == nil) == (e2 == nil) {
			t.Fatalf("round %d: %v and %v; want exactly one to succeed", round, e1, e2)
		}
		if err := errors.Join(e1, e2); !errors.Is(err, lease.ErrIdentity) || !strings.Contains(err.Error(), "--node-name") {
			t.Errorf("round %d: refused with %v, want lease.ErrIdentity naming the fix", round, err)
		}
	}
	h, err := s.Acquire(ctx, cfg, self("n1", "192.0.2.1"), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Acquire(ctx, cfg, self("n1", "192.0.2.2"), netip.Prefix{}); !errors.Is(err, lease.ErrIdentity) || !strings.Contains(err.Error(), "192.0.2.1") {
		t.Errorf("second host: %v, want lease.ErrIdentity naming 192.0.2.1", err)
	}
	restarted := self("n1", "192.0.2.1")
	restarted.Instance = "second-run"
	h2, err := s.Acquire(ctx, cfg, restarted, netip.Prefix{})
	if err != nil || h2.Lease.Subnet != h.Lease.Subnet {
		t.Fatalf("restart of the same host: %v, %v; want %s adopted", h2.Lease.Subnet, err, h.Lease.Subnet)
	}
	// The first run, still alive somewhere, does not take the lease back.
	if _, err := s.Renew(ctx, h); !errors.Is(err, lease.ErrIdentity) {
		t.Errorf("Renew of a lease another run rewrote: %v, want ErrIdentity", err)
	}
	if _, err := s.Renew(ctx, h2); err != nil {
		t.Errorf("Renew of our own lease: %v", err)
	}
}

// TestEtcdOutageBoundedAndNoticed: while etcd is down every call returns an error within
// its bound instead of waiting for the connection, the health watch reports it, and once
// etcd is back (after long enough for gRPC's default reconnect backoff to have grown past
// 10 s) the health watch reports it within a few seconds and a re-claim succeeds.
func TestEtcdOutageBoundedAndNoticed(t *testing.T) {
	dir := t.TempDir()
	srv, err := embedetcd.Start(dir)
	if err != nil {
		t.Fatal(err)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{srv.Endpoint}, DialTimeout: 5 * time.Second, DialOptions: DialOptions(5 * time.Second), Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	s := New(cli, "/netagent", 30*time.Second, quiet())
	ctx := context.Background()
	cfg := testConfig(t, `{"network":"10.244.0.0/16"}`)
	if err := s.SetConfig(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	h, err := s.Acquire(ctx, cfg, self("n1", "192.0.2.1"), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	type report struct {
		at  time.Time
		err error
	}
	reports := make(chan report, 100)
	hctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go s.WatchHealth(hctx, func(err error) { reports <- report{time.Now(), err} })
	waitReport := func(up bool, within time.Duration) time.Time {
		t.Helper()
		deadline := time.After(within)
		for {
			select {
			case r := <-reports:
				if (r.err == nil) == up {
					return r.at
				}
			case <-deadline:
				t.Fatalf("health: no %v report within %s", map[bool]string{true: "up", false: "down"}[up], within)
			}
		}
	}
	waitReport(true, 5*time.Second)

	srv.Close()
	down := time.Now()
	waitReport(false, 10*time.Second)
	for name, call := range map[string]func() error{
		"Config": func() error { _, _, err := s.Config(ctx); return err },
		"Renew":  func() error { _, err := s.Renew(ctx, h); return err },
	} {
		t0 := time.Now()
		if err := call(); err == nil {
			t.Errorf("%s with etcd down: no error", name)
		}
		if d := time.Since(t0); d > claimTimeout+2*time.Second {
			t.Errorf("%s with etcd down took %s, want at most its bound", name, d)
		}
	}
	time.Sleep(time.Until(down.Add(17 * time.Second)))
	if srv, err = embedetcd.Start(dir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	back := time.Now()
	up := waitReport(true, 10*time.Second)
	t.Logf("etcd back after a %s outage; the health watch saw it after %s", back.Sub(down).Round(time.Second), up.Sub(back).Round(time.Millisecond))
	if d := up.Sub(back); d > 3*time.Second {
		t.Errorf("health watch saw etcd back after %s, want within 3s", d)
	}
	if _, err := s.Renew(ctx, h); err != nil {
		t.Errorf("re-claim with etcd back: %v", err)
	}
}

// The watch's first list reuses what Acquire decoded for the keys unchanged since, and
// decodes what changed in between: a lease put, changed or deleted between Acquire's list
// and the watch's is seen as the store has it, and one put after the watch's list arrives
// as an event. (The reuse is seen by a decoded value planted in what Acquire kept: it
// shows up in the view, so that key was not decoded again.)
func TestWatchReusesAcquireListing(t *testing.T) {
	cli := startEtcd(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := New(cli, "/netagent", 30*time.Second, quiet())
	cfg := testConfig(t, `{"network":"10.244.0.0/16"}`)
	put := func(node, subnet, ip string) string {
		t.Helper()
		l := self(node, ip)
		l.Subnet = netip.MustParsePrefix(subnet)
		k := s.key("subnets", lease.SubnetKey(l.Subnet))
		if _, err := cli.Put(ctx, k, string(l.Encode())); err != nil {
			t.Fatal(err)
		}
		return k
	}
	keyA := put("a", "10.244.2.0/24", "192.0.2.2")
	keyB := put("b", "10.244.3.0/24", "192.0.2.3")
	keyC := put("c", "10.244.4.0/24", "192.0.2.4")
	if _, err := s.Acquire(ctx, cfg, self("n1", "192.0.2.1"), netip.Prefix{}); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	kept := s.claimed
	if len(kept) != 3 || kept[keyA].err != nil || kept[keyB].err != nil || kept[keyC].err != nil {
		t.Fatalf("Acquire kept %v, want a, b and c decoded", kept)
	}
	planted := kept[keyC]
	planted.l.PublicIP = netip.MustParseAddr("192.0.2.99")
	kept[keyC] = planted
	s.mu.Unlock()

	// Between Acquire's list and the watch's: a changed, b gone, d new.
	put("a", "10.244.2.0/24", "192.0.2.22")
	if _, err := cli.Delete(ctx, keyB); err != nil {
		t.Fatal(err)
	}
	put("d", "10.244.5.0/24", "192.0.2.5")

	peers := lease.NewPeers()
	changed := make(chan struct{}, 1)
	go s.Watch(ctx, peers, changed, &countRestarts{})
	view := func() map[string]string {
		out := map[string]string{}
		for _, l := range peers.Snapshot() {
			out[l.Node] = l.PublicIP.String()
		}
		return out
	}
	wait := func(want map[string]string) {
		t.Helper()
		deadline := time.After(5 * time.Second)
		for {
			select {
			case <-changed:
				if got := view(); maps.Equal(got, want) {
					return
				}
			case <-deadline:
				t.Fatalf("peers %v, want %v", view(), want)
			}
		}
	}
	wait(map[string]string{"n1": "192.0.2.1", "a": "192.0.2.22", "c": "192.0.2.99", "d": "192.0.2.5"})
	s.mu.Lock()
	left := s.claimed
	s.mu.Unlock()
	if left != nil {
		t.Errorf("after the watch's list Acquire's leases are still kept: %v", left)
	}
	put("e", "10.244.6.0/24", "192.0.2.6")
	wait(map[string]string{"n1": "192.0.2.1", "a": "192.0.2.22", "c": "192.0.2.99", "d": "192.0.2.5", "e": "192.0.2.6"})

	// With the watch running, an Acquire keeps nothing (no list would take it).
	if _, err := s.Acquire(ctx, cfg, self("n2", "192.0.2.7"), netip.Prefix{}); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.claimed != nil {
		t.Errorf("an Acquire during the watch kept %d leases", len(s.claimed))
	}
}

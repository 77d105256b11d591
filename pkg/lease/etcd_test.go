package lease

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/embedetcd"
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

func self(node, ip string) Lease {
	return Lease{Node: node, PublicIP: netip.MustParseAddr(ip), Backend: "vxlan", VTEPMAC: "0e:00:00:00:00:01"}
}

func TestAcquireKeepsSubnetAcrossRestartAndExpiry(t *testing.T) {
	cli := startEtcd(t)
	ctx := context.Background()
	s := NewEtcd(cli, "/netagent", 2*time.Second, quiet())
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
	if _, err := cli.Revoke(ctx, h2.ID); err != nil {
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
	taken, owners, _, err := s.state(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := taken[h3.Lease.Subnet]; ok || owners["n1"].IsValid() {
		t.Errorf("after Release: taken=%v owners=%v", taken, owners)
	}
}

func TestReservation(t *testing.T) {
	cli := startEtcd(t)
	ctx := context.Background()
	s := NewEtcd(cli, "/netagent", 10*time.Second, quiet())
	cfg := testConfig(t, `{"network":"10.244.0.0/16"}`)
	want := netip.MustParsePrefix("10.244.77.0/24")
	if err := s.Reserve(ctx, "n1", want); err != nil {
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
			s := NewEtcd(cli, "/netagent", 30*time.Second, quiet())
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
	s := NewEtcd(cli, "/netagent", 30*time.Second, quiet())
	cfg := testConfig(t, `{"network":"10.244.0.0/16"}`)
	peers := NewPeers()
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
	s := NewEtcd(cli, "/netagent", 30*time.Second, quiet())
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

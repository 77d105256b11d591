package etcdstore

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/netagent/netagent/pkg/lease"
)

func self6(node, ip, ip6 string) lease.Lease {
	l := self(node, "192.0.2.1")
	l.PublicIP, _ = netip.ParseAddr(ip) // "": no IPv4 underlay
	l.PublicIP6 = netip.MustParseAddr(ip6)
	return l
}

// keys lists the store's keys under prefix with their values.
func keys(t *testing.T, cli *clientv3.Client, prefix string) map[string]string {
	t.Helper()
	resp, err := cli.Get(context.Background(), prefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, kv := range resp.Kvs {
		out[string(kv.Key)] = string(kv.Value)
	}
	return out
}

// A dual-stack node leases one subnet per family in one transaction, gets both back after a
// restart and after an outage longer than its TTL, and leave releases both.
func TestAcquireDualStack(t *testing.T) {
	cli := startEtcd(t)
	ctx := context.Background()
	s := New(cli, "/netagent", 2*time.Second, quiet())
	cfg := testConfig(t, `{"network":"10.244.0.0/16","ipv6Network":"fd00:10:244::/48"}`)
	h1, err := s.Acquire(ctx, cfg, self6("n1", "192.0.2.1", "2001:db8::1"), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	l := h1.Lease
	if !cfg.Contains(l.Subnet) || !cfg.Contains(l.Subnet6) || l.Subnet6.Bits() != 64 {
		t.Fatalf("Acquire() = %s, %s; want a /24 and a /64 of the config", l.Subnet, l.Subnet6)
	}
	k4 := "/netagent/subnets/" + lease.SubnetKey(l.Subnet)
	k6 := "/netagent/subnets6/" + lease.SubnetKey(l.Subnet6)
	got := keys(t, cli, "/netagent/")
	if v, err := lease.DecodeKey(k4, []byte(got[k4])); err != nil || v.Subnet6 != l.Subnet6 || v.PublicIP6 != l.PublicIP6 {
		t.Errorf("lease at %s = %+v, %v; want it to carry %s and 2001:db8::1", k4, v, err, l.Subnet6)
	}
	if got[k6] != "n1" || got["/netagent/owners/n1"] != l.Subnet.String()+","+l.Subnet6.String() {
		t.Errorf("store = %v; want %s = n1 and the owner record naming both subnets", got, k6)
	}
	other, err := s.Acquire(ctx, cfg, self6("n2", "192.0.2.2", "2001:db8::2"), netip.Prefix{})
	if err != nil || other.Lease.Subnet6 == l.Subnet6 || other.Lease.Subnet == l.Subnet {
		t.Fatalf("n2 got %s %s, %v; want subnets other than n1's", other.Lease.Subnet, other.Lease.Subnet6, err)
	}
	// Restart: the same subnets.
	h2, err := s.Acquire(ctx, cfg, self6("n1", "192.0.2.1", "2001:db8::1"), netip.Prefix{})
	if err != nil || h2.Lease.Subnet != l.Subnet || h2.Lease.Subnet6 != l.Subnet6 {
		t.Fatalf("after restart n1 got %s %s, %v; want %s %s", h2.Lease.Subnet, h2.Lease.Subnet6, err, l.Subnet, l.Subnet6)
	}
	// Outage longer than the TTL: both keys expire, the owner record brings both back, and
	// a newcomer meanwhile takes neither.
	time.Sleep(3 * time.Second)
	if _, ok := keys(t, cli, "/netagent/subnets6/")[k6]; ok {
		t.Fatalf("%s outlived its etcd lease", k6)
	}
	late, err := s.Acquire(ctx, cfg, self6("n3", "192.0.2.3", "2001:db8::3"), netip.Prefix{})
	if err != nil || late.Lease.Subnet6 == l.Subnet6 || late.Lease.Subnet == l.Subnet {
		t.Fatalf("n3 got %s %s, %v; want neither of n1's remembered subnets", late.Lease.Subnet, late.Lease.Subnet6, err)
	}
	h3, err := s.Acquire(ctx, cfg, self6("n1", "192.0.2.1", "2001:db8::1"), netip.Prefix{})
	if err != nil || h3.Lease.Subnet != l.Subnet || h3.Lease.Subnet6 != l.Subnet6 {
		t.Fatalf("after expiry n1 got %s %s, %v; want %s %s", h3.Lease.Subnet, h3.Lease.Subnet6, err, l.Subnet, l.Subnet6)
	}
	released, err := s.Leave(ctx, "n1")
	if err != nil || !slices.Equal(released, []netip.Prefix{l.Subnet, l.Subnet6}) {
		t.Fatalf("Leave() = %v, %v; want %s and %s", released, err, l.Subnet, l.Subnet6)
	}
	for k := range keys(t, cli, "/netagent/") {
		if strings.Contains(k, "n1") || k == k4 || k == k6 {
			t.Errorf("after leave %s is still there", k)
		}
	}
	// Renew after the etcd lease was lost keeps both.
	h4, err := s.Acquire(ctx, cfg, self6("n4", "192.0.2.4", "2001:db8::4"), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Revoke(ctx, clientv3.LeaseID(h4.Token)); err != nil {
		t.Fatal(err)
	}
	h5, err := s.Renew(ctx, h4)
	if err != nil || h5.Lease.Subnet6 != h4.Lease.Subnet6 || keys(t, cli, "/netagent/subnets6/")["/netagent/subnets6/"+lease.SubnetKey(h4.Lease.Subnet6)] != "n4" {
		t.Errorf("Renew() = %+v, %v; want %s claimed again", h5.Lease, err, h4.Lease.Subnet6)
	}
}

// An IPv6-only node's lease lives under its IPv6 subnet's key, with no IPv4 fields.
func TestAcquireIPv6Only(t *testing.T) {
	cli := startEtcd(t)
	ctx := context.Background()
	s := New(cli, "/netagent", 10*time.Second, quiet())
	cfg := testConfig(t, `{"ipv6Network":"fd00:10:244::/48","ipv6SubnetLen":80}`)
	h, err := s.Acquire(ctx, cfg, self6("n1", "", "2001:db8::1"), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	if h.Lease.Subnet.IsValid() || !cfg.Contains(h.Lease.Subnet6) || h.Lease.Subnet6.Bits() != 80 {
		t.Fatalf("Acquire() = %s, %s; want only an IPv6 /80", h.Lease.Subnet, h.Lease.Subnet6)
	}
	got := keys(t, cli, "/netagent/")
	k := "/netagent/subnets/" + lease.SubnetKey(h.Lease.Subnet6)
	if _, err := lease.DecodeKey(k, []byte(got[k])); err != nil || len(keys(t, cli, "/netagent/subnets6/")) != 0 {
		t.Errorf("store = %v, %v; want the lease at %s and no separate IPv6 claim", got, err, k)
	}
	again, err := s.Acquire(ctx, cfg, self6("n1", "", "2001:db8::1"), netip.Prefix{})
	if err != nil || again.Lease.Subnet6 != h.Lease.Subnet6 {
		t.Errorf("after restart: %s, %v; want %s", again.Lease.Subnet6, err, h.Lease.Subnet6)
	}
	// Another host under the same name (its IPv6 underlay address differs) is refused.
	if _, err := s.Acquire(ctx, cfg, self6("n1", "", "2001:db8::99"), netip.Prefix{}); err == nil || !strings.Contains(err.Error(), "2001:db8::1") {
		t.Errorf("a second host named n1: %v, want an identity conflict naming 2001:db8::1", err)
	}
}

// An IPv4 cluster turned dual-stack: a node keeps its IPv4 subnet (the key layout and owner
// record of before) and gains an IPv6 one.
func TestAcquireUpgradesToDualStack(t *testing.T) {
	cli := startEtcd(t)
	ctx := context.Background()
	s := New(cli, "/netagent", 10*time.Second, quiet())
	v4 := testConfig(t, `{"network":"10.244.0.0/16"}`)
	h, err := s.Acquire(ctx, v4, self("n1", "192.0.2.1"), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	if got := keys(t, cli, "/netagent/owners/")["/netagent/owners/n1"]; got != h.Lease.Subnet.String() {
		t.Fatalf("IPv4-only owner record = %q, want %q (the layout of before)", got, h.Lease.Subnet)
	}
	dual := testConfig(t, `{"network":"10.244.0.0/16","ipv6Network":"fd00::/48"}`)
	h2, err := s.Acquire(ctx, dual, self6("n1", "192.0.2.1", "2001:db8::1"), netip.Prefix{})
	if err != nil || h2.Lease.Subnet != h.Lease.Subnet || !dual.Contains(h2.Lease.Subnet6) {
		t.Fatalf("after the upgrade: %s %s, %v; want %s and an IPv6 subnet", h2.Lease.Subnet, h2.Lease.Subnet6, err, h.Lease.Subnet)
	}
}

// Agents racing for a small IPv6 pool get distinct subnets of both families.
func TestRacingAgentsGetDistinctSubnets6(t *testing.T) {
	cli := startEtcd(t)
	ctx := context.Background()
	cfg := testConfig(t, `{"network":"10.244.0.0/16","ipv6Network":"fd00::/120","ipv6SubnetLen":126}`) // 63 IPv6 subnets
	var wg sync.WaitGroup
	var mu sync.Mutex
	got := map[netip.Prefix]string{}
	for i := range 30 {
		wg.Go(func() {
			s := New(cli, "/netagent", 30*time.Second, quiet())
			node := fmt.Sprint("node", i)
			h, err := s.Acquire(ctx, cfg, self6(node, "192.0.2.9", fmt.Sprintf("2001:db8::%x", i+1)), netip.Prefix{})
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				t.Error(err)
				return
			}
			for _, sub := range h.Lease.Subnets() {
				if prev, dup := got[sub]; dup {
					t.Errorf("%s given to %s and %s", sub, prev, node)
				}
				got[sub] = node
			}
		})
	}
	wg.Wait()
	if len(got) != 60 {
		t.Errorf("%d distinct subnets, want 60", len(got))
	}
}

// Reservations are per family: an IPv6 reservation keeps the node's IPv4 one, refuses an
// IPv6 subnet another node holds, and both are honoured.
func TestReserve6(t *testing.T) {
	cli := startEtcd(t)
	ctx := context.Background()
	s := New(cli, "/netagent", 10*time.Second, quiet())
	cfg := testConfig(t, `{"network":"10.244.0.0/16","ipv6Network":"fd00::/48"}`)
	if err := s.SetConfig(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	other, err := s.Acquire(ctx, cfg, self6("other", "192.0.2.2", "2001:db8::2"), netip.Prefix{})
	if err != nil {
		t.Fatal(err)
	}
	want4, want6 := netip.MustParsePrefix("10.244.77.0/24"), netip.MustParsePrefix("fd00:0:0:77::/64")
	for _, p := range []netip.Prefix{want4, want6} {
		if err := s.Reserve(ctx, "n1", p, false); err != nil {
			t.Fatalf("Reserve(%s) = %v", p, err)
		}
	}
	if err := s.Reserve(ctx, "n2", other.Lease.Subnet6, false); err == nil || !strings.Contains(err.Error(), "other") {
		t.Errorf("Reserve(other's IPv6 subnet) = %v, want a conflict naming node other", err)
	}
	if err := s.Reserve(ctx, "n2", netip.MustParsePrefix("fd00:1::/64"), false); err == nil || !strings.Contains(err.Error(), "ipv6Network") && !strings.Contains(err.Error(), "IPv6 network") {
		t.Errorf("Reserve(outside the IPv6 network) = %v, want refused", err)
	}
	h, err := s.Acquire(ctx, cfg, self6("n1", "192.0.2.1", "2001:db8::1"), netip.Prefix{})
	if err != nil || h.Lease.Subnet != want4 || h.Lease.Subnet6 != want6 {
		t.Fatalf("n1 got %s %s, %v; want its reservations %s %s", h.Lease.Subnet, h.Lease.Subnet6, err, want4, want6)
	}
}

// Forged leases in the store (a v6 subnet outside the network, of the wrong family,
// overlapping a live node's) reach the peer view but are never used.
func TestWatchRejectsForgedLeases6(t *testing.T) {
	cli := startEtcd(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := New(cli, "/netagent", 30*time.Second, quiet())
	cfg := testConfig(t, `{"network":"10.244.0.0/16","ipv6Network":"fd00::/48"}`)
	// The hint keeps the victim's key apart from the forged ones (a forged Put on its own
	// key would replace its lease rather than compete with it).
	victim, err := s.Acquire(ctx, cfg, self6("victim", "192.0.2.1", "2001:db8::1"), netip.MustParsePrefix("10.244.1.0/24"))
	if err != nil {
		t.Fatal(err)
	}
	if victim.Lease.Subnet != netip.MustParsePrefix("10.244.1.0/24") {
		t.Fatalf("victim got %s, want its hint 10.244.1.0/24", victim.Lease.Subnet)
	}
	peers := lease.NewPeersWith(lease.Rules{Network: cfg.Network, SubnetLen: 24, Network6: cfg.IPv6Network, SubnetLen6: 64, Self: "me"})
	changed := make(chan struct{}, 1)
	go s.Watch(ctx, peers, changed, &countRestarts{})
	forged := map[string]string{ // key subnet -> lease value
		"10.244.201.0-24":  fmt.Sprintf(`{"node":"evil1","subnet":"10.244.201.0/24","subnet6":%q,"publicIP":"192.0.2.66"}`, victim.Lease.Subnet6),
		"10.244.202.0-24":  `{"node":"evil2","subnet":"10.244.202.0/24","subnet6":"fd99::/64","publicIP":"192.0.2.67"}`,
		"10.244.203.0-24":  `{"node":"evil3","subnet":"10.244.203.0/24","subnet6":"10.244.204.0/24","publicIP":"192.0.2.68"}`,
		"10.244.205.0-24":  fmt.Sprintf(`{"node":"evil4","subnet":"10.244.205.0/24","subnet6":"%s/80","publicIP":"192.0.2.69"}`, victim.Lease.Subnet6.Addr()),
		"fd00:0:0:99::-64": `{"node":"evil5","subnet6":"fd00:0:0:99::/64","publicIP":"2001:db8::5"}`,
	}
	for k, v := range forged {
		if _, err := cli.Put(ctx, "/netagent/subnets/"+k, v); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.After(5 * time.Second)
	for len(peers.Invalids()) < len(forged) {
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("ignored = %v; want all %d forged leases", peers.Invalids(), len(forged))
		}
	}
	var nodes []string
	for _, l := range peers.Snapshot() {
		nodes = append(nodes, l.Node)
	}
	if !slices.Equal(nodes, []string{"victim"}) {
		t.Errorf("in use: %v; want only victim (ignored: %v)", nodes, slices.Sorted(maps.Values(peers.Invalids())))
	}
}

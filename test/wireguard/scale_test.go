package wireguard_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/netagent/netagent/pkg/wireguard"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// manyPeers returns count peers as the store would show them: pod subnets 10.x.y.0/24 of
// 10.0.0.0/8, endpoints on node2's underlay address (one port each; nothing answers).
func manyPeers(t testing.TB, z *node, count int) []wireguard.PeerSpec {
	t.Helper()
	specs := make([]wireguard.PeerSpec, count)
	for i := range specs {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		specs[i] = wireguard.PeerSpec{
			Node:       fmt.Sprintf("peer%d", i),
			PublicKey:  k.PublicKey().String(),
			Endpoint:   netip.AddrPortFrom(z.underlay, uint16(20000+i)).String(),
			AllowedIPs: []string{fmt.Sprintf("10.%d.%d.0/24", 100+i/256, i%256)},
		}
	}
	return specs
}

func manyConfig(t testing.TB, a *node, specs []wireguard.PeerSpec) wireguard.Config {
	t.Helper()
	c, err := desired(a)
	if err != nil {
		t.Fatal(err)
	}
	c.Peers, err = wireguard.Peers(wireguard.Self{PublicKey: c.PrivateKey.PublicKey(), Network: netip.MustParsePrefix("10.0.0.0/8"), Subnet: a.subnet}, specs)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestManyPeers: 1,000 peers go in with one Set; the next Set changes nothing; a change to
// one peer touches that peer only, and the others keep their state.
func TestManyPeers(t *testing.T) {
	a, z := newNodes(t)
	specs := manyPeers(t, z, 1000)
	c := manyConfig(t, a, specs)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	t0 := time.Now()
	ch, err := a.rec.Set(ctx, c)
	if err != nil || len(ch.Added) != 1000 {
		t.Fatalf("Set(1,000 peers) = %d added, %v", len(ch.Added), err)
	}
	t.Logf("1,000 peers (device start included): %v", time.Since(t0).Round(time.Millisecond))
	if n := len(a.device().Peers); n != 1000 {
		t.Fatalf("device has %d peers, want 1000", n)
	}
	if ch, err := a.rec.Set(ctx, c); err != nil || !ch.Empty() {
		t.Fatalf("second Set = %q, %v; want no change", ch, err)
	}
	specs[500].Endpoint = netip.AddrPortFrom(z.underlay, 1).String()
	specs[501].AllowedIPs = []string{"10.200.0.0/24"}
	specs = specs[:999]
	ch, err = a.rec.Set(ctx, manyConfig(t, a, specs))
	slices.Sort(ch.Updated) // Set goes by public key
	if err != nil || strings.Join(ch.Updated, ",") != "peer500,peer501" || len(ch.Removed) != 1 || len(ch.Added) != 0 {
		t.Fatalf("Set after changing two peers and dropping one = %q, %v", ch, err)
	}
}

// BenchmarkSetPeers: one Set adding 1,000 peers to a running userspace device, and one
// Set that finds nothing to do (the steady-state cost of a pass), as time per Set.
//
//	go test -run '^$' -bench SetPeers -benchtime 5x ./test/wireguard
func BenchmarkSetPeers(b *testing.B) {
	a, z := newNodes(b)
	a.reconcile() // the device, no peers
	ctx := context.Background()
	var add, steady time.Duration
	for range b.N {
		c := manyConfig(b, a, manyPeers(b, z, 1000))
		t0 := time.Now()
		if _, err := a.rec.Set(ctx, c); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if ch, err := a.rec.Set(ctx, c); err != nil || !ch.Empty() {
			b.Fatalf("steady Set = %q, %v", ch, err)
		}
		add, steady = add+t1.Sub(t0), steady+time.Since(t1)
		c.Peers = nil
		if _, err := a.rec.Set(ctx, c); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(add.Milliseconds())/float64(b.N), "ms/add-1000")
	b.ReportMetric(float64(steady.Milliseconds())/float64(b.N), "ms/steady-1000")
}

// BenchmarkJoin: two running devices without peers learn of each other (one Set each, as
// from the lease watch); measured is the time from the first Set to the first reply of a
// 10 ms ping that was already running between their pods, handshake included.
//
//	go test -run '^$' -bench Join -benchtime 5x ./test/wireguard
func BenchmarkJoin(b *testing.B) {
	var total time.Duration
	for range b.N {
		b.StopTimer()
		a, z := newNodes(b)
		a.reconcile()
		z.reconcile()
		p := startPing(b, a.pod, z.podIP)
		time.Sleep(50 * time.Millisecond)
		b.StartTimer()
		t0 := time.Now()
		a.reconcile(z)
		z.reconcile(a)
		p.waitReplies(1, 10*time.Second)
		b.StopTimer()
		p.mu.Lock()
		first := time.Unix(0, int64(p.rx[0]*1e9))
		p.mu.Unlock()
		total += first.Sub(t0)
		p.finish()
	}
	b.ReportMetric(float64(total.Microseconds())/1000/float64(b.N), "ms/join")
}

// TestRandomTransitions applies random desired states in sequence to one running device:
// peers come and go, rotate keys, change endpoints, and trade pod subnets with each other
// within one Set (WireGuard hands a prefix to the last peer configured with it, so order
// inside the request matters). After every Set the device reads back exactly as desired,
// and the next Set changes nothing.
func TestRandomTransitions(t *testing.T) {
	a, z := newNodes(t)
	a.reconcile()
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 16))
	seed := rng.Uint64()
	t.Logf("seed %d", seed)
	rng = rand.New(rand.NewPCG(seed, 16))
	keys := make([]string, 12)
	for i := range keys {
		k, _ := wgtypes.GeneratePrivateKey()
		keys[i] = k.PublicKey().String()
	}
	ctx := context.Background()
	for step := range 40 {
		// A random subset of key slots, each given one of a few subnets at random, distinct
		// per step (a permutation), so subnets move between peers from one step to the next.
		subnets := rng.Perm(len(keys))
		var specs []wireguard.PeerSpec
		for i := range keys {
			if rng.IntN(3) == 0 {
				continue
			}
			if rng.IntN(10) == 0 { // rotated
				k, _ := wgtypes.GeneratePrivateKey()
				keys[i] = k.PublicKey().String()
			}
			ips := []string{fmt.Sprintf("10.%d.%d.0/24", 100+subnets[i]%2, subnets[i])}
			if rng.IntN(4) == 0 {
				ips = append(ips, fmt.Sprintf("10.102.%d.0/25", subnets[i]))
			}
			specs = append(specs, wireguard.PeerSpec{
				Node: fmt.Sprintf("peer%d", i), PublicKey: keys[i], AllowedIPs: ips,
				Endpoint: netip.AddrPortFrom(z.underlay, uint16(20000+rng.IntN(3))).String(),
			})
		}
		c := manyConfig(t, a, specs)
		if _, err := a.rec.Set(ctx, c); err != nil {
			t.Fatalf("step %d: Set: %v", step, err)
		}
		got := map[string]string{}
		for _, p := range a.device().Peers {
			var ips []string
			for _, n := range p.AllowedIPs {
				ips = append(ips, n.String())
			}
			slices.Sort(ips)
			got[p.PublicKey.String()] = fmt.Sprintf("%s %v keepalive=%v", p.Endpoint, ips, p.PersistentKeepaliveInterval)
		}
		want := map[string]string{}
		for _, p := range c.Peers {
			var ips []string
			for _, n := range p.AllowedIPs {
				ips = append(ips, n.String())
			}
			slices.Sort(ips)
			want[p.PublicKey.String()] = fmt.Sprintf("%s %v keepalive=0s", p.Endpoint, ips)
		}
		if d := cmp.Diff(want, got); d != "" {
			t.Fatalf("step %d: device differs from the desired state (-want +got):\n%s", step, d)
		}
		if ch, err := a.rec.Set(ctx, c); err != nil || !ch.Empty() {
			t.Fatalf("step %d: second Set = %q, %v; want no change", step, ch, err)
		}
	}
}

package wireguard

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// fakeDevice is a device behind wgctrl's Client (configuration requests applied with wg(8)'s
// semantics), the link it is, and the handshake messages its guard recorded.
type fakeDevice struct {
	t  *testing.T
	mu sync.Mutex
	d  *wgtypes.Device
	// rx is what the device reports received from each peer; seen[a] (answered[a]) when an
	// initiation (a response) from a arrived; hs when the device completed a handshake.
	rx       map[wgtypes.Key]int64
	seen     map[netip.Addr]time.Time
	answered map[netip.Addr]time.Time
	hs       time.Time
	kicks    []time.Time // requests that switched a keepalive on for an existing peer
	removes  []time.Time // requests that removed a peer
	// during runs, lock held, inside the first configuration request, which then takes
	// 2 ms more (what comes back while WireGuard applies it).
	during func()
}

func newFakeDevice(t *testing.T, self wgtypes.Key) *fakeDevice {
	return &fakeDevice{t: t, d: &wgtypes.Device{Name: "wg0", PrivateKey: self, ListenPort: 51820},
		rx: map[wgtypes.Key]int64{}, seen: map[netip.Addr]time.Time{}, answered: map[netip.Addr]time.Time{}}
}

// onePeer is the desired state with peer as the only peer, at 192.0.2.2.
func onePeer(self, peer wgtypes.Key) Config {
	return Config{Name: "wg0", PrivateKey: self, ListenPort: 51820, MTU: 1440, Peers: []Peer{{
		Node: "peer", PublicKey: peer.PublicKey(), Endpoint: netip.MustParseAddrPort("192.0.2.2:51820"), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.244.2.0/24")},
	}}}
}

func (f *fakeDevice) Device(string) (*wgtypes.Device, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := *f.d
	d.Peers = append([]wgtypes.Peer(nil), f.d.Peers...)
	for i := range d.Peers {
		d.Peers[i].ReceiveBytes = f.rx[d.Peers[i].PublicKey]
		d.Peers[i].LastHandshakeTime = f.hs
	}
	return &d, nil
}

func (f *fakeDevice) ConfigureDevice(_ string, c wgtypes.Config) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, pc := range c.Peers {
		if pc.UpdateOnly && pc.PersistentKeepaliveInterval != nil && *pc.PersistentKeepaliveInterval != 0 {
			f.kicks = append(f.kicks, time.Now())
		}
		if pc.Remove {
			f.removes = append(f.removes, time.Now())
		}
	}
	f.d = apply(f.t, f.d, c)
	if f.during != nil {
		f.during()
		f.during = nil
		time.Sleep(2 * time.Millisecond)
	}
	return nil
}

func (f *fakeDevice) Handshakes() (initiations, responses map[netip.Addr]time.Duration, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ages := func(at map[netip.Addr]time.Time) map[netip.Addr]time.Duration {
		m := map[netip.Addr]time.Duration{}
		for a, t := range at {
			m[a] = (time.Since(t) + 4*time.Millisecond).Truncate(4 * time.Millisecond) // read older, as the kernel's jiffies make it
		}
		return m
	}
	return ages(f.seen), ages(f.answered), nil
}

func (f *fakeDevice) LinkByName(name string) (netlink.Link, error) {
	return &netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: 1440, Flags: net.FlagUp}}, nil
}
func (f *fakeDevice) LinkSetMTU(netlink.Link, int) error   { return nil }
func (f *fakeDevice) LinkSetUp(netlink.Link) error         { return nil }
func (f *fakeDevice) Ensure(context.Context) (bool, error) { return false, nil }

// locked runs do with the fake's lock held.
func (f *fakeDevice) locked(do func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	do()
}

func (f *fakeDevice) kicked() (ts []time.Time) {
	f.locked(func() { ts = slices.Clone(f.kicks) })
	return ts
}

func (f *fakeDevice) recreated() (ts []time.Time) {
	f.locked(func() { ts = slices.Clone(f.removes) })
	return ts
}

// TestFollowerKicks: a follower starts the handshake itself exactly when the leader's
// initiation reached it before it knew the leader (recorded, nothing received since), once
// that initiation is settle old; otherwise only after followLate with nothing heard, and
// never once the leader's handshake is under way.
func TestFollowerKicks(t *testing.T) {
	leaderIP := netip.MustParseAddr("192.0.2.2")
	for _, tt := range []struct {
		name string
		// before: when the leader's initiation was recorded, before the Set (0: none;
		// negative: after it)
		before time.Duration
		rx     bool // the device receives from the leader 5 ms after the Set
		// want: the kick's time after the Set, within [min, max]; kick false: none within 1.3 s
		kick     bool
		min, max time.Duration
	}{
		{"initiation lost long before", 300 * time.Millisecond, false, true, 0, 40 * time.Millisecond},
		{"initiation just before: wait until settled", 10 * time.Millisecond, false, true, settle - 15*time.Millisecond, settle + 40*time.Millisecond},
		{"initiation queued, consumed after the add", 10 * time.Millisecond, true, false, 0, 0},
		{"no initiation: late kick", 0, false, true, followLate - 10*time.Millisecond, followLate + 100*time.Millisecond},
		{"initiation after the add only: late kick", -20 * time.Millisecond, false, true, followLate - 10*time.Millisecond, followLate + 100*time.Millisecond},
		{"no initiation, but heard", 0, true, false, 0, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			self, peer := genKey(t), genKey(t)
			for leads(self.PublicKey(), peer.PublicKey()) {
				self = genKey(t) // we follow: the peer has the smaller key
			}
			f := newFakeDevice(t, self)
			r := &Reconciler{Client: f, Links: f, Device: f, Handshakes: f}
			t.Cleanup(r.Stop)
			start := time.Now()
			if tt.before > 0 {
				f.locked(func() { f.seen[leaderIP] = start.Add(-tt.before) })
			}
			if _, err := r.Set(context.Background(), onePeer(self, peer)); err != nil {
				t.Fatal(err)
			}
			if tt.before < 0 {
				time.Sleep(-tt.before)
				f.locked(func() { f.seen[leaderIP] = time.Now() })
			}
			if tt.rx {
				time.Sleep(5 * time.Millisecond)
				f.locked(func() { f.rx[peer.PublicKey()] += 148 })
			}
			time.Sleep(followLate + 300*time.Millisecond)
			ks := f.kicked()
			switch {
			case !tt.kick && len(ks) > 0:
				t.Fatalf("kicked %v after the Set, want no kick", ks[0].Sub(start))
			case tt.kick && len(ks) != 1:
				t.Fatalf("%d kicks, want one", len(ks))
			case tt.kick:
				if at := ks[0].Sub(start); at < tt.min || at > tt.max {
					t.Errorf("kicked %v after the Set, want %v-%v", at, tt.min, tt.max)
				}
			}
		})
	}
}

// TestLeaderRepairsCrossing: the leader re-creates the peer and kicks again exactly when a
// response from the peer came after its kick and settled without a handshake (the
// follower's own initiation crossed ours, so the device dropped the answer to ours); not
// for a response that completed the handshake, nor without one, nor for one from before.
func TestLeaderRepairsCrossing(t *testing.T) {
	peerIP := netip.MustParseAddr("192.0.2.2")
	for _, tt := range []struct {
		name      string
		response  time.Duration // when a response comes after the Set (0: none; negative: before; -1ns: every 40 ms; 1ns, 2ns: see below)
		handshake bool          // the device completes a handshake with it
		repair    bool
	}{
		{"crossed: response dropped", 30 * time.Millisecond, false, true},
		{"response answered our kick", 30 * time.Millisecond, true, false},
		{"no response", 0, false, false},
		{"response from before the kick", -time.Second, false, false},
		{"forged responses keep coming: at most maxRepairs", -1, false, true},
		{"crossed on a fast path: response during the request", 1, false, true},
		{"handshake during the request, then a forged response", 2, true, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			self, peer := genKey(t), genKey(t)
			for !leads(self.PublicKey(), peer.PublicKey()) {
				self = genKey(t) // we lead
			}
			f := newFakeDevice(t, self)
			r := &Reconciler{Client: f, Links: f, Device: f, Handshakes: f}
			t.Cleanup(r.Stop)
			start := time.Now()
			if tt.response < 0 {
				f.locked(func() { f.answered[peerIP] = start.Add(tt.response) })
			}
			switch tt.response {
			case 1: // the answer to our kick, dropped, comes back within the request
				f.during = func() { f.answered[peerIP] = time.Now() }
			case 2: // the handshake completes within the request; a forged response later
				f.during = func() { f.hs = time.Now() }
				go func() {
					time.Sleep(50 * time.Millisecond)
					f.locked(func() { f.answered[peerIP] = time.Now() })
				}()
			}
			if _, err := r.Set(context.Background(), onePeer(self, peer)); err != nil {
				t.Fatal(err)
			}
			if tt.response == -1 {
				// A forged response every 40 ms, each recorded as settled (30 ms old when
				// written), so every look after one sees a crossing: only maxRepairs may stop
				// the re-creations, not the looks' timing (which a loaded CI run stretches).
				stop := make(chan struct{})
				t.Cleanup(func() { close(stop) })
				go func() {
					for range 75 {
						select {
						case <-stop:
							return
						case <-time.After(40 * time.Millisecond):
						}
						f.locked(func() { f.answered[peerIP] = time.Now().Add(-30 * time.Millisecond) })
					}
				}()
				for deadline := time.Now().Add(3 * time.Second); len(f.recreated()) < maxRepairs && time.Now().Before(deadline); {
					time.Sleep(10 * time.Millisecond)
				}
			}
			if tt.response > 2 {
				time.Sleep(tt.response)
				f.locked(func() {
					f.answered[peerIP] = time.Now()
					if tt.handshake {
						f.hs = time.Now()
					}
				})
			}
			time.Sleep(500 * time.Millisecond)
			rs := f.recreated()
			switch {
			case !tt.repair && len(rs) > 0:
				t.Fatalf("re-created %v after the Set, want not", rs[0].Sub(start))
			case tt.response == -1:
				if len(rs) != maxRepairs {
					t.Fatalf("re-created %d times under a stream of forged responses, want %d", len(rs), maxRepairs)
				}
			case tt.repair && len(rs) != 1:
				t.Fatalf("re-created %d times, want once", len(rs))
			case tt.repair && tt.response > 2:
				if at := rs[0].Sub(start); at < tt.response+settle || at > tt.response+settle+150*time.Millisecond {
					t.Errorf("re-created %v after the Set, want soon after %v", at, tt.response+settle)
				}
			}
		})
	}
}

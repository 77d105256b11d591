package wireguard

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// fakeDevice is a device behind wgctrl's Client (configuration requests applied with wg(8)'s
// semantics), the link it is, and the initiations its guard recorded.
type fakeDevice struct {
	t  *testing.T
	mu sync.Mutex
	d  *wgtypes.Device
	// rx is what the device reports received from each peer; seen[a] when an initiation
	// from a arrived.
	rx    map[wgtypes.Key]int64
	seen  map[netip.Addr]time.Time
	kicks []time.Time // requests that switched a keepalive on for an existing peer
}

func (f *fakeDevice) Device(string) (*wgtypes.Device, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := *f.d
	d.Peers = append([]wgtypes.Peer(nil), f.d.Peers...)
	for i := range d.Peers {
		d.Peers[i].ReceiveBytes = f.rx[d.Peers[i].PublicKey]
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
	}
	f.d = apply(f.t, f.d, c)
	return nil
}

func (f *fakeDevice) Initiations() (map[netip.Addr]time.Duration, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	m := map[netip.Addr]time.Duration{}
	for a, at := range f.seen {
		m[a] = time.Since(at)
	}
	return m, nil
}

func (f *fakeDevice) LinkByName(name string) (netlink.Link, error) {
	return &netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: 1440, Flags: net.FlagUp}}, nil
}
func (f *fakeDevice) LinkSetMTU(netlink.Link, int) error   { return nil }
func (f *fakeDevice) LinkSetUp(netlink.Link) error         { return nil }
func (f *fakeDevice) Ensure(context.Context) (bool, error) { return false, nil }
func (f *fakeDevice) kicked() []time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Time(nil), f.kicks...)
}
func (f *fakeDevice) receive(k wgtypes.Key, n int64) { f.mu.Lock(); defer f.mu.Unlock(); f.rx[k] += n }
func (f *fakeDevice) initiation(a netip.Addr, at time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.seen[a] = at
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
		rx     bool // the device receives from the leader 20 ms after the Set
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
			f := &fakeDevice{t: t, d: &wgtypes.Device{Name: "wg0", PrivateKey: self, ListenPort: 51820}, rx: map[wgtypes.Key]int64{}, seen: map[netip.Addr]time.Time{}}
			r := &Reconciler{Client: f, Links: f, Device: f, Initiations: f}
			t.Cleanup(r.Stop)
			start := time.Now()
			if tt.before > 0 {
				f.initiation(leaderIP, start.Add(-tt.before))
			}
			c := Config{Name: "wg0", PrivateKey: self, ListenPort: 51820, MTU: 1440, Peers: []Peer{{
				Node: "leader", PublicKey: peer.PublicKey(), Endpoint: netip.AddrPortFrom(leaderIP, 51820), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.244.2.0/24")},
			}}}
			if _, err := r.Set(context.Background(), c); err != nil {
				t.Fatal(err)
			}
			if tt.before < 0 {
				time.Sleep(-tt.before)
				f.initiation(leaderIP, time.Now())
			}
			if tt.rx {
				time.Sleep(20 * time.Millisecond)
				f.receive(peer.PublicKey(), 148)
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

// Package wireguard makes a node's WireGuard device match the desired state: the device
// (private key, listen port, MTU, up) and one peer per other node (public key, endpoint,
// allowed IPs = its pod subnet, optional pre-shared key, no persistent keepalive).
//
// Set is level-triggered like every netagent reconciler: it makes sure the device exists
// (recreating a deleted one, with the same key since the key is desired state), reads the
// device back through wgctrl, diffs it against the desired state with the pure diff, and
// applies only the difference in one configuration request (peers added or updated first,
// unknown peers removed last). An unchanged peer is not touched, so its session and
// handshake survive every pass. Applying the same state twice changes nothing.
//
// A new peer's first handshake is started by one side of the pair only, the one with the
// smaller public key; the other starts one only when it knows the first was lost, or has
// heard nothing from the peer a second later (see handshakeKick): two initiations that
// cross leave both sides waiting 5 s, or worse.
//
// Scale: one wgctrl read and at most one write per pass, O(peers) to diff; Peers' overlap
// check is O(peers²) prefix comparisons (a few milliseconds at 1,000 peers).
package wireguard

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/netagent/netagent/pkg/netipx"
	"github.com/netagent/netagent/pkg/wireguard/device"
	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// Config is the desired state of one device.
type Config struct {
	Name         string
	PrivateKey   wgtypes.Key
	ListenPort   int
	MTU          int
	PresharedKey *wgtypes.Key // for every peer; nil for none
	Peers        []Peer       // from Peers
	// KeyReplaced says the device was given PrivateKey out of band since the last Set (a
	// rotation applied before the lease announced it): as for a key Set itself changes,
	// the peers' sessions are gone, and we start a handshake with every peer we lead.
	KeyReplaced bool
}

// Client is the wgctrl surface Set needs; *wgctrl.Client satisfies it (for a kernel
// device, open it inside the node's namespace: its generic netlink socket stays there).
type Client interface {
	Device(name string) (*wgtypes.Device, error)
	ConfigureDevice(name string, cfg wgtypes.Config) error
}

// Links is the netlink surface Set needs; a *netlink.Handle in the node's namespace.
type Links interface {
	LinkByName(name string) (netlink.Link, error)
	LinkSetMTU(link netlink.Link, mtu int) error
	LinkSetUp(link netlink.Link) error
}

// Ensurer creates the device when it is missing (device.Daemon for userspace,
// device.Kernel for the kernel); created reports that it did.
type Ensurer interface {
	Ensure(ctx context.Context) (created bool, err error)
}

// Reconciler applies Configs to one node's device.
type Reconciler struct {
	Client Client
	Links  Links
	Device Ensurer
	Log    *slog.Logger
	// Handshakes, when set, tells a new peer whose first initiation was lost, and two
	// handshakes that crossed (see handshakeKick); without it the first waits followLate,
	// the second WireGuard's 5 s.
	Handshakes Handshakes

	// mu serialises Set, Drifted and the follow-up checks (which run on a timer's
	// goroutine), so that one never re-creates a peer another is reading or writing.
	// Client itself may be shared (the dataplane's status reads): wgctrl's userspace
	// client dials the socket per call, and its kernel one shares a generic netlink
	// connection that serialises requests.
	mu      sync.Mutex
	last    Config                    // what the last Set applied: follow-ups re-create peers from it
	pending map[wgtypes.Key]*followUp // peers whose first handshake is not seen yet
	timer   *time.Timer
}

// followUp is a new peer whose first handshake we started (lead) or leave to it, looked
// at until it has one (see handshakeKick).
type followUp struct {
	lead       bool
	added, due time.Time // due: the next look
	kicked     time.Time // (lead) the last kick: added, or the last re-creation
	looks      int
	repairs    int   // (lead) re-creations for crossed handshakes
	rx         int64 // bytes received from the peer when it was added
}

// Changes says what a Set changed. Peers are named by node where known, else by public key.
type Changes struct {
	Created    bool // the device was missing and was made
	Pruned     bool // the device was removed: the plan names none (the backend changed)
	PrivateKey bool
	ListenPort bool
	MTU        bool
	Up         bool
	Added      []string
	Updated    []string // endpoint, allowed IPs, pre-shared key or keepalive
	Removed    []string
}

// Empty reports that nothing changed.
func (c Changes) Empty() bool {
	return !c.Created && !c.Pruned && !c.PrivateKey && !c.ListenPort && !c.MTU && !c.Up && len(c.Added)+len(c.Updated)+len(c.Removed) == 0
}

func (c Changes) String() string {
	var parts []string
	for _, f := range []struct {
		on   bool
		what string
	}{{c.Created, "device created"}, {c.Pruned, "device removed"}, {c.PrivateKey, "private key"}, {c.ListenPort, "listen port"}, {c.MTU, "mtu"}, {c.Up, "set up"}} {
		if f.on {
			parts = append(parts, f.what)
		}
	}
	for _, l := range []struct {
		what  string
		peers []string
	}{{"added", c.Added}, {"updated", c.Updated}, {"removed", c.Removed}} {
		if len(l.peers) > 0 {
			parts = append(parts, l.what+" "+strings.Join(l.peers, ","))
		}
	}
	if len(parts) == 0 {
		return "no change"
	}
	return strings.Join(parts, "; ")
}

// Validate checks what Peers does not: the device's own fields.
func (c Config) Validate() error {
	var errs []error
	if err := device.ValidName(c.Name); err != nil {
		errs = append(errs, err)
	}
	if c.PrivateKey == (wgtypes.Key{}) {
		errs = append(errs, errors.New("private key: not set"))
	}
	if c.ListenPort < 1 || c.ListenPort > 65535 {
		errs = append(errs, fmt.Errorf("listen port %d: want 1-65535", c.ListenPort))
	}
	if c.MTU < 1280 || c.MTU > 65535 {
		errs = append(errs, fmt.Errorf("mtu %d: want 1280-65535", c.MTU))
	}
	seen := map[wgtypes.Key]bool{}
	for _, p := range c.Peers {
		if seen[p.PublicKey] {
			errs = append(errs, fmt.Errorf("peer %s: public key listed twice", p.Node))
		}
		seen[p.PublicKey] = true
	}
	return errors.Join(errs...)
}

// Set makes the device match c and returns what it changed. It keeps going past a failed
// step and reports every failure.
func (r *Reconciler) Set(ctx context.Context, c Config) (Changes, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var ch Changes
	if err := c.Validate(); err != nil {
		return ch, fmt.Errorf("wireguard config: %w", err)
	}
	created, err := r.Device.Ensure(ctx)
	if err != nil {
		return ch, fmt.Errorf("ensure device %s: %w", c.Name, err)
	}
	ch.Created = created
	// The link first: a device that is down sends no handshake when a peer is added.
	var errs []error
	l, err := r.Links.LinkByName(c.Name)
	if err != nil {
		return ch, fmt.Errorf("link %s: %w", c.Name, err)
	}
	if l.Attrs().MTU != c.MTU {
		if err := r.Links.LinkSetMTU(l, c.MTU); err != nil {
			errs = append(errs, fmt.Errorf("set %s mtu %d: %w", c.Name, c.MTU, err))
		} else {
			ch.MTU = true
		}
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		if err := r.Links.LinkSetUp(l); err != nil {
			errs = append(errs, fmt.Errorf("set %s up: %w", c.Name, err))
		} else {
			ch.Up = true
		}
	}
	cur, err := r.Client.Device(c.Name)
	if err != nil {
		return ch, errors.Join(append(errs, fmt.Errorf("read device %s: %w", c.Name, err))...)
	}
	wc, lead, follow, d := diff(c, cur)
	r.last = c
	if wc != nil {
		// Our kicks leave during the request (and an answer may come back before it
		// returns): the leader's follow-ups count from before it.
		sent := time.Now()
		if err := r.Client.ConfigureDevice(c.Name, *wc); err != nil {
			errs = append(errs, fmt.Errorf("configure device %s: %w", c.Name, err))
		} else {
			d.Created, d.MTU, d.Up = ch.Created, ch.MTU, ch.Up
			ch = d
			// The peers are known from now: an initiation from one of them that came
			// before was dropped (if the device had consumed it, its bytes would show).
			r.follow(cur, lead, follow, sent, time.Now())
		}
	}
	if !ch.Empty() {
		r.logger().Info("wireguard device reconciled", "dev", c.Name, "changes", ch.String())
	}
	return ch, errors.Join(errs...)
}

// Drifted reports why the device no longer matches c ("" when it does): missing, down, another
// MTU, or keys, port or peers that differ. It reads and writes nothing but the device's
// state: the agent polls it, since neither WireGuard implementation announces changes.
func (r *Reconciler) Drifted(c Config) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	l, err := r.Links.LinkByName(c.Name)
	if err != nil {
		return "device missing: " + err.Error()
	}
	switch {
	case l.Attrs().MTU != c.MTU:
		return fmt.Sprintf("mtu %d, want %d", l.Attrs().MTU, c.MTU)
	case l.Attrs().Flags&net.FlagUp == 0:
		return "device down"
	}
	cur, err := r.Client.Device(c.Name)
	if err != nil {
		return "device unreadable: " + err.Error()
	}
	c.KeyReplaced = false // a request to kick, not state
	if wc, _, _, ch := diff(c, cur); wc != nil {
		return ch.String()
	}
	return ""
}

func (r *Reconciler) logger() *slog.Logger {
	if r.Log != nil {
		return r.Log
	}
	return slog.New(slog.DiscardHandler)
}

// handshakeKick is the persistent keepalive a new peer is added with, and turned off again
// by a second entry for the peer later in the same request: switching the keepalive on
// makes WireGuard (wireguard-go and the kernel alike, each entry applied in order) send a
// keepalive at once, so we start the handshake with a new peer (or a peer's new key)
// instead of waiting for traffic from our side. Without it, a peer that rotated its key
// and sends first has its handshakes dropped until we learn the new key, and then retries
// only after REKEY_TIMEOUT (5 s): TestKeyRotation measured a 5.1 s gap. On a peer with a
// session a kick sends a keepalive, not a handshake.
//
// Only the side with the smaller public key kicks (leads), once. Both sides of a pair
// usually learn of each other within milliseconds (the same lease event); had both kicked,
// their initiations cross: each side consumes the other's initiation and answers it, which
// replaces its own pending handshake, so it drops the answer to its own; no handshake
// completes, and neither sends a new initiation for REKEY_TIMEOUT (an answer counts as
// one). TestHandshakeCrossing reproduces it. Worse, wireguard-go consumes the initiation
// and the answer on different goroutines, and a crossing was seen to leave a session that
// carried packets one way only (TestBackendKube, under load), which nothing here could
// detect. So we never start crossing handshakes ourselves, and repair the ones WireGuard
// starts (below).
//
// The leader's initiation is lost when it reaches the follower before the follower knows
// the leader's key (the follower learns of the leader later, or its device is not up yet:
// a new node), and WireGuard sends the next one only after REKEY_TIMEOUT. The leader
// cannot tell a lost initiation from one still on its way (a path's round trip may be
// longer than any retry we would pick, and a retry, which must clear the peer's handshake
// state, throws away the answer on its way and the packets queued for the peer), so it
// does not retry: the follower, which can tell, starts the handshake instead. Its
// underlay guard records the source of every initiation that reaches the node's port
// (Handshakes), so when it adds a peer it follows and finds that an initiation came from
// the peer's address (around the add or before it) and nothing has been received from the
// peer since, the leader's initiation was dropped and the leader is waiting: the follower
// kicks. It waits until that initiation is settle old first: one still queued in the
// device, consumed after the peer was added, would be answered, and a kick before the
// answer would cross it; once consumed, the peer's received bytes show it.
//
// Without such a record (no guard, or none of the peer's initiations reached us) the
// follower kicks once after followLate if it has heard nothing at all from the leader:
// the leader had no reason to start (only our side changed: our device was recreated, or
// a peer removed by hand), or its initiation was lost on the way.
//
// The follower's WireGuard itself sends an initiation when it has packets for the leader
// and no session (its pods talk to the leader's as soon as the route is there), and that
// one can cross the leader's kick. The leader sees it: a response from the peer (recorded
// by the guard too) arrived after the peer was added, yet no handshake completed, which a
// response to our pending initiation would have done; the device dropped it because the
// peer's own initiation had replaced ours. Both sides now wait as responders. The leader
// then re-creates the peer (clearing its handshake state and WireGuard's rate limit) and
// kicks again: the follower, which has nothing pending, answers. A re-creation loses the
// packets queued on our side, 5 s of them otherwise. At most maxRepairs per new peer:
// anyone on the underlay can forge a response.
//
// Both stop looking after followFor, when WireGuard's own retries take over.
const handshakeKick = 25 * time.Second

const (
	settle      = 25 * time.Millisecond
	leadLookMax = 400 * time.Millisecond
	maxRepairs  = 2
	// grain is how coarse the guard's record of when a message came is (the kernel's
	// set timeouts count jiffies: 10 ms at HZ=100).
	grain      = 10 * time.Millisecond
	followLate = time.Second
	followFor  = 5 * time.Second
)

// Handshakes tells where handshake initiations and responses to the device's port came
// from: for each underlay address, how long ago the last one arrived, whether the device
// took it or not (pkg/wgguard records them in nftables).
type Handshakes interface {
	Handshakes() (initiations, responses map[netip.Addr]time.Duration, err error)
}

// leads reports whether the side with public key self starts the first handshake with peer.
func leads(self, peer wgtypes.Key) bool { return bytes.Compare(self[:], peer[:]) < 0 }

// follow records the peers just kicked (lead) and the new peers the other side leads, with
// what they had received so far (cur: the device before the request), and arms the timer.
// Called with mu held.
func (r *Reconciler) follow(cur *wgtypes.Device, lead, follow []wgtypes.Key, sent, added time.Time) {
	if len(lead)+len(follow) == 0 {
		return
	}
	if r.pending == nil {
		r.pending = map[wgtypes.Key]*followUp{}
	}
	rx := make(map[wgtypes.Key]int64, len(cur.Peers))
	for _, p := range cur.Peers {
		rx[p.PublicKey] = p.ReceiveBytes
	}
	for _, k := range lead {
		r.pending[k] = &followUp{lead: true, added: sent, kicked: sent, due: added.Add(settle), rx: rx[k]}
	}
	for _, k := range follow {
		r.pending[k] = &followUp{added: added, due: added, rx: rx[k]}
	}
	r.arm(time.Now())
}

// Stop ends the follow-ups (the device is being removed, or the reconciler replaced).
func (r *Reconciler) Stop() {
	r.mu.Lock()
	defer r.mu.Unlock()
	clear(r.pending)
	if r.timer != nil {
		r.timer.Stop()
	}
}

// arm sets the timer for the earliest follow-up due. Called with mu held.
func (r *Reconciler) arm(now time.Time) {
	var next time.Time
	for _, f := range r.pending {
		if next.IsZero() || f.due.Before(next) {
			next = f.due
		}
	}
	if next.IsZero() {
		return
	}
	if r.timer != nil {
		r.timer.Stop()
	}
	r.timer = time.AfterFunc(max(next.Sub(now), 0), r.followUp)
}

// followUp looks at the pending peers that are due: a peer gone from the desired state or
// the device, or with a handshake since it was added, needs nothing more; nor does a peer
// we follow that we heard from. Those we follow are kicked once the leader's initiation is
// known lost, or after followLate; those we lead are re-created and kicked when their
// handshake crossed one of theirs (see handshakeKick).
func (r *Reconciler) followUp() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.pending) == 0 {
		return
	}
	name := r.last.Name
	want := make(map[wgtypes.Key]*Peer, len(r.last.Peers))
	for i := range r.last.Peers {
		want[r.last.Peers[i].PublicKey] = &r.last.Peers[i]
	}
	d, err := r.Client.Device(name)
	if err != nil {
		// The device is gone: the pass that recreates it follows its peers anew.
		r.logger().Debug("wireguard handshake follow-up: read device", "dev", name, "err", err)
		clear(r.pending)
		return
	}
	have := make(map[wgtypes.Key]*wgtypes.Peer, len(d.Peers))
	for i := range d.Peers {
		have[d.Peers[i].PublicKey] = &d.Peers[i]
	}
	var initiations, responses map[netip.Addr]time.Duration
	if r.Handshakes != nil {
		if initiations, responses, err = r.Handshakes.Handshakes(); err != nil {
			r.logger().Warn("wireguard handshake follow-up: read the handshake messages recorded", "dev", name, "err", err)
		}
	}
	now := time.Now()
	// since reports how long ago the last message in seen came from p, if after t.
	since := func(seen map[netip.Addr]time.Duration, p *Peer, t time.Time) (time.Duration, bool) {
		age, ok := seen[p.Endpoint.Addr().Unmap()]
		return age, ok && now.Add(-age).After(t)
	}
	var kick wgtypes.Config
	var kicked, recreated []string
	for k, f := range r.pending {
		p, h := want[k], have[k]
		if p == nil || h == nil || h.LastHandshakeTime.After(f.added) || (!f.lead && h.ReceiveBytes != f.rx) || now.Sub(f.added) > followFor {
			delete(r.pending, k) // gone, done, or the leader's handshake is under way
			continue
		}
		if now.Before(f.due) {
			continue
		}
		if f.lead {
			f.looks++
			f.due = now.Add(min(settle<<f.looks, leadLookMax))
			// A response that came after the peer was added and settled without a
			// handshake was dropped: the handshakes crossed.
			if age, ok := since(responses, p, f.kicked.Add(-grain)); !ok || age < settle {
				continue
			}
			kick.Peers = append(kick.Peers, wgtypes.PeerConfig{PublicKey: k, Remove: true}, newPeer(*p, r.last.PresharedKey, true), keepaliveOff(k))
			f.kicked, f.looks, f.due = now, 0, now.Add(settle)
			if f.repairs++; f.repairs >= maxRepairs {
				delete(r.pending, k) // forged responses must not keep re-creating it
			}
			recreated = append(recreated, p.Node)
			continue
		}
		// An initiation from the leader came (before the add, as its kick reached a device
		// that did not know it yet; the record's clock has a few milliseconds' grain) and
		// was not consumed: the leader waits for an answer that will not come.
		f.due = f.added.Add(followLate)
		if age, ok := since(initiations, p, f.added.Add(-followLate)); ok {
			f.due = now.Add(settle - age)
		}
		if now.Before(f.due) {
			continue
		}
		delete(r.pending, k)
		kick.Peers = append(kick.Peers, wgtypes.PeerConfig{PublicKey: k, UpdateOnly: true, PersistentKeepaliveInterval: new(handshakeKick)}, keepaliveOff(k))
		kicked = append(kicked, p.Node)
	}
	if len(kick.Peers) > 0 {
		log := r.logger().With("dev", name, "kicked", kicked, "recreated", recreated)
		if err := r.Client.ConfigureDevice(name, kick); err != nil {
			log.Warn("wireguard handshake follow-up", "err", err)
		} else {
			log.Debug("wireguard handshake follow-up: an initiation lost, or two crossed")
		}
	}
	r.arm(now)
}

// diff returns the configuration request that turns cur into c (nil when none is needed),
// the peers it kicks (new peers we lead, and with a new private key every peer we lead),
// the new peers the other side leads, and what the request changes. A kicked peer is added
// (or updated) with handshakeKick, and its keepalive is off again at the end of the
// request. Pure, so the interesting cases are table tests.
func diff(c Config, cur *wgtypes.Device) (wc *wgtypes.Config, lead, follow []wgtypes.Key, ch Changes) {
	wc = &wgtypes.Config{}
	self := c.PrivateKey.PublicKey()
	var settle []wgtypes.PeerConfig
	if cur.PrivateKey != c.PrivateKey {
		wc.PrivateKey, ch.PrivateKey = new(c.PrivateKey), true
	}
	rekeyed := ch.PrivateKey || c.KeyReplaced
	if cur.ListenPort != c.ListenPort {
		wc.ListenPort, ch.ListenPort = new(c.ListenPort), true
	}
	var psk wgtypes.Key
	if c.PresharedKey != nil {
		psk = *c.PresharedKey
	}
	have := make(map[wgtypes.Key]*wgtypes.Peer, len(cur.Peers))
	for i := range cur.Peers {
		have[cur.Peers[i].PublicKey] = &cur.Peers[i]
	}
	want := make(map[wgtypes.Key]bool, len(c.Peers))
	for _, p := range c.Peers {
		want[p.PublicKey] = true
		h, ok := have[p.PublicKey]
		leader := leads(self, p.PublicKey)
		if leader && (!ok || rekeyed) {
			lead = append(lead, p.PublicKey)
			settle = append(settle, keepaliveOff(p.PublicKey))
		}
		if !ok {
			wc.Peers = append(wc.Peers, newPeer(p, c.PresharedKey, leader))
			if !leader {
				follow = append(follow, p.PublicKey)
			}
			ch.Added = append(ch.Added, p.Node)
			continue
		}
		pc := wgtypes.PeerConfig{PublicKey: p.PublicKey, UpdateOnly: true}
		changed := false
		if endpoint(h.Endpoint) != p.Endpoint {
			pc.Endpoint, changed = net.UDPAddrFromAddrPort(p.Endpoint), true
		}
		if !samePrefixes(h.AllowedIPs, p.AllowedIPs) {
			pc.ReplaceAllowedIPs, pc.AllowedIPs, changed = true, ipNets(p.AllowedIPs), true
		}
		if h.PresharedKey != psk {
			pc.PresharedKey, changed = new(psk), true
		}
		if h.PersistentKeepaliveInterval != 0 {
			pc.PersistentKeepaliveInterval, changed = new(time.Duration(0)), true
		}
		if changed {
			ch.Updated = append(ch.Updated, p.Node)
		}
		if leader && rekeyed {
			pc.PersistentKeepaliveInterval, changed = new(handshakeKick), true
		}
		if changed {
			wc.Peers = append(wc.Peers, pc)
		}
	}
	for _, h := range cur.Peers {
		if !want[h.PublicKey] {
			wc.Peers = append(wc.Peers, wgtypes.PeerConfig{PublicKey: h.PublicKey, Remove: true})
			ch.Removed = append(ch.Removed, h.PublicKey.String())
		}
	}
	wc.Peers = append(wc.Peers, settle...)
	if wc.PrivateKey == nil && wc.ListenPort == nil && len(wc.Peers) == 0 {
		return nil, nil, nil, ch
	}
	return wc, lead, follow, ch
}

// newPeer is the request that adds p, with the keepalive that starts its handshake if kick.
func newPeer(p Peer, psk *wgtypes.Key, kick bool) wgtypes.PeerConfig {
	pc := wgtypes.PeerConfig{
		PublicKey:         p.PublicKey,
		PresharedKey:      new(wgtypes.Key),
		Endpoint:          net.UDPAddrFromAddrPort(p.Endpoint),
		ReplaceAllowedIPs: true,
		AllowedIPs:        ipNets(p.AllowedIPs),
	}
	if psk != nil {
		*pc.PresharedKey = *psk
	}
	if kick {
		pc.PersistentKeepaliveInterval = new(handshakeKick)
	}
	return pc
}

func keepaliveOff(k wgtypes.Key) wgtypes.PeerConfig {
	return wgtypes.PeerConfig{PublicKey: k, UpdateOnly: true, PersistentKeepaliveInterval: new(time.Duration(0))}
}

func endpoint(a *net.UDPAddr) netip.AddrPort {
	if a == nil {
		return netip.AddrPort{}
	}
	ap := a.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func ipNets(ps []netip.Prefix) []net.IPNet {
	out := make([]net.IPNet, len(ps))
	for i, p := range ps {
		out[i] = *netipx.IPNet(p)
	}
	return out
}

// samePrefixes compares the device's allowed IPs with sorted, distinct desired ones.
func samePrefixes(have []net.IPNet, want []netip.Prefix) bool {
	got := make([]netip.Prefix, 0, len(have))
	for i := range have {
		p, ok := netipx.Prefix(&have[i])
		if !ok {
			return false
		}
		got = append(got, p)
	}
	slices.SortFunc(got, comparePrefix)
	return slices.Equal(slices.Compact(got), want)
}

// Overhead is what WireGuard adds to each packet on an IPv4 or IPv6 underlay: the outer IP
// header (20 or 40) and UDP header (8), and WireGuard's data message header and tag (type
// and reserved 4, receiver index 4, counter 8, Poly1305 tag 16). The device's MTU, and the
// pods', is the underlay's MTU minus this.
func Overhead(ipv6Underlay bool) int {
	if ipv6Underlay {
		return 40 + 8 + 32
	}
	return 20 + 8 + 32
}

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
// Scale: one wgctrl read and at most one write per pass, O(peers) to diff; Peers' overlap
// check is O(peers²) prefix comparisons (a few milliseconds at 1,000 peers).
package wireguard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
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
	wc, settle, d := diff(c, cur)
	if wc != nil {
		if err := r.Client.ConfigureDevice(c.Name, *wc); err != nil {
			errs = append(errs, fmt.Errorf("configure device %s: %w", c.Name, err))
		} else {
			d.Created, d.MTU, d.Up = ch.Created, ch.MTU, ch.Up
			ch = d
		}
	}
	// Failing here leaves a keepalive that the next pass sees as drift and removes.
	if wc != nil && settle != nil {
		if err := r.Client.ConfigureDevice(c.Name, *settle); err != nil {
			errs = append(errs, fmt.Errorf("configure device %s: keepalive off after the first handshake: %w", c.Name, err))
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
	if wc, _, ch := diff(c, cur); wc != nil {
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

// handshakeKick is the persistent keepalive a new peer is added with, and settle turns off
// again right after: switching the keepalive on makes WireGuard (wireguard-go and the
// kernel alike) send a keepalive at once, so we start the handshake with a new peer (or a
// peer's new key) instead of waiting for traffic from our side. Without it, a peer that
// rotated its key and sends first has its handshakes dropped until we learn the new key,
// and then retries only after REKEY_TIMEOUT (5 s): TestKeyRotation measured a 5.1 s gap.
const handshakeKick = 25 * time.Second

// diff returns the configuration request that turns cur into c (nil when none is needed),
// the request that turns the new peers' keepalive off again after it (nil without new
// peers), and what they change. Pure, so the interesting cases are table tests.
func diff(c Config, cur *wgtypes.Device) (wc, settle *wgtypes.Config, ch Changes) {
	wc = &wgtypes.Config{}
	if cur.PrivateKey != c.PrivateKey {
		wc.PrivateKey, ch.PrivateKey = new(c.PrivateKey), true
	}
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
		if !ok {
			wc.Peers = append(wc.Peers, wgtypes.PeerConfig{
				PublicKey:                   p.PublicKey,
				PresharedKey:                new(psk),
				Endpoint:                    net.UDPAddrFromAddrPort(p.Endpoint),
				PersistentKeepaliveInterval: new(handshakeKick),
				ReplaceAllowedIPs:           true,
				AllowedIPs:                  ipNets(p.AllowedIPs),
			})
			if settle == nil {
				settle = &wgtypes.Config{}
			}
			settle.Peers = append(settle.Peers, wgtypes.PeerConfig{PublicKey: p.PublicKey, UpdateOnly: true, PersistentKeepaliveInterval: new(time.Duration(0))})
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
			wc.Peers = append(wc.Peers, pc)
			ch.Updated = append(ch.Updated, p.Node)
		}
	}
	for _, h := range cur.Peers {
		if !want[h.PublicKey] {
			wc.Peers = append(wc.Peers, wgtypes.PeerConfig{PublicKey: h.PublicKey, Remove: true})
			ch.Removed = append(ch.Removed, h.PublicKey.String())
		}
	}
	if wc.PrivateKey == nil && wc.ListenPort == nil && len(wc.Peers) == 0 {
		return nil, nil, ch
	}
	return wc, settle, ch
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

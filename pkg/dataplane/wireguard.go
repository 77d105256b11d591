package dataplane

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/netagent/netagent/pkg/netipx"
	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/pkg/wgguard"
	"github.com/netagent/netagent/pkg/wireguard"
	"github.com/netagent/netagent/pkg/wireguard/device"
	"github.com/netagent/netagent/pkg/wireguard/key"
)

// WireGuardOptions are the node-local parts of the WireGuard backend, which the plan does
// not carry: where the private key is, and how the device is made.
type WireGuardOptions struct {
	KeyDir string // the agent's state directory, holding key.FileName
	// Impl is "auto" (the kernel's WireGuard where it has one, else userspace), "kernel"
	// or "userspace".
	Impl string
	// Daemon is the path of netagent-wireguard, started for a userspace device when none
	// answers on its socket; its log goes to KeyDir. device.External: someone else runs
	// it (its own container), the agent only waits for its socket.
	Daemon string
	// Device is the node's WireGuard interface (empty: plan.DefaultWGDev): a plan without
	// WireGuard removes it, left over from when the backend was wireguard.
	Device string
}

// WGStatus is the WireGuard device as the kernel (or the daemon) has it, for status and
// metrics.
type WGStatus struct {
	Device    string
	Impl      device.Impl
	PublicKey string
	Port      int
	Peers     []WGPeerStatus
}

// WGPeerStatus is one peer of the device; Node is "" for a peer the plan does not want.
type WGPeerStatus struct {
	Node string
	wireguard.PeerStats
}

// wgState is the dataplane's WireGuard device: its reconciler, and the desired state of
// the last Set for deltas and drift checks. mu guards everything: Set runs on the loop,
// the drift poll and Status on their own goroutines.
type wgState struct {
	opt WireGuardOptions
	h   *netlink.Handle
	log *slog.Logger

	mu     sync.Mutex
	client *wgctrl.Client
	impl   device.Impl
	rec    *wireguard.Reconciler
	name   string         // the device the reconciler was made for
	dev    *plan.WGDevice // the last one set; nil: none
	peers  map[string]plan.WGPeer
	want   *wireguard.Config // what the device was last made to hold
	nodes  map[string]string // public key -> node
	guard  *wgguard.Guard
	// rekeyed: key gave the device a new private key; the next Set kicks the peers it
	// leads (wireguard.Config.KeyReplaced).
	rekeyed bool
}

// UseWireGuard enables the WireGuard backend's device handling (the plan decides whether
// there is a device at all).
func (d *Linux) UseWireGuard(o WireGuardOptions) {
	d.wg = &wgState{opt: o, h: d.h, log: d.log, peers: map[string]plan.WGPeer{}}
}

// reconciler returns the device's reconciler, choosing the implementation the first time
// (or when the device's name changed).
func (w *wgState) reconciler(dev *plan.WGDevice) (*wireguard.Reconciler, error) {
	if w.rec != nil && w.name == dev.Name {
		return w.rec, nil
	}
	if w.client == nil {
		c, err := wgctrl.New()
		if err != nil {
			return nil, fmt.Errorf("wireguard control: %w", err)
		}
		w.client = c
	}
	impl, created, err := device.Choose(w.h, dev.Name, w.opt.Impl)
	if err != nil {
		return nil, err
	}
	var ens wireguard.Ensurer
	switch impl.Kind {
	case device.Kernel:
		ens = device.KernelDevice{Links: w.h, Name: dev.Name}
	default:
		bin := w.opt.Daemon
		if bin == "" {
			bin = DaemonBinary()
		}
		ens = &device.Daemon{Binary: bin, Name: dev.Name, MTU: dev.MTU, LogPath: filepath.Join(w.opt.KeyDir, "netagent-wireguard-"+dev.Name+".log"), Log: w.log,
			External: bin == device.External}
	}
	w.log.Info("wireguard implementation", "dev", dev.Name, "impl", impl.Kind, "why", impl.Reason, "created", created)
	if w.rec != nil {
		w.rec.Stop() // the device it followed up on was renamed
	}
	w.impl, w.name = impl, dev.Name
	w.rec = &wireguard.Reconciler{Client: w.client, Links: w.h, Device: ens, Log: w.log}
	if g, err := w.guardLocked(); err == nil {
		w.rec.Handshakes = g
	} else {
		w.log.Warn("wireguard: no record of handshake messages (a new peer whose first initiation was lost waits a second, crossed handshakes 5 s)", "err", err)
	}
	return w.rec, nil
}

// WireGuardKey returns the public key of the node's WireGuard private key, creating the key
// on first use; with rotate it replaces the key first and, when device dev already exists,
// gives it the new key at once: peers learn the new public key from the lease published
// next, and a handshake they start then must find the device already holding it (else it
// is dropped, and WireGuard retries only after 5 s). The private key never leaves here.
func (d *Linux) WireGuardKey(dev string, rotate bool) (pub string, created bool, err error) {
	if d.wg == nil {
		return "", false, errors.New("wireguard backend: the dataplane was not given WireGuard options")
	}
	if !rotate {
		return d.wg.loadKey()
	}
	pub, err = d.wg.rotateKey(dev)
	return pub, false, err
}

func (w *wgState) loadKey() (string, bool, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.opt.KeyDir == "" {
		return "", false, errNoKeyDir
	}
	k, created, err := key.LoadOrCreate(w.opt.KeyDir)
	if err != nil {
		return "", false, fmt.Errorf("wireguard key: %w", err)
	}
	if created {
		w.log.Info("wireguard key created", "dir", w.opt.KeyDir, "publicKey", k.PublicKey().String())
	}
	return k.PublicKey().String(), created, nil
}

var errNoKeyDir = errors.New("wireguard backend: no state directory for the private key (--state-dir)")

func (w *wgState) rotateKey(dev string) (string, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.opt.KeyDir == "" {
		return "", errNoKeyDir
	}
	k, err := key.Rotate(w.opt.KeyDir)
	if err != nil {
		return "", fmt.Errorf("rotate the WireGuard key: %w", err)
	}
	w.log.Info("wireguard key rotated", "dir", w.opt.KeyDir, "publicKey", k.PublicKey().String())
	if _, err := w.h.LinkByName(dev); err != nil {
		return k.PublicKey().String(), nil // no device yet: the first pass makes it with this key
	}
	if w.client == nil {
		c, err := wgctrl.New()
		if err != nil {
			return "", fmt.Errorf("wireguard control: %w", err)
		}
		w.client = c
	}
	if err := w.client.ConfigureDevice(dev, wgtypes.Config{PrivateKey: &k}); err != nil {
		return "", fmt.Errorf("give %s its new key: %w", dev, err)
	}
	w.rekeyed = true
	return k.PublicKey().String(), nil
}

// PrepareWireGuard makes the node's WireGuard device exist (for a userspace one: starts
// its daemon and waits for it), ahead of the first Set: a new node's daemon takes a few
// hundred milliseconds to come up, which would otherwise follow the lease, the peers' list
// and the plan, while the peers already send it handshakes. Nothing else is set here (no
// key, port or peers: an existing device keeps its peers, so a restart stays hitless);
// Set serialises with it and finds the device there. The agent runs it on a goroutine of
// its own; the daemon starts in the caller's network namespace.
func (d *Linux) PrepareWireGuard(ctx context.Context, dev *plan.WGDevice) {
	if d.wg == nil || dev == nil {
		return
	}
	d.wg.prepare(ctx, *dev)
}

// GuardWireGuard sets the WireGuard underlay guard ahead of the lease: peers that learn of
// the node send their handshakes at once, and the guard records those the device (not up
// yet, or not knowing them) drops. A failure is logged; the first pass sets the guard.
func (d *Linux) GuardWireGuard(dev *plan.WGDevice) {
	if d.wg == nil || dev == nil {
		return
	}
	d.wg.mu.Lock()
	defer d.wg.mu.Unlock()
	if err := d.wg.ensureGuard(dev); err != nil {
		d.wg.log.Warn("wireguard underlay guard not set ahead of the lease (the first pass sets it)", "err", err)
	}
}

func (w *wgState) prepare(ctx context.Context, dev plan.WGDevice) {
	w.mu.Lock()
	defer w.mu.Unlock()
	rec, err := w.reconciler(&dev)
	if err == nil {
		_, err = rec.Device.Ensure(ctx)
	}
	if err != nil && ctx.Err() == nil {
		w.log.Warn("wireguard device not made ahead of the first pass (the pass makes it)", "dev", dev.Name, "err", err)
	}
}

// DaemonBinary is netagent-wireguard next to the running executable, else on PATH.
func DaemonBinary() string {
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "netagent-wireguard")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return "netagent-wireguard"
}

// sync makes the device hold dev and peers (dev nil: nothing is wanted; prune removes an
// existing device once the routes left it).
func (w *wgState) sync(ctx context.Context, dev *plan.WGDevice, peers []plan.WGPeer) (wireguard.Changes, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.peers = make(map[string]plan.WGPeer, len(peers))
	for _, p := range peers {
		w.peers[p.Node] = p
	}
	if dev == nil {
		w.dev, w.want = nil, nil
		return wireguard.Changes{}, nil
	}
	d := *dev
	w.dev = &d
	return w.setLocked(ctx)
}

// apply changes the peers a delta names and sets the device again.
func (w *wgState) apply(ctx context.Context, changes []plan.WGPeerChange) (wireguard.Changes, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.dev == nil {
		return wireguard.Changes{}, fmt.Errorf("%w: no WireGuard device set yet", ErrStale)
	}
	for _, c := range changes {
		if c.Del {
			delete(w.peers, c.Node)
		} else {
			w.peers[c.Node] = c.Peer
		}
	}
	return w.setLocked(ctx)
}

func (w *wgState) setLocked(ctx context.Context) (wireguard.Changes, error) {
	dev := w.dev
	rec, err := w.reconciler(dev)
	if err != nil {
		return wireguard.Changes{}, err
	}
	priv, _, err := key.LoadOrCreate(w.opt.KeyDir)
	if err != nil {
		return wireguard.Changes{}, err
	}
	c := wireguard.Config{Name: dev.Name, PrivateKey: priv, ListenPort: dev.Port, MTU: dev.MTU, KeyReplaced: w.rekeyed}
	if dev.PSKFile != "" {
		psk, err := key.LoadPSK(dev.PSKFile)
		if err != nil {
			return wireguard.Changes{}, err
		}
		c.PresharedKey = &psk
	}
	specs := make([]wireguard.PeerSpec, 0, len(w.peers))
	for _, p := range w.peers {
		var allowed []string
		for _, a := range p.AllowedIPs() {
			allowed = append(allowed, a.String())
		}
		specs = append(specs, wireguard.PeerSpec{Node: p.Node, PublicKey: p.PublicKey, Endpoint: p.Endpoint.String(), AllowedIPs: allowed})
	}
	// The plan decided on checked leases; checked again here as the device's own input (a
	// peer left out is reported, the rest configured).
	var errs []error
	c.Peers, err = wireguard.Peers(wireguard.Self{PublicKey: priv.PublicKey(), Network: dev.Network, Network6: dev.Network6, Subnet: dev.Subnet, Subnet6: dev.Subnet6}, specs)
	if err != nil {
		errs = append(errs, err)
	}
	w.nodes = make(map[string]string, len(c.Peers))
	for _, p := range c.Peers {
		w.nodes[p.PublicKey.String()] = p.Node
	}
	ch, err := rec.Set(ctx, c)
	if err != nil {
		w.want = nil
		return ch, errors.Join(append(errs, err)...)
	}
	w.rekeyed = false
	w.want = &c
	if err := w.ensureAddr(dev); err != nil {
		errs = append(errs, err)
	}
	if err := w.ensureGuard(dev); err != nil {
		errs = append(errs, err)
	}
	return ch, errors.Join(errs...)
}

// ensureAddr puts the device's addresses on it, one per family the plan gives it, and takes
// any other address of those families off (IPv6 link-local addresses stay: the kernel's).
func (w *wgState) ensureAddr(dev *plan.WGDevice) error {
	l, err := w.h.LinkByName(dev.Name)
	if err != nil {
		return fmt.Errorf("wireguard device %s: %w", dev.Name, err)
	}
	var errs []error
	for _, f := range []struct {
		family int
		want   netip.Prefix
	}{{unix.AF_INET, dev.Addr}, {unix.AF_INET6, dev.Addr6}} {
		addrs, err := w.h.AddrList(l, f.family)
		if err != nil {
			errs = append(errs, fmt.Errorf("addresses of %s: %w", dev.Name, err))
			continue
		}
		have := false
		for _, a := range addrs {
			p, ok := netipx.Prefix(a.IPNet)
			switch {
			case ok && p == f.want:
				have = true
			case ok && p.Addr().IsLinkLocalUnicast():
			default:
				if err := w.h.AddrDel(l, &a); err != nil {
					errs = append(errs, fmt.Errorf("delete address %s from %s: %w", a.IPNet, dev.Name, err))
				}
			}
		}
		if !have && f.want.IsValid() {
			// No duplicate address detection: the address is usable at once, and nothing
			// else on a point-to-point device can claim it.
			a := &netlink.Addr{IPNet: netipx.IPNet(f.want)}
			if f.want.Addr().Is6() {
				a.Flags = unix.IFA_F_NODAD
			}
			if err := w.h.AddrAdd(l, a); err != nil {
				errs = append(errs, fmt.Errorf("add address %s to %s: %w", f.want, dev.Name, err))
			}
		}
	}
	return errors.Join(errs...)
}

func (w *wgState) ensureGuard(dev *plan.WGDevice) error {
	g, err := w.guardLocked()
	if err != nil {
		return err
	}
	return g.Set(wgguard.Spec{Underlay: dev.Underlay, Network: dev.Network, Network6: dev.Network6, Routable6: dev.Routable6, Port: uint16(dev.Port)})
}

// guardLocked returns the underlay guard, opening its netlink connection the first time.
func (w *wgState) guardLocked() (*wgguard.Guard, error) {
	if w.guard == nil {
		g, err := wgguard.New()
		if err != nil {
			return nil, err
		}
		w.guard = g
	}
	return w.guard, nil
}

// pruneTimeout bounds the wait for a userspace device's daemon to close its socket once
// its device is deleted.
const pruneTimeout = 2 * time.Second

// prune removes what the wireguard backend left when the plan names no device (the backend
// changed, whether in this run or before a restart): the node's WireGuard device (for a
// userspace one its daemon then exits and unlinks its socket; a stale socket file is
// removed) and the underlay guard's table. The caller runs it after the routes left the
// device. A link of that name that is not a WireGuard device is not netagent's and stays.
func (w *wgState) prune(ctx context.Context) (wireguard.Changes, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	var ch wireguard.Changes
	var errs []error
	name := w.opt.Device
	if name == "" {
		name = plan.DefaultWGDev
	}
	names := []string{name}
	if w.name != "" && w.name != name {
		names = append(names, w.name) // a device an earlier plan of this run named
	}
	for _, name := range names {
		removed, err := w.removeDevice(ctx, name)
		ch.Pruned = ch.Pruned || removed
		if err != nil {
			errs = append(errs, err)
		}
	}
	if w.rec != nil {
		w.rec.Stop()
	}
	w.rec, w.name, w.impl = nil, "", device.Impl{}
	g, err := w.guardLocked()
	if err != nil {
		return ch, errors.Join(append(errs, err)...)
	}
	// The zero spec deletes the table; once written it costs one table lookup per Set.
	if err := g.Set(wgguard.Spec{}); err != nil {
		errs = append(errs, err)
	}
	return ch, errors.Join(errs...)
}

// removeDevice deletes the WireGuard device name if it exists, and waits for a userspace
// device's socket to go.
func (w *wgState) removeDevice(ctx context.Context, name string) (bool, error) {
	l, err := w.h.LinkByName(name)
	if err != nil {
		if !errors.As(err, new(netlink.LinkNotFoundError)) {
			return false, fmt.Errorf("look up wireguard device %s: %w", name, err)
		}
		if !device.SocketLive(name) {
			removeStaleSocket(name)
		}
		return false, nil
	}
	kind := l.Type()
	if kind != "wireguard" && kind != "tuntap" {
		w.log.Warn("not removing a link named like the WireGuard device: it is not one", "dev", name, "kind", kind)
		return false, nil
	}
	if err := w.h.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
		return false, fmt.Errorf("delete wireguard device %s: %w", name, err)
	}
	w.log.Info("wireguard device removed", "dev", name, "kind", kind, "reason", "not in the plan")
	if kind == "tuntap" {
		ctx, cancel := context.WithTimeout(ctx, pruneTimeout)
		defer cancel()
		t := time.NewTicker(10 * time.Millisecond)
		defer t.Stop()
		for device.SocketLive(name) {
			select {
			case <-ctx.Done():
				return true, fmt.Errorf("wireguard device %s removed, but its daemon still answers on %s: %w", name, device.SocketPath(name), ctx.Err())
			case <-t.C:
			}
		}
		removeStaleSocket(name)
	}
	return true, nil
}

// removeStaleSocket removes name's socket file, which nobody answers on.
func removeStaleSocket(name string) {
	_ = os.Remove(device.SocketPath(name))
}

// drifted reports why the device differs from what the last Set made it ("": it does
// not, or nothing was set).
func (w *wgState) drifted() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.want == nil || w.rec == nil {
		return ""
	}
	if why := w.rec.Drifted(*w.want); why != "" {
		return why
	}
	if w.guard != nil {
		if why := w.guard.Drifted(); why != "" {
			return why
		}
	}
	return ""
}

// status reads the device.
func (w *wgState) status() (WGStatus, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.dev == nil || w.client == nil {
		return WGStatus{}, false
	}
	st := WGStatus{Device: w.dev.Name, Impl: w.impl, Port: w.dev.Port}
	if w.want != nil {
		st.PublicKey = w.want.PrivateKey.PublicKey().String()
	}
	ps, err := wireguard.Stats(w.client, w.dev.Name)
	if err != nil {
		return st, true
	}
	for _, p := range ps {
		st.Peers = append(st.Peers, WGPeerStatus{Node: w.nodes[p.PublicKey], PeerStats: p})
	}
	return st, true
}

// pollWireGuard checks the device every interval until ctx ends and signals changed on
// drift: neither implementation announces a removed peer or a changed endpoint.
func (d *Linux) pollWireGuard(ctx context.Context, changed chan<- struct{}, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if why := d.wg.drifted(); why != "" {
				d.log.Info("wireguard drift", "dev", d.wgDev.Load(), "what", why)
				signal(changed)
			}
		}
	}
}

// pruneWireGuard removes a leftover WireGuard device when p names none (see wgState.prune).
func (d *Linux) pruneWireGuard(ctx context.Context, p plan.Plan, st *Stats) error {
	if p.WireGuard != nil || d.wg == nil {
		return nil
	}
	ch, err := d.wg.prune(ctx)
	st.WireGuard.Pruned = ch.Pruned
	return err
}

// WireGuard returns the WireGuard device's state (false: the node has none).
func (d *Linux) WireGuard() (WGStatus, bool) {
	if d.wg == nil {
		return WGStatus{}, false
	}
	return d.wg.status()
}

package dataplane

import (
	"context"
	"time"

	"github.com/vishvananda/netlink"
)

// Watch feeds netlink notifications into the reconcilers' mirrors until ctx ends, and
// signals changed when one differs from a mirror: someone else changed or removed a route
// with our protocol number, a neighbour or FDB entry on the VXLAN device, or the VXLAN or
// underlay device itself (the kernel drops routes of a device that goes down without
// notifying each, so a link event invalidates the mirrors). Echoes of our own writes and
// pod veths coming and going signal nothing. When a subscription breaks (e.g. the socket
// overflowed) the mirrors are invalidated, changed is signalled and it subscribes again.
func (d *Linux) Watch(ctx context.Context, changed chan<- struct{}) {
	if d.wg != nil {
		go d.pollWireGuard(ctx, changed, WireGuardPoll)
	}
	for ctx.Err() == nil {
		d.watchOnce(ctx, changed)
		d.Invalidate(Tables)
		signal(changed)
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (d *Linux) watchOnce(ctx context.Context, changed chan<- struct{}) {
	done := make(chan struct{})
	defer close(done)
	// Bursts queue in the sockets' receive buffers (kernel memory), not here: the channels
	// only decouple parsing from Observe, and route updates are a few hundred bytes each,
	// held in the agent's heap for as long as it runs.
	routes := make(chan netlink.RouteUpdate, 64)
	neighs := make(chan netlink.NeighUpdate, 64)
	links := make(chan netlink.LinkUpdate, 16)
	addrs := make(chan netlink.AddrUpdate, 16)
	onErr := func(error) { d.Invalidate(Tables); signal(changed) }
	// Large receive buffers (forced past rmem_max, we have CAP_NET_ADMIN): a cold start
	// with thousands of peers echoes tens of thousands of notifications at once; an
	// overflow is handled (a full resync), but costs a pass.
	const rcvbuf = 8 << 20
	if err := netlink.RouteSubscribeWithOptions(routes, done, netlink.RouteSubscribeOptions{ErrorCallback: onErr, ReceiveBufferSize: rcvbuf, ReceiveBufferForceSize: true}); err != nil {
		d.log.Warn("route subscription failed", "err", err)
		return
	}
	if err := netlink.NeighSubscribeWithOptions(neighs, done, netlink.NeighSubscribeOptions{ErrorCallback: onErr, ReceiveBufferSize: rcvbuf, ReceiveBufferForceSize: true}); err != nil {
		d.log.Warn("neighbour subscription failed", "err", err)
		return
	}
	if err := netlink.LinkSubscribeWithOptions(links, done, netlink.LinkSubscribeOptions{ErrorCallback: onErr}); err != nil {
		d.log.Warn("link subscription failed", "err", err)
		return
	}
	if err := netlink.AddrSubscribeWithOptions(addrs, done, netlink.AddrSubscribeOptions{ErrorCallback: onErr}); err != nil {
		d.log.Warn("address subscription failed", "err", err)
		return
	}
	for {
		select {
		case <-ctx.Done():
			return
		case u, ok := <-routes:
			if !ok {
				return
			}
			if d.route.Observe(u) {
				signal(changed)
			}
		case u, ok := <-neighs:
			if !ok {
				return
			}
			if d.vxlan.Observe(u) {
				signal(changed)
			}
		case u, ok := <-links:
			if !ok {
				return
			}
			// The underlay is read afresh (a changed MTU flows to the VXLAN device and pods).
			if name := u.Attrs().Name; name == d.vxDev.Load() || name == d.ulDev.Load() || name == d.wgDev.Load() || u.Attrs().Index == d.vxlan.Device() {
				d.Invalidate(Tables)
				signal(changed)
			}
		case u, ok := <-addrs:
			if !ok {
				return
			}
			// An underlay address that appears, or finishes duplicate address detection,
			// after the start may be one the lease lacks: the pass re-reads the underlay.
			if i := d.ulIndex.Load(); i != 0 && int64(u.LinkIndex) == i {
				signal(changed)
			}
		}
	}
}

// WireGuardPoll is how often the WireGuard device is compared with the plan: neither
// implementation announces changes, and drift must be repaired within a second.
const WireGuardPoll = 250 * time.Millisecond

func signal(ch chan<- struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

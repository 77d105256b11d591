package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/docker"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/plan"
)

// DockerMode says how a Docker host uses the leased subnet.
type DockerMode struct {
	ConfigPath string // write bip/mtu into this daemon.json, then wait for Bridge to carry it
	Network    string // or create this user-defined bridge network (via Socket)
	Socket     string // Docker Engine API socket
	Bridge     string // the default bridge: it must carry the subnet unless Network is set (default docker0)
	ProcRoot   string // where to look for dockerd's command line (default /proc)

	adopt   netip.Prefix  // the subnet Bridge had at start, offered as the lease hint
	retry   time.Duration // the loop's backoff between failed Docker steps
	failing string        // the last failure logged
	bridge6 atomic.Int32  // link index of the bridge carrying the IPv6 gateway (0: none seen)
}

// dockerHint is the lease hint of a Docker host that already runs containers: the subnet
// its bridge has, so that it need not be renumbered (the store grants it when it is free,
// inside the network and of the network's subnet length).
func (a *Agent) dockerHint(log *slog.Logger) netip.Prefix {
	d := a.opt.Docker
	if d == nil || d.Network != "" {
		return netip.Prefix{}
	}
	d.adopt = docker.BridgeSubnet(a.h, d.Bridge)
	if d.adopt.IsValid() {
		log.Info("asking for the subnet the docker bridge already has", "dev", d.Bridge, "subnet", d.adopt)
	}
	return d.adopt
}

// kickDocker asks runDocker to make Docker use the lease of a full pass's plan.
func (a *Agent) kickDocker(self lease.Lease, p plan.Plan) {
	j := &a.dockerJob
	j.Lock()
	j.self, j.p = self, plan.Plan{PodMTU: p.PodMTU, NAT: p.NAT}
	j.Unlock()
	signal(a.dockerKick)
}

// runDocker is the Docker step's loop: after every successful full pass (a network
// removed by hand is recreated, a bridge renumbered by hand is reported), and again after
// the retry delay while it fails, until ctx ends. Its first success makes the agent ready.
func (a *Agent) runDocker(ctx context.Context, log *slog.Logger) {
	var retry <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.dockerKick:
		case <-retry:
		}
		retry = nil
		j := &a.dockerJob
		j.Lock()
		self, p := j.self, j.p
		j.Unlock()
		if !self.Subnet.IsValid() && !self.Subnet6.IsValid() {
			continue // kicked before the first full pass: nothing to apply yet
		}
		if a.dockerPass(ctx, log, self, p) {
			a.dockerOK.Store(true)
			a.in.post(rDocker)
		} else {
			retry = time.After(a.opt.Docker.retry)
		}
	}
}

// dockerPass makes Docker use the lease and reports whether it does. Failures set the
// retry delay (1 s doubling to 30 s) and are logged when they change.
func (a *Agent) dockerPass(ctx context.Context, log *slog.Logger, self lease.Lease, p plan.Plan) bool {
	d := a.opt.Docker
	err := a.dockerStep(ctx, log, self, p)
	if err == nil {
		if d.failing != "" {
			log.Info("docker uses the leased subnet", "subnet", self.Subnet)
		}
		if self.Subnet6.IsValid() {
			a.dockerSkipDAD(log, self)
		}
		d.failing, d.retry = "", 0
		a.clearError("docker")
		return true
	}
	a.setError("docker", err)
	a.opt.Metrics.Errors.WithLabelValues("docker").Inc()
	d.retry = min(max(2*d.retry, time.Second), 30*time.Second)
	if msg := err.Error(); msg != d.failing {
		log.Warn("docker is not on the leased subnet", "subnet", self.Subnet, "err", err, "retry", d.retry)
		d.failing = msg
	} else {
		log.Debug("docker is not on the leased subnet", "subnet", self.Subnet, "err", err, "retry", d.retry)
	}
	return false
}

// dockerStep makes Docker use the leased subnet (route mode): write daemon.json and wait
// for the bridge to carry it, create a network, or check the bridge.
func (a *Agent) dockerStep(ctx context.Context, log *slog.Logger, self lease.Lease, p plan.Plan) error {
	d := a.opt.Docker
	if !self.Subnet.IsValid() {
		return fmt.Errorf("the cluster network is IPv6-only (leased %s), and Docker has no IPv6-only bridge network: give the network an IPv4 part too (\"network\" beside \"ipv6Network\") for Docker hosts", self.Subnet6)
	}
	switch {
	case d.ConfigPath != "":
		if c := docker.FlagConflicts(or(d.ProcRoot, "/proc"), d.ConfigPath); len(c) > 0 {
			return fmt.Errorf("dockerd (%s) sets bip or mtu on its command line, and with them also in %s it refuses to start: remove the flags from its command line (systemctl edit docker), or drop --write-docker-config and start dockerd with --bip=%s --mtu=%d",
				strings.Join(c, "; "), d.ConfigPath, docker.Gateway(self.Subnet), p.PodMTU)
		}
		changed, err := docker.WriteConfig(d.ConfigPath, dockerSubnets(self), p.PodMTU)
		if err != nil {
			return err
		}
		if changed {
			log.Info("wrote the leased subnet into docker's config; (re)start dockerd to apply it", "file", d.ConfigPath, "bip", docker.Gateway(self.Subnet), "fixed-cidr-v6", self.Subnet6, "mtu", p.PodMTU)
		}
		if err := docker.CheckBridge(a.h, d.Bridge, dockerSubnets(self)); err != nil {
			have := docker.BridgeSubnet(a.h, d.Bridge)
			if !have.IsValid() {
				return err
			}
			return fmt.Errorf("%s is on %s, not the leased %s: %s has bip %s now, restart dockerd to apply it%s",
				d.Bridge, have, self.Subnet, d.ConfigPath, docker.Gateway(self.Subnet), a.notAdopted(self, p))
		}
		return nil
	case d.Network != "":
		err := docker.NewClient(d.Socket).EnsureNetwork(ctx, d.Network, dockerSubnets(self), p.PodMTU)
		if err != nil && strings.Contains(err.Error(), "overlaps") {
			if dev, addr := docker.Holder(a.h, self.Subnet); dev != "" {
				return fmt.Errorf("the leased %s is already on %s (%s), so Docker cannot create network %s: if that is docker0 with bip from --write-docker-config, remove bip from daemon.json and restart dockerd: %w",
					self.Subnet, dev, addr, d.Network, err)
			}
		}
		return err
	default:
		if err := docker.CheckBridge(a.h, d.Bridge, dockerSubnets(self)); err != nil {
			return fmt.Errorf("%w%s", err, a.notAdopted(self, p))
		}
		return nil
	}
}

// dockerSubnets are the subnets of the lease in the form the docker package takes.
func dockerSubnets(self lease.Lease) docker.Subnets {
	return docker.Subnets{V4: self.Subnet, V6: self.Subnet6}
}

// notAdopted says why the bridge's own subnet did not become the lease, if it did not.
func (a *Agent) notAdopted(self lease.Lease, p plan.Plan) string {
	have := a.opt.Docker.adopt
	switch {
	case !have.IsValid() || have == self.Subnet:
		return ""
	case !p.NAT.Network.Contains(have.Addr()):
		return fmt.Sprintf(" (its %s is outside the cluster network %s, so it could not be kept)", have, p.NAT.Network)
	case have.Bits() != self.Subnet.Bits():
		return fmt.Sprintf(" (its %s is not a /%d, the network's subnet length, so it could not be kept)", have, self.Subnet.Bits())
	default:
		return fmt.Sprintf(" (its %s is leased or reserved by another node, so it could not be kept; `netagent status` shows who holds it)", have)
	}
}

// dockerSkipDAD takes the IPv6 addresses of the bridge carrying the leased IPv6 gateway out
// of duplicate address detection (docker.SkipDAD), and remembers the bridge for
// watchDockerAddrs. A failure is logged, not a failed step: IPv6 works after DAD anyway.
func (a *Agent) dockerSkipDAD(log *slog.Logger, self lease.Lease) {
	dev, _ := docker.Holder(a.h, self.Subnet6)
	if dev == "" {
		return
	}
	if l, err := a.h.LinkByName(dev); err == nil {
		a.opt.Docker.bridge6.Store(int32(l.Attrs().Index))
	}
	done, err := docker.SkipDAD(a.h, dev)
	if len(done) > 0 {
		log.Info("docker bridge's IPv6 addresses usable at once (added again without duplicate address detection)", "dev", dev, "addrs", done)
	}
	if err != nil {
		log.Warn("docker bridge's IPv6 addresses left in duplicate address detection", "dev", dev, "err", err)
	}
}

// watchDockerAddrs runs the Docker step when an IPv6 address in duplicate address
// detection appears in the leased IPv6 subnet or on the bridge carrying it: Docker adds the
// bridge's at its start, and the step takes them out of DAD before a container waits for
// it (the step's own retry comes a second or more later).
func (a *Agent) watchDockerAddrs(ctx context.Context, log *slog.Logger) {
	for ctx.Err() == nil {
		updates := make(chan netlink.AddrUpdate, 64)
		done := make(chan struct{})
		if err := netlink.AddrSubscribeWithOptions(updates, done, netlink.AddrSubscribeOptions{ErrorCallback: func(error) {}}); err != nil {
			log.Warn("address subscription for the docker bridge failed", "err", err)
		} else {
			a.watchDockerUpdates(ctx, updates)
		}
		close(done)
		signal(a.dockerKick) // events may have been lost
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

func (a *Agent) watchDockerUpdates(ctx context.Context, updates <-chan netlink.AddrUpdate) {
	for {
		select {
		case <-ctx.Done():
			return
		case u, ok := <-updates:
			if !ok {
				return
			}
			if !u.NewAddr || u.Flags&unix.IFA_F_TENTATIVE == 0 || u.Flags&unix.IFA_F_NODAD != 0 {
				continue
			}
			ip, _ := netip.AddrFromSlice(u.LinkAddress.IP)
			j := &a.dockerJob
			j.Lock()
			sub6 := j.self.Subnet6
			j.Unlock()
			if sub6.IsValid() && (sub6.Contains(ip.Unmap()) || int32(u.LinkIndex) == a.opt.Docker.bridge6.Load()) {
				signal(a.dockerKick)
			}
		}
	}
}

package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// ipForward is the node's IPv4 forwarding switch; without it every packet a pod sends to
// another node (and every one it receives from one) is dropped.
const ipForward = "/proc/sys/net/ipv4/ip_forward"

// checkForwarding reads net.ipv4.ip_forward (in the agent's network namespace) and, when
// it is off, switches it on again (Options.RepairForwarding) or reports it: a Warn on each
// change, netagent_ip_forward, the "forwarding" error in status and /readyz. It runs on
// every full pass and whenever the kernel announces a forwarding change.
func (a *Agent) checkForwarding(log *slog.Logger) {
	on, err := readForwarding()
	// On a Docker host dockerd switches forwarding on, and only when it does so itself
	// does it set FORWARD's policy to DROP: the agent reports there and never writes.
	repair := a.opt.RepairForwarding && a.opt.Docker == nil
	if err == nil && !on && repair {
		if err = os.WriteFile(ipForward, []byte("1"), 0o644); err == nil {
			if a.ready() {
				a.opt.Metrics.Repairs.WithLabelValues("ip-forward").Inc()
				log.Warn("net.ipv4.ip_forward was switched off (pod traffic to and from other nodes was dropped); switched it on again")
			} else {
				log.Info("switched net.ipv4.ip_forward on") // setting up, not a repair
			}
			on, err = readForwarding()
		} else {
			err = fmt.Errorf("switch net.ipv4.ip_forward on: %w", err)
		}
	}
	if err == nil && !on {
		why := "--repair-ip-forward=false"
		if a.opt.Docker != nil {
			why = "route mode: dockerd switches it on when it starts"
		}
		err = fmt.Errorf("net.ipv4.ip_forward is 0: pod traffic to and from other nodes is dropped (%s)", why)
	}
	prev := a.forwardErr
	a.forwardErr = err
	if err != nil {
		a.opt.Metrics.IPForward.Set(0)
		a.setError("forwarding", err)
		if prev == nil || prev.Error() != err.Error() {
			a.opt.Metrics.Errors.WithLabelValues("forwarding").Inc()
			log.Warn("IPv4 forwarding is off on this node", "err", err)
		}
		return
	}
	a.opt.Metrics.IPForward.Set(1)
	if prev != nil {
		a.clearError("forwarding")
		log.Info("IPv4 forwarding is on again")
	}
}

func readForwarding() (bool, error) {
	b, err := os.ReadFile(ipForward)
	if err != nil {
		return false, fmt.Errorf("read %s: %w", ipForward, err)
	}
	return strings.TrimSpace(string(b)) != "0", nil
}

// watchNetconf signals changed on every IPv4 netconf notification (RTM_NEWNETCONF: the
// kernel sends one when net.ipv4.ip_forward, or a device's forwarding, is written), so a
// switched-off forwarding is repaired at once rather than at the next resync.
func watchNetconf(ctx context.Context, log *slog.Logger, changed chan struct{}) {
	s, err := nl.Subscribe(unix.NETLINK_ROUTE, unix.RTNLGRP_IPV4_NETCONF)
	if err != nil {
		log.Warn("no forwarding change notifications; relying on the resync ticker", "err", err)
		return
	}
	defer s.Close()
	// A blocked receive is not woken by close(2): wake twice a second to check ctx.
	tv := unix.NsecToTimeval((500 * time.Millisecond).Nanoseconds())
	_ = s.SetReceiveTimeout(&tv)
	for ctx.Err() == nil {
		msgs, _, err := s.Receive()
		if ctx.Err() != nil {
			return
		}
		switch {
		case err == nil:
			if len(msgs) > 0 {
				signal(changed)
			}
		case errors.Is(err, unix.EAGAIN), errors.Is(err, unix.EINTR):
		case errors.Is(err, unix.ENOBUFS):
			signal(changed) // lost some: check anyway
		default:
			log.Warn("forwarding change notifications stopped; relying on the resync ticker", "err", err)
			return
		}
	}
}

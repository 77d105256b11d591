// Package device decides which WireGuard implementation carries a node's tunnel and makes
// sure its device exists: the kernel's (a link of kind "wireguard", created with
// RTM_NEWLINK) where the kernel has it, else the userspace one (wireguard-go on a TUN
// device, run by netagent-wireguard as a process of its own so that an agent restart does
// not touch the tunnel). Either way the agent configures the device through wgctrl, which
// speaks generic netlink to the kernel and the UAPI socket to the daemon; this package only
// creates, finds and reports.
//
// Ensure is level-triggered and cheap when the device is there (one link lookup, or one
// connect to the socket), so the reconciler calls it on every pass; a deleted device comes
// back on the next one.
package device

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// SocketDir is where wireguard-go puts its UAPI sockets and where wgctrl looks for them;
// both hard-code it, so interface names must be unique among every network namespace that
// shares this mount namespace (a lab of nodes in namespaces on one host).
const SocketDir = "/var/run/wireguard"

// Kind names an implementation.
type Kind string

const (
	Kernel    Kind = "kernel"
	Userspace Kind = "userspace"
)

// Impl is the implementation a node uses and why, for doctor and status.
type Impl struct {
	Kind   Kind
	Reason string
}

func (i Impl) String() string { return string(i.Kind) + " (" + i.Reason + ")" }

// Links is the netlink surface this package needs; a *netlink.Handle opened in the node's
// namespace satisfies it.
type Links interface {
	LinkByName(name string) (netlink.Link, error)
	LinkAdd(link netlink.Link) error
	LinkDel(link netlink.Link) error
}

// SocketPath is the UAPI socket of the userspace device name.
func SocketPath(name string) string { return filepath.Join(SocketDir, name+".sock") }

// ValidName checks an interface name the way the kernel would (IFNAMSIZ), and refuses what
// would escape SocketDir in a socket path.
func ValidName(name string) error {
	switch {
	case name == "" || len(name) > unix.IFNAMSIZ-1:
		return fmt.Errorf("interface name %q: want 1-%d characters", name, unix.IFNAMSIZ-1)
	case name == "." || name == ".." || strings.ContainsAny(name, "/: \t\n"):
		return fmt.Errorf("interface name %q: not a valid interface name", name)
	}
	return nil
}

// SocketLive reports whether a daemon answers on name's UAPI socket. A socket file that
// refuses connections is stale (its daemon died without removing it).
func SocketLive(name string) bool {
	c, err := net.Dial("unix", SocketPath(name))
	if err != nil {
		return false
	}
	_ = c.Close()
	return true
}

// Choose decides the implementation for device name in the namespace links is bound to.
// prefer is "auto", "kernel" or "userspace". An existing link decides by its kind (a TUN is
// a userspace device, adopted); otherwise, unless userspace is preferred, it creates the
// kernel device name: that is the one reliable probe (the wireguard generic netlink family
// appears only once the module is loaded), and on success the device is the one we keep.
// created reports that it made the kernel device.
func Choose(links Links, name, prefer string) (impl Impl, created bool, err error) {
	if err := ValidName(name); err != nil {
		return Impl{}, false, err
	}
	switch prefer {
	case "", "auto", "kernel", "userspace":
	default:
		return Impl{}, false, fmt.Errorf("wireguard implementation %q: want auto, kernel or userspace", prefer)
	}
	if l, err := links.LinkByName(name); err == nil {
		switch l.Type() {
		case "wireguard":
			if prefer == "userspace" {
				return Impl{}, false, fmt.Errorf("%s is a kernel WireGuard device, but userspace is asked for: delete it first", name)
			}
			return Impl{Kernel, "existing kernel device " + name}, false, nil
		case "tuntap":
			if prefer == "kernel" {
				return Impl{}, false, fmt.Errorf("%s is a userspace (TUN) device, but kernel is asked for", name)
			}
			return Impl{Userspace, "existing userspace device " + name}, false, nil
		default:
			return Impl{}, false, fmt.Errorf("%s exists and is a %s link, not a WireGuard device", name, l.Type())
		}
	} else if !isNotFound(err) {
		return Impl{}, false, fmt.Errorf("look up %s: %w", name, err)
	}
	if prefer == "userspace" {
		return Impl{Userspace, "userspace asked for"}, false, nil
	}
	err = links.LinkAdd(&netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: name}})
	if err == nil {
		return Impl{Kernel, "kernel supports link kind wireguard"}, true, nil
	}
	if prefer == "kernel" {
		return Impl{}, false, fmt.Errorf("create kernel WireGuard device %s: %w", name, err)
	}
	return Impl{Userspace, "kernel cannot create a wireguard link (RTM_NEWLINK kind wireguard: " + kernelReason(err) + ")"}, false, nil
}

func kernelReason(err error) string {
	switch {
	case errors.Is(err, unix.EOPNOTSUPP):
		return "operation not supported: no WireGuard module built in or loadable"
	case errors.Is(err, unix.EPERM):
		return "operation not permitted: needs CAP_NET_ADMIN"
	}
	return err.Error()
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf)
}

// KernelDevice makes sure a kernel WireGuard device exists.
type KernelDevice struct {
	Links Links
	Name  string
}

// Ensure creates the device when it is missing; created says it did.
func (k KernelDevice) Ensure(_ context.Context) (created bool, err error) {
	links, name := k.Links, k.Name
	l, err := links.LinkByName(name)
	if err == nil {
		if l.Type() != "wireguard" {
			return false, fmt.Errorf("%s exists and is a %s link, not a kernel WireGuard device", name, l.Type())
		}
		return false, nil
	}
	if !isNotFound(err) {
		return false, fmt.Errorf("look up %s: %w", name, err)
	}
	if err := links.LinkAdd(&netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: name}}); err != nil {
		return false, fmt.Errorf("create kernel WireGuard device %s: %w", name, err)
	}
	return true, nil
}

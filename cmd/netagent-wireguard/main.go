// Command netagent-wireguard runs the userspace WireGuard implementation (wireguard-go) for
// one interface in the network namespace it is started in, for nodes whose kernel has no
// WireGuard. It only holds the device: the agent configures it through the UAPI socket
// (/var/run/wireguard/NAME.sock, with wgctrl), so an agent restart leaves the tunnel alone.
//
// It refuses to start when the interface exists or another daemon answers on the socket; a
// socket file nobody answers on is left over from a crash and is replaced. SIGTERM or
// SIGINT removes the socket and the device. Deleting the socket or the device (ip link del)
// also stops it: both mean the device is gone for its users, and the agent's next pass
// starts a fresh one, configured with the same key.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/netagent/netagent/pkg/wireguard/device"
	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/conn"
	wgdevice "golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/ipc"
	"golang.zx2c4.com/wireguard/tun"
)

func main() {
	fs := flag.NewFlagSet("netagent-wireguard", flag.ExitOnError)
	name := fs.String("name", "netagent-wg", "interface name (unique among namespaces sharing "+device.SocketDir+")")
	mtu := fs.Int("mtu", 1420, "interface MTU at creation (underlay MTU - 60 for an IPv4 underlay)")
	verbose := fs.Bool("v", false, "log wireguard-go's handshakes and peer events")
	_ = fs.Parse(os.Args[1:])
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})).With("dev", *name)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *name, *mtu, *verbose, log); err != nil {
		log.Error("netagent-wireguard", "err", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, name string, mtu int, verbose bool, log *slog.Logger) error {
	if err := device.ValidName(name); err != nil {
		return err
	}
	if mtu < 1280 || mtu > 65535 {
		return fmt.Errorf("mtu %d: want 1280-65535", mtu)
	}
	if l, err := netlink.LinkByName(name); err == nil {
		return fmt.Errorf("interface %s already exists in this network namespace (a %s link): refusing to take it over", name, l.Type())
	} else if !errors.As(err, new(netlink.LinkNotFoundError)) {
		return fmt.Errorf("look up %s: %w", name, err)
	}
	// Checked before the device is made so that a second daemon for a name in use fails
	// without touching anything; UAPIOpen checks again, atomically, and replaces a stale file.
	if device.SocketLive(name) {
		return fmt.Errorf("socket %s is in use by a running daemon: refusing to start a second one", device.SocketPath(name))
	}
	tdev, err := tun.CreateTUN(name, mtu)
	if err != nil {
		return fmt.Errorf("create TUN device %s: %w", name, err)
	}
	logger := &wgdevice.Logger{
		Verbosef: wgdevice.DiscardLogf, // unless -v: it is called per handshake and keepalive
		Errorf:   func(format string, args ...any) { log.Warn(fmt.Sprintf(format, args...)) },
	}
	if verbose {
		logger.Verbosef = func(format string, args ...any) { log.Debug(fmt.Sprintf(format, args...)) }
	}
	dev := wgdevice.NewDevice(tdev, conn.NewDefaultBind(), logger)
	defer func() {
		// The UDP port first: Close removes the interface (the TUN) before it releases the
		// port, and whoever sees the interface gone (the agent) starts the next daemon at
		// once, whose bind then failed with "address already in use".
		_ = dev.BindClose()
		dev.Close()
	}()
	// The socket appears only now, with the device running: a live socket means a device
	// that can be configured (device.Daemon waits for exactly that).
	f, err := ipc.UAPIOpen(name)
	if err != nil {
		return fmt.Errorf("open socket %s: %w", device.SocketPath(name), err)
	}
	uapi, err := ipc.UAPIListen(name, f)
	f.Close() // UAPIListen made its own listener from it
	if err != nil {
		_ = os.Remove(device.SocketPath(name))
		return fmt.Errorf("listen on socket %s: %w", device.SocketPath(name), err)
	}
	defer uapi.Close() // unlinks the socket
	accepted := make(chan error, 1)
	go func() {
		for {
			c, err := uapi.Accept()
			if err != nil {
				accepted <- err
				return
			}
			go dev.IpcHandle(c)
		}
	}()
	log.Info("wireguard device up", "socket", device.SocketPath(name), "mtu", mtu, "pid", os.Getpid())
	select {
	case <-ctx.Done():
		log.Info("stopping on signal")
		return nil
	case err := <-accepted:
		return fmt.Errorf("socket %s: %w (removed?)", device.SocketPath(name), err)
	case <-dev.Wait():
		return fmt.Errorf("device %s closed (interface deleted?)", name)
	}
}

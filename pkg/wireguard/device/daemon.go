package device

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// Daemon starts netagent-wireguard for one userspace device when no daemon answers on its
// socket. The daemon gets its own session, so it outlives the process that started it and
// signals sent to that process's group; the tunnel then survives an agent restart, and
// the next agent adopts it through the socket.
type Daemon struct {
	Binary  string // path of netagent-wireguard
	Name    string // interface name
	MTU     int    // the device's MTU at creation (the reconciler keeps it after)
	NetNS   string // start it in this namespace (a path, entered with nsenter); "" = ours
	LogPath string // the daemon's stderr, appended; "" = discarded
	Log     *slog.Logger
	// External says someone else runs the daemon (a container of its own in the agent's
	// pod, sharing SocketDir): Ensure never starts one, and a socket nobody answers on is
	// an error until that daemon is up.
	External bool
}

// External is the daemon binary's value (--wireguard-daemon) that sets Daemon.External.
const External = "external"

// ErrNoDaemon means no daemon answers on the socket of a device whose daemon is external.
var ErrNoDaemon = errors.New("no netagent-wireguard answers on the device's socket")

// Ensure starts the daemon unless its socket is live, and waits until it is (the daemon
// opens the socket only once its device is up and running). started says it started one.
func (d *Daemon) Ensure(ctx context.Context) (started bool, err error) {
	if err := ValidName(d.Name); err != nil {
		return false, err
	}
	if SocketLive(d.Name) {
		return false, nil
	}
	if d.External {
		return false, fmt.Errorf("%s (%s; it is run outside the agent, --wireguard-daemon=%s): %w", d.Name, SocketPath(d.Name), External, ErrNoDaemon)
	}
	args := []string{"--name", d.Name, "--mtu", strconv.Itoa(d.MTU)}
	bin := d.Binary
	if d.NetNS != "" {
		args = append([]string{"--net=" + d.NetNS, "--", d.Binary}, args...)
		bin = "nsenter"
	}
	cmd := exec.Command(bin, args...) // not CommandContext: it must outlive ctx
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	var logf *os.File
	if d.LogPath != "" {
		// Its directory (the agent's state directory) may not exist yet on a new node.
		if err = os.MkdirAll(filepath.Dir(d.LogPath), 0o700); err == nil {
			logf, err = os.OpenFile(d.LogPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		}
		if err != nil {
			return false, fmt.Errorf("start %s: log: %w", d.Binary, err)
		}
		defer logf.Close() // the child keeps its own descriptor
		cmd.Stdout, cmd.Stderr = logf, logf
	}
	var logStart int64
	if logf != nil {
		logStart, _ = logf.Seek(0, io.SeekEnd)
	}
	if err := cmd.Start(); err != nil {
		return false, fmt.Errorf("start %s: %w", d.Binary, err)
	}
	log := d.logger().With("dev", d.Name, "pid", cmd.Process.Pid)
	exited := make(chan error, 1)
	go func() { // reaps it whenever it ends, so it never lingers as a zombie of the agent
		err := cmd.Wait()
		log.Warn("wireguard daemon exited", "err", err)
		exited <- err
	}()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case err := <-exited:
			return false, fmt.Errorf("%s for %s exited before its socket was up: %v%s", d.Binary, d.Name, err, d.logTail(logStart))
		case <-ctx.Done():
			return false, fmt.Errorf("%s for %s: socket %s not up: %w", d.Binary, d.Name, SocketPath(d.Name), ctx.Err())
		case <-tick.C:
			if SocketLive(d.Name) {
				log.Info("wireguard daemon started")
				return true, nil
			}
		}
	}
}

func (d *Daemon) logger() *slog.Logger {
	if d.Log != nil {
		return d.Log
	}
	return slog.New(slog.DiscardHandler)
}

// logTail returns what the daemon wrote from offset on (its reason for failing), briefly.
func (d *Daemon) logTail(offset int64) string {
	if d.LogPath == "" {
		return ""
	}
	b, err := os.ReadFile(d.LogPath)
	if err != nil || int64(len(b)) <= offset {
		return ""
	}
	b = bytes.TrimSpace(b[offset:])
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return ": " + string(b)
}

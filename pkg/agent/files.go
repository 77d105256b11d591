package agent

import (
	"bytes"
	"context"
	"log/slog"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/netagent/netagent/pkg/atomicfile"
	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/pkg/subnetfile"
)

// CNIConf is what the agent puts into the conflist it writes.
type CNIConf struct {
	Name     string // network name (default "netagent")
	FileName string // default "10-netagent.conflist"
	Bridge   string // default "cni0"
	DataDir  string // plugin dataDir; "" leaves the plugin's default
}

// ConfList renders the conflist for the plugin (exported for tests and manifests).
func ConfList(c CNIConf, subnetFile string) []byte {
	plugin := map[string]any{
		"type":         "netagent-cni",
		"bridge":       or(c.Bridge, "cni0"),
		"subnetFile":   subnetFile,
		"capabilities": map[string]bool{"portMappings": true},
	}
	if c.DataDir != "" {
		plugin["dataDir"] = c.DataDir
	}
	b, _ := json.MarshalIndent(map[string]any{
		"cniVersion": "1.0.0",
		"name":       or(c.Name, "netagent"),
		"plugins":    []any{plugin},
	}, "", "  ")
	return append(b, '\n')
}

func or(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// file is one file the agent keeps correct.
type file struct {
	path string
	data []byte
}

// writeFiles writes the subnet file and then the conflist (the runtime starts using the
// network when the conflist appears, and by then the subnet file is there). Each is
// rewritten only when its content differs, atomically. It runs after every successful
// full pass, so a config change (say, the MTU) reaches them, and whenever watchFiles sees
// one removed or replaced.
func (a *Agent) writeFiles(cfg config.Network, self lease.Lease, p plan.Plan) error {
	info := subnetfile.Info{Network: cfg.Network, Subnet: self.Subnet, MTU: p.PodMTU}
	a.files = append(a.files[:0], file{a.opt.SubnetFile, info.Marshal()})
	if a.opt.CNIConfDir != "" {
		name := or(a.opt.CNIConf.FileName, "10-netagent.conflist")
		a.files = append(a.files, file{filepath.Join(a.opt.CNIConfDir, name), ConfList(a.opt.CNIConf, a.opt.SubnetFile)})
	}
	return a.ensureFiles()
}

// ensureFiles puts the last written files back if they changed.
func (a *Agent) ensureFiles() error {
	for _, f := range a.files {
		if err := writeIfChanged(f.path, f.data, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// watchFiles signals ch when a file named in paths is removed, renamed, or written in
// its directory (inotify; our own atomic renames echo too, and cost one comparison).
func watchFiles(ctx context.Context, log *slog.Logger, paths []string, ch chan struct{}) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		log.Warn("cannot watch the CNI files; the resync repairs them", "err", err)
		return
	}
	f := os.NewFile(uintptr(fd), "inotify") // non-blocking: reads park in the runtime poller
	defer f.Close()
	names := map[string]bool{}
	watch := func(quiet bool) {
		for _, p := range paths {
			names[filepath.Base(p)] = true
			const mask = unix.IN_DELETE | unix.IN_MOVED_FROM | unix.IN_MOVED_TO | unix.IN_CLOSE_WRITE
			if _, err := unix.InotifyAddWatch(fd, filepath.Dir(p), mask); err != nil && !quiet {
				log.Warn("cannot watch a CNI file's directory; the resync repairs it", "dir", filepath.Dir(p), "err", err)
			}
		}
	}
	watch(false)
	go func() { <-ctx.Done(); _ = f.SetReadDeadline(time.Now()) }()
	buf := make([]byte, 64*(unix.SizeofInotifyEvent+unix.NAME_MAX+1))
	for {
		n, err := f.Read(buf)
		if err != nil {
			return
		}
		rewatch := false
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			end := min(off+unix.SizeofInotifyEvent+int(ev.Len), n)
			name := buf[off+unix.SizeofInotifyEvent : end]
			off = end
			switch {
			case ev.Mask&unix.IN_Q_OVERFLOW != 0: // events were lost: check anyway
				signal(ch)
			case ev.Mask&unix.IN_IGNORED != 0: // the directory went away, and its watch with it
				signal(ch)
				rewatch = true
			case names[string(bytes.TrimRight(name, "\x00"))]:
				signal(ch)
			}
		}
		if rewatch {
			time.Sleep(100 * time.Millisecond) // the repair re-creates the directory
			watch(true)
		}
	}
}

func writeIfChanged(path string, data []byte, perm os.FileMode) error {
	if cur, err := os.ReadFile(path); err == nil && bytes.Equal(cur, data) {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("create %s: %w", filepath.Dir(path), err)
	}
	return atomicfile.Write(path, data, perm)
}

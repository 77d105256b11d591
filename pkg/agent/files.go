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
	"net/netip"
	"os"
	"path/filepath"

	"github.com/netagent/netagent/pkg/antispoof"
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
	// PodInterface is the plugin's podInterface: "routed", "" or "bridge" (the plugin's
	// default, which the conflist then leaves out), or "auto" (resolvePodInterface).
	PodInterface string
}

// resolvePodInterface is the podInterface the agent puts into the conflist for asked, and
// why, given the pods the plugin recorded in dataDir. "auto" is routed (faster, and no
// bridge to keep) unless the node has bridged pods: a bridged pod and a routed one on the
// same node cannot reach each other (each takes the other as on its own link, or behind
// the node, and neither answers the other's neighbour solicitation), so a node keeps the
// kind its pods have until it is drained. An explicit choice is kept, with a warning when
// the node's pods are of the other kind.
func resolvePodInterface(asked, dataDir string) (iface, why string, warn bool, err error) {
	bridged, routed, err := antispoof.CountPods(dataDir)
	if err != nil {
		return "", "", false, fmt.Errorf("count the pods recorded in %s: %w", dataDir, err)
	}
	switch {
	case asked != "auto":
		other := routed
		if asked == "routed" {
			other = bridged
		}
		if other > 0 {
			return asked, fmt.Sprintf("as asked, though %d pods on this node are wired the other way: they cannot reach the new ones until they are recreated", other), true, nil
		}
		return asked, "as asked", false, nil
	case bridged > 0:
		return "bridge", fmt.Sprintf("auto: %d bridged pods on this node (drain it to move to routed pods)", bridged), routed > 0, nil
	default:
		return "routed", fmt.Sprintf("auto: no bridged pods on this node (%d routed)", routed), false, nil
	}
}

// ConfList renders the conflist for the plugin (exported for tests and manifests).
func ConfList(c CNIConf, subnetFile string) []byte {
	return confList(c, subnetFile, netip.Prefix{}, 0)
}

// confList is ConfList for a node with IPv6: subnet6 set adds the node's IPv6 subnet as
// ipv6Subnet; with no subnetFile (an IPv6-only cluster, no IPv4 subnet to read) the pod
// MTU goes into the conflist instead.
func confList(c CNIConf, subnetFile string, subnet6 netip.Prefix, mtu int) []byte {
	plugin := map[string]any{
		"type":         "netagent-cni",
		"bridge":       or(c.Bridge, "cni0"),
		"capabilities": map[string]bool{"portMappings": true},
	}
	if subnetFile != "" {
		plugin["subnetFile"] = subnetFile
	}
	if subnet6.IsValid() {
		plugin["ipv6Subnet"] = subnet6.String()
	}
	if subnetFile == "" && mtu != 0 {
		plugin["mtu"] = mtu
	}
	if c.DataDir != "" {
		plugin["dataDir"] = c.DataDir
	}
	if c.PodInterface == "routed" { // bridge is the plugin's default; auto is resolved by Run
		plugin["podInterface"] = c.PodInterface
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
	// Repairs of a file someone else keeps rewriting (another agent given the same
	// --subnet-file) would go on forever, each write waking the other writer: after
	// maxRepairs within repairWindow the agent stops repairing it until the next full pass,
	// and reports the conflict instead.
	repairs int
	since   time.Time
	gaveUp  bool
}

const (
	maxRepairs   = 5
	repairWindow = 30 * time.Second
)

// writeFiles writes the subnet file and then the conflist (the runtime starts using the
// network when the conflist appears, and by then the subnet file is there). Each is
// rewritten only when its content differs, atomically. It runs after every successful
// full pass, so a config change (say, the MTU) reaches them, and whenever watchFiles sees
// one removed or replaced.
func (a *Agent) writeFiles(cfg config.Network, self lease.Lease, p plan.Plan) error {
	info := subnetfile.Info{Network: cfg.Network, Subnet: self.Subnet, MTU: p.PodMTU}
	if cfg.HasV6() {
		info.Network6, info.Subnet6 = cfg.IPv6Network, self.Subnet6
	}
	if !cfg.HasV4() {
		info.Subnet = netip.Prefix{}
	}
	want := []file{{path: a.opt.SubnetFile, data: info.Marshal()}}
	if a.opt.CNIConfDir != "" {
		name := or(a.opt.CNIConf.FileName, "10-netagent.conflist")
		subnetFile := a.opt.SubnetFile
		if !info.Subnet.IsValid() {
			subnetFile = "" // IPv6-only: the plugin takes ipv6Subnet and mtu from the conflist
		}
		want = append(want, file{path: filepath.Join(a.opt.CNIConfDir, name), data: confList(a.opt.CNIConf, subnetFile, info.Subnet6, p.PodMTU)})
	}
	for i := range want {
		for _, old := range a.files {
			if old.path == want[i].path { // keep its repair count: a fight resumes stopped
				want[i].repairs, want[i].since = old.repairs, old.since
			}
		}
	}
	a.files = want
	for _, f := range a.files {
		if _, err := writeIfChanged(f.path, f.data, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// ensureFiles puts the last written files back if they changed, unless another writer
// keeps changing them (then it says so, once, and leaves them to the next full pass).
func (a *Agent) ensureFiles() error {
	for i := range a.files {
		f := &a.files[i]
		if f.gaveUp {
			continue
		}
		cur, _ := os.ReadFile(f.path)
		wrote, err := writeIfChanged(f.path, f.data, 0o644)
		if err != nil {
			return err
		}
		if !wrote {
			continue
		}
		if now := time.Now(); now.Sub(f.since) > repairWindow {
			f.since, f.repairs = now, 0
		}
		if f.repairs++; f.repairs >= maxRepairs {
			f.gaveUp = true
			return fmt.Errorf("%s was rewritten %d times in %s by another writer (%s): does another agent use the same file? Give each its own --subnet-file; repairs stop until the next resync",
				f.path, f.repairs, repairWindow, foreign(cur))
		}
	}
	return nil
}

// foreign describes what another writer put into a file, for the error.
func foreign(b []byte) string {
	if info, err := subnetfile.Parse(b); err == nil {
		return fmt.Sprintf("it wrote subnet %s", info.Subnet)
	}
	return fmt.Sprintf("%d bytes", len(b))
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

// writeIfChanged writes data to path unless it is there already, and says whether it wrote.
func writeIfChanged(path string, data []byte, perm os.FileMode) (bool, error) {
	if cur, err := os.ReadFile(path); err == nil && bytes.Equal(cur, data) {
		return false, nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return false, fmt.Errorf("create %s: %w", filepath.Dir(path), err)
	}
	return true, atomicfile.Write(path, data, perm)
}

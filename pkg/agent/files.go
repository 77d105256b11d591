package agent

import (
	"bytes"
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

// writeFiles writes the subnet file and then the conflist (the runtime starts using the
// network when the conflist appears, and by then the subnet file is there). Each is
// rewritten only when its content differs, atomically.
func (a *Agent) writeFiles(cfg config.Network, self lease.Lease, p plan.Plan) error {
	info := subnetfile.Info{Network: cfg.Network, Subnet: self.Subnet, MTU: p.PodMTU}
	if err := writeIfChanged(a.opt.SubnetFile, info.Marshal(), 0o644); err != nil {
		return err
	}
	if a.opt.CNIConfDir == "" {
		return nil
	}
	name := or(a.opt.CNIConf.FileName, "10-netagent.conflist")
	return writeIfChanged(filepath.Join(a.opt.CNIConfDir, name), ConfList(a.opt.CNIConf, a.opt.SubnetFile), 0o644)
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

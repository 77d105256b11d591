// Package labtest brings up a pkg/lab cluster for a test: the binaries built, namespaces
// named for this test process, and everything removed when the test ends (with the agents'
// logs, and any other node files named, printed first if it failed).
package labtest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/lab"
	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
)

var seq int

// Up builds netagent, netagent-etcd and netagent-cni (and netagent-wireguard for the
// wireguard backend) and brings up a lab with opt; logs are files under each node's
// directory (a func, so names may depend on the node) printed after agent.log on failure.
func Up(t testing.TB, opt lab.Options, logs func(*lab.Lab, *lab.Node) []string) *lab.Lab {
	t.Helper()
	netns.RequireRoot(t)
	opt.Netagent = testbin.Build(t, "./cmd/netagent", "netagent")
	testbin.Build(t, "./cmd/netagent-etcd", "netagent-etcd")
	testbin.Build(t, "./cmd/cni-plugin", "netagent-cni")
	if opt.Backend == "wireguard" {
		testbin.Build(t, "./cmd/netagent-wireguard", "netagent-wireguard") // beside netagent, where the agents look
	}
	seq++
	opt.Prefix = fmt.Sprintf("%s%d-%d-", netns.Prefix, os.Getpid(), 1000+seq)
	opt.Dir, opt.CNIBinDir, opt.Log = t.TempDir(), testbin.Dir(), t.Logf
	if opt.LeaseTTL == 0 {
		opt.LeaseTTL = 3 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l, err := lab.Up(ctx, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range l.Nodes {
				files := []string{"agent.log"}
				if logs != nil {
					files = append(files, logs(l, n)...)
				}
				for _, f := range files {
					b, _ := os.ReadFile(filepath.Join(n.Dir, f))
					t.Logf("%s of %s:\n%s", f, n.Name, LastLines(string(b), 30))
				}
			}
		}
		if err := l.Down(); err != nil {
			t.Errorf("lab down: %v", err)
		}
	})
	return l
}

// LastLines is the last n lines of s.
func LastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

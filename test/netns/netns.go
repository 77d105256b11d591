// Package netns is pkg/lab/netns for tests: a namespace removed when the test ends (New),
// and the root check (RequireRoot). The rest is pkg/lab/netns's, named here too so a test
// imports one package.
package netns

import (
	"os"
	"testing"

	labns "github.com/netagent/netagent/pkg/lab/netns"
)

// NS is one named network namespace.
type NS = labns.NS

// Prefix starts every namespace name Create and New make.
const Prefix = labns.Prefix

// Create, Open, Sweep and Veth are pkg/lab/netns's.
var (
	Create = labns.Create
	Open   = labns.Open
	Sweep  = labns.Sweep
	Veth   = labns.Veth
)

// RequireRoot skips the test when not running as root; with CI set it fails instead, so a
// CI run can never pass by skipping everything.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatal("test needs root (CI is set, so this is a failure, not a skip)")
	}
	t.Skip("test needs root")
}

// New creates a namespace with loopback up and removes it (and every process started in it
// with Start) when the test ends, whether it passed or failed.
func New(t testing.TB, label string) *NS {
	t.Helper()
	n, err := Create(label)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Errorf("remove netns %s: %v", n.Name, err)
		}
	})
	return n
}

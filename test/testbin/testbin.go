// Package testbin builds the project's binaries once per test process, so integration tests
// exercise the real executables (as a runtime or an operator would) rather than in-process
// functions.
package testbin

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
)

var (
	mu    sync.Mutex
	built = map[string]string{}
	dir   string
)

// Root is the repository root (the directory holding go.mod).
func Root() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// Build compiles the package at pkg (relative to the repository root, e.g. "./cmd/cni-plugin")
// into a binary named name and returns its path. The directory holding it is shared by every
// binary built in this process, so it can serve as a CNI bin dir.
func Build(t testing.TB, pkg, name string) string {
	t.Helper()
	p, err := BuildErr(pkg, name)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// BuildErr is Build for callers without a testing.TB (commands, TestMain).
func BuildErr(pkg, name string) (string, error) {
	mu.Lock()
	defer mu.Unlock()
	if p, ok := built[name]; ok {
		return p, nil
	}
	if dir == "" {
		d, err := os.MkdirTemp("", "netagent-bin-")
		if err != nil {
			return "", err
		}
		dir = d
	}
	out := filepath.Join(dir, name)
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, pkg)
	cmd.Dir = Root()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s: %v\n%s", pkg, err, b)
	}
	built[name] = out
	return out, nil
}

// Dir is the directory holding the built binaries ("" before the first Build).
func Dir() string {
	mu.Lock()
	defer mu.Unlock()
	return dir
}

// Cleanup removes the build directory; call it from TestMain after m.Run.
func Cleanup() {
	mu.Lock()
	defer mu.Unlock()
	if dir != "" {
		_ = os.RemoveAll(dir)
		dir = ""
		built = map[string]string{}
	}
}

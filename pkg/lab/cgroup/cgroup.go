// Package cgroup finds, empties and removes a cgroup tree that the lab or a test made for a
// runtime (a kubelet's cgroupRoot, containerd's cgroup parent), in every mounted hierarchy.
package cgroup

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const root = "/sys/fs/cgroup"

// Dirs returns parent's directory in each mounted hierarchy that has one (cgroup v1
// controllers, the named systemd one, the unified one, or a pure v2 root).
func Dirs(parent string) []string {
	var dirs []string
	if fi, err := os.Stat(filepath.Join(root, parent)); err == nil && fi.IsDir() {
		dirs = append(dirs, filepath.Join(root, parent))
	}
	entries, _ := os.ReadDir(root)
	for _, e := range entries {
		p := filepath.Join(root, e.Name(), parent)
		if fi, err := os.Stat(p); err == nil && fi.IsDir() {
			dirs = append(dirs, p)
		}
	}
	return dirs
}

// Pids lists the processes anywhere below parent, in every hierarchy (a process in several
// hierarchies is listed once per hierarchy).
func Pids(parent string) []int {
	var pids []int
	for _, dir := range Dirs(parent) {
		_ = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil || !d.IsDir() {
				return nil
			}
			b, err := os.ReadFile(filepath.Join(path, "cgroup.procs"))
			if err != nil {
				return nil
			}
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil {
					pids = append(pids, pid)
				}
			}
			return nil
		})
	}
	return pids
}

// Remove removes parent and everything below it, deepest first, in every hierarchy.
func Remove(parent string) error {
	var errs []error
	for _, dir := range Dirs(parent) {
		var sub []string
		_ = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				sub = append(sub, path)
			}
			return nil
		})
		slices.Reverse(sub)
		for _, p := range sub {
			if err := rmdir(p); err != nil && !errors.Is(err, syscall.ENOENT) {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", p, err))
			}
		}
	}
	return errors.Join(errs...)
}

// rmdir removes one cgroup, which stays busy for a moment after its last process is reaped.
func rmdir(p string) error {
	deadline := time.Now().Add(2 * time.Second)
	for {
		err := syscall.Rmdir(p)
		if !errors.Is(err, syscall.EBUSY) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

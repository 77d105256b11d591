package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// cniBinName is the plugin's file name: the conflist's "type", so the runtime finds it.
const cniBinName = "netagent-cni"

// installFlags are `netagent install-cni`'s flags (a separate type so a test can parse
// the DaemonSet's init container arguments with the real parser).
type installFlags struct {
	src    string
	dstDir string
}

func newInstallFlags() (*flag.FlagSet, *installFlags) {
	fs := flag.NewFlagSet("install-cni", flag.ContinueOnError)
	f := &installFlags{}
	src := ""
	if exe, err := os.Executable(); err == nil {
		src = filepath.Join(filepath.Dir(exe), cniBinName)
	}
	fs.StringVar(&f.src, "src", src, "the plugin binary to install; by default the one beside this executable")
	fs.StringVar(&f.dstDir, "dst-dir", "/opt/cni/bin", "the runtime's CNI binary directory; the plugin lands there as "+cniBinName)
	return fs, f
}

func (f *installFlags) validate() error {
	if f.src == "" {
		return errors.New("--src is empty")
	}
	if f.dstDir == "" {
		return errors.New("--dst-dir is empty")
	}
	return nil
}

// cmdInstallCNI copies the plugin into the node's CNI binary directory (the DaemonSet's
// init container runs it with the host directory mounted).
func cmdInstallCNI(_ context.Context, args []string, stdout io.Writer) error {
	fs, f := newInstallFlags()
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := f.validate(); err != nil {
		return err
	}
	dst := filepath.Join(f.dstDir, cniBinName)
	changed, err := installFile(f.src, dst)
	if err != nil {
		return err
	}
	if !changed {
		_, err = fmt.Fprintf(stdout, "%s is up to date\n", dst)
		return err
	}
	_, err = fmt.Fprintf(stdout, "installed %s from %s\n", dst, f.src)
	return err
}

// installFile puts src's content at dst with mode 0755 and reports whether it wrote
// anything. It never writes into dst: it writes a temporary file beside it, syncs it and
// renames it over dst, so a runtime executing the plugin at that moment keeps running the
// old inode, and a crash leaves the old binary or the new one, never a torn one. An
// identical dst is left alone (same inode, same mtime). The plugin is a few MB, so both
// copies are simply read into memory.
func installFile(src, dst string) (changed bool, err error) {
	data, err := os.ReadFile(src)
	if err != nil {
		return false, fmt.Errorf("--src: %w", err)
	}
	if st, err := os.Stat(dst); err == nil && st.Mode().IsRegular() && st.Mode().Perm() == 0o755 {
		if cur, err := os.ReadFile(dst); err == nil && bytes.Equal(cur, data) {
			return false, nil
		}
	}
	dir := filepath.Dir(dst)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(dst)+".tmp-")
	if err != nil {
		return false, fmt.Errorf("--dst-dir: %w", err)
	}
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Chmod(0o755)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), dst)
	}
	if err != nil {
		_ = os.Remove(tmp.Name())
		return false, fmt.Errorf("install %s: %w", dst, err)
	}
	// The rename is durable once the directory is synced.
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
	return true, nil
}

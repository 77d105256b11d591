package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestInstallCNI(t *testing.T) {
	const newBin, oldBin = "\x7fELF new plugin", "\x7fELF old plugin"
	old := time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC)
	// Every case gets dir/src/netagent-cni (newBin) and an empty dir/bin. have is a plugin
	// already installed there, with a second name (dir/old) for its inode, which stands for
	// a runtime executing it at that moment. prepare makes other changes and returns more
	// arguments.
	type file struct {
		content string
		mode    os.FileMode
	}
	for _, c := range []struct {
		name      string
		have      *file
		prepare   func(t *testing.T, src, dstDir string) []string
		wantOut   string
		wantErr   string
		unchanged bool // the installed file keeps its inode and mtime
	}{
		{name: "fresh install", wantOut: "installed"},
		{name: "identical content is not rewritten", have: &file{newBin, 0o755}, wantOut: "up to date", unchanged: true},
		{name: "upgrade renames a new file over the old", have: &file{oldBin, 0o755}, wantOut: "installed"},
		{name: "same content with the wrong mode is replaced", have: &file{newBin, 0o644}, wantOut: "installed"},
		{
			name: "missing src",
			prepare: func(t *testing.T, src, dstDir string) []string {
				return []string{"--src", filepath.Join(filepath.Dir(src), "nope")}
			},
			wantErr: "--src",
		},
		{
			name:    "empty src",
			prepare: func(t *testing.T, src, dstDir string) []string { return []string{"--src="} },
			wantErr: "--src is empty",
		},
		{
			name: "dst-dir missing",
			prepare: func(t *testing.T, src, dstDir string) []string {
				return []string{"--dst-dir", filepath.Join(dstDir, "nope")}
			},
			wantErr: "--dst-dir",
		},
		{
			name: "dst-dir is a file",
			prepare: func(t *testing.T, src, dstDir string) []string {
				f := writeBin(t, filepath.Join(dstDir, "file"), "", 0o644)
				return []string{"--dst-dir", f}
			},
			wantErr: "--dst-dir",
		},
		{
			name: "dst is a directory: rename fails, nothing left behind",
			prepare: func(t *testing.T, src, dstDir string) []string {
				writeBin(t, filepath.Join(dstDir, cniBinName, "x"), "", 0o644)
				return nil
			},
			wantErr: "rename",
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			src := writeBin(t, filepath.Join(dir, "src", cniBinName), newBin, 0o755)
			dstDir := filepath.Join(dir, "bin")
			dst, running := filepath.Join(dstDir, cniBinName), filepath.Join(dir, "old")
			if err := os.Mkdir(dstDir, 0o755); err != nil {
				t.Fatal(err)
			}
			if c.have != nil {
				writeBin(t, dst, c.have.content, c.have.mode)
				if err := os.Chtimes(dst, old, old); err != nil {
					t.Fatal(err)
				}
				if err := os.Link(dst, running); err != nil {
					t.Fatal(err)
				}
			}
			args := []string{"--src", src, "--dst-dir", dstDir}
			if c.prepare != nil {
				args = append(args, c.prepare(t, src, dstDir)...)
			}

			var out bytes.Buffer
			err := cmdInstallCNI(context.Background(), args, &out)
			if tmps, _ := filepath.Glob(filepath.Join(dstDir, ".*tmp*")); len(tmps) > 0 {
				t.Errorf("temporary files left behind: %v", tmps)
			}
			if c.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Errorf("install-cni %v: error %v, want one containing %q", args, err, c.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("install-cni %v: %v", args, err)
			}
			if !strings.Contains(out.String(), c.wantOut) {
				t.Errorf("install-cni %v printed %q, want %q", args, out.String(), c.wantOut)
			}
			st, err := os.Stat(dst)
			if err != nil {
				t.Fatal(err)
			}
			if b, _ := os.ReadFile(dst); string(b) != newBin || st.Mode() != 0o755 {
				t.Errorf("%s = %q mode %s, want %q mode -rwxr-xr-x", dst, b, st.Mode(), newBin)
			}
			if c.have == nil {
				return
			}
			if b, _ := os.ReadFile(running); string(b) != c.have.content {
				t.Errorf("the old inode now holds %q, want %q: written in place", b, c.have.content)
			}
			if same := inode(t, dst) == inode(t, running); same != c.unchanged {
				t.Errorf("inode kept = %v, want %v", same, c.unchanged)
			}
			if c.unchanged && !st.ModTime().Equal(old) {
				t.Errorf("mtime = %s, want %s (untouched)", st.ModTime(), old)
			}
		})
	}
}

func TestInstallFlagsDefaultSrcIsBesideTheExecutable(t *testing.T) {
	fs, f := newInstallFlags()
	if err := parse(fs, nil); err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Skip(err)
	}
	if want := filepath.Join(filepath.Dir(exe), cniBinName); f.src != want || f.dstDir != "/opt/cni/bin" {
		t.Errorf("defaults = --src %s --dst-dir %s, want %s and /opt/cni/bin", f.src, f.dstDir, want)
	}
}

func writeBin(t *testing.T, path, content string, perm os.FileMode) string {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), perm); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, perm); err != nil { // past the umask
		t.Fatal(err)
	}
	return path
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Ino
}

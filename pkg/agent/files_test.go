package agent

import (
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestWatchFiles(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.conf"), filepath.Join(dir, "sub", "b.env")
	if err := os.MkdirAll(filepath.Dir(b), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{a, b} {
		if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ch := make(chan struct{}, 1)
	go watchFiles(t.Context(), slog.Default(), []string{a, b}, ch)
	time.Sleep(50 * time.Millisecond)
	expect := func(what string, want bool) {
		t.Helper()
		select {
		case <-ch:
			if !want {
				t.Fatalf("%s: signalled", what)
			}
		case <-time.After(300 * time.Millisecond):
			if want {
				t.Fatalf("%s: no signal", what)
			}
		}
	}
	for _, c := range []struct {
		what string
		do   func() error
		want bool
	}{
		{"other file written", func() error { return os.WriteFile(filepath.Join(dir, "other"), []byte("y"), 0o644) }, false},
		{"a removed", func() error { return os.Remove(a) }, true},
		{"a created", func() error { return os.WriteFile(a, []byte("z"), 0o644) }, true},
		{"b overwritten", func() error { return os.WriteFile(b, []byte("z"), 0o644) }, true},
		{"b renamed over", func() error {
			tmp := b + ".tmp"
			if err := os.WriteFile(tmp, []byte("w"), 0o644); err != nil {
				return err
			}
			return os.Rename(tmp, b)
		}, true},
	} {
		if err := c.do(); err != nil {
			t.Fatal(err)
		}
		expect(c.what, c.want)
		// Drain what one operation may signal twice (write + close, or tmp + rename).
		time.Sleep(20 * time.Millisecond)
		select {
		case <-ch:
		default:
		}
	}
}

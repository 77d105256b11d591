package k8s

import (
	"archive/tar"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"
)

type index struct {
	Manifests []descriptor `json:"manifests"`
}

type manifest struct {
	Config descriptor   `json:"config"`
	Layers []descriptor `json:"layers"`
}

// TestImageArchive checks the archive's structure without root or a runtime, so a broken
// image shows up here instead of as an opaque import error.
func TestImageArchive(t *testing.T) {
	if _, err := os.Stat("/bin/busybox"); err != nil {
		t.Skipf("no /bin/busybox: %v", err)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "image.tar")
	const name = "netagent.local/pause:1"
	if err := BusyboxRoot(filepath.Join(dir, "root")); err != nil {
		t.Fatal(err)
	}
	if err := WriteArchive(path, Image{Name: name, Root: filepath.Join(dir, "root"), Cmd: []string{"sleep", "1"}}); err != nil {
		t.Fatal(err)
	}
	files, err := readTar(path)
	if err != nil {
		t.Fatal(err)
	}
	var idx index
	if err := json.Unmarshal(files["index.json"], &idx); err != nil {
		t.Fatalf("index.json: %v", err)
	}
	if len(idx.Manifests) != 1 {
		t.Fatalf("index.json has %d manifests, want 1", len(idx.Manifests))
	}
	md := idx.Manifests[0]
	if got := md.Annotations[annotationImageName]; got != name {
		t.Errorf("index annotation %s = %q, want %q", annotationImageName, got, name)
	}
	if got := md.Annotations[annotationRefName]; got != "1" {
		t.Errorf("index annotation %s = %q, want %q", annotationRefName, got, "1")
	}
	var man manifest
	if err := json.Unmarshal(mustBlob(t, files, md), &man); err != nil {
		t.Fatalf("manifest: %v", err)
	}
	var cfg imageConfig
	if err := json.Unmarshal(mustBlob(t, files, man.Config), &cfg); err != nil {
		t.Fatalf("config: %v", err)
	}
	if len(man.Layers) != 1 || len(cfg.RootFS.DiffIDs) != 1 || cfg.RootFS.DiffIDs[0] != man.Layers[0].Digest {
		t.Fatalf("layers %v, diff_ids %v: want one uncompressed layer whose digest is its diff ID", man.Layers, cfg.RootFS.DiffIDs)
	}
	layerPath := filepath.Join(t.TempDir(), "layer.tar")
	if err := os.WriteFile(layerPath, mustBlob(t, files, man.Layers[0]), 0o644); err != nil {
		t.Fatal(err)
	}
	layer, err := readTarHeaders(layerPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		typeflag byte
	}{
		{"bin/busybox", tar.TypeReg},
		{"bin/sh", tar.TypeSymlink},
		{"bin/nc", tar.TypeSymlink},
		{"bin/ping", tar.TypeSymlink},
		{"bin/hostname", tar.TypeSymlink},
		{"tmp/", tar.TypeDir},
	} {
		h, ok := layer[tc.name]
		if !ok {
			t.Errorf("layer has no %s", tc.name)
			continue
		}
		if h.Typeflag != tc.typeflag {
			t.Errorf("layer %s has type %q, want %q", tc.name, h.Typeflag, tc.typeflag)
		}
	}
}

// mustBlob returns the blob d points at, checking its size and digest.
func mustBlob(t *testing.T, files map[string][]byte, d descriptor) []byte {
	t.Helper()
	b, ok := files[blobPath(d)]
	if !ok {
		t.Fatalf("archive has no blob %s", d.Digest)
	}
	if got := blobDescriptor(d.MediaType, b); got.Digest != d.Digest || got.Size != d.Size {
		t.Fatalf("blob %s: digest %s size %d, want size %d", d.Digest, got.Digest, got.Size, d.Size)
	}
	return b
}

func readTar(path string) (map[string][]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	files := map[string][]byte{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return files, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", path, err)
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			return nil, fmt.Errorf("read %s: %s: %w", path, h.Name, err)
		}
		files[h.Name] = b
	}
}

func readTarHeaders(path string) (map[string]*tar.Header, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	hs := map[string]*tar.Header{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return hs, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", path, err)
		}
		hs[h.Name] = h
	}
}

package containerd

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// OCI media types and annotations, spelled out rather than importing image-spec: the
// archive needs five of them.
const (
	mediaTypeIndex    = "application/vnd.oci.image.index.v1+json"
	mediaTypeManifest = "application/vnd.oci.image.manifest.v1+json"
	mediaTypeConfig   = "application/vnd.oci.image.config.v1+json"
	mediaTypeLayer    = "application/vnd.oci.image.layer.v1.tar"

	annotationRefName = "org.opencontainers.image.ref.name"
	// containerd's importer names the image after this annotation when present.
	annotationImageName = "io.containerd.image.name"
)

// busyboxPath is the static busybox the image is built from (Debian's busybox-static).
const busyboxPath = "/bin/busybox"

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Platform    *platform         `json:"platform,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

type platform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
}

type imageConfig struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
	Config       struct {
		Env        []string `json:"Env"`
		Cmd        []string `json:"Cmd"`
		StopSignal string   `json:"StopSignal,omitempty"`
	} `json:"config"`
	RootFS struct {
		Type    string   `json:"type"`
		DiffIDs []string `json:"diff_ids"`
	} `json:"rootfs"`
}

type manifest struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	Config        descriptor   `json:"config"`
	Layers        []descriptor `json:"layers"`
}

type index struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	Manifests     []descriptor `json:"manifests"`
}

// writeImage writes an OCI image archive (the layout `ctr images import` reads) holding one
// image named name: busybox with a symlink per applet in /bin, whose default command sleeps
// forever, so it serves both as the sandbox ("pause") image and as an application image.
func writeImage(path, name string) error {
	layer, err := busyboxLayer(busyboxPath)
	if err != nil {
		return err
	}
	layerDesc := blobDescriptor(mediaTypeLayer, layer)

	var cfg imageConfig
	cfg.Architecture = runtime.GOARCH
	cfg.OS = "linux"
	cfg.Config.Env = []string{"PATH=/bin"}
	cfg.Config.Cmd = []string{"/bin/busybox", "sleep", "2147483647"}
	// PID 1 in a pid namespace ignores SIGTERM unless it handles it; SIGKILL keeps
	// StopContainer from waiting out its grace period.
	cfg.Config.StopSignal = "SIGKILL"
	cfg.RootFS.Type = "layers"
	// The layer is uncompressed, so its diff ID is its digest.
	cfg.RootFS.DiffIDs = []string{layerDesc.Digest}
	cfgBlob, err := json.Marshal(cfg)
	if err != nil {
		return fmt.Errorf("encode image config: %w", err)
	}
	cfgDesc := blobDescriptor(mediaTypeConfig, cfgBlob)

	manBlob, err := json.Marshal(manifest{
		SchemaVersion: 2,
		MediaType:     mediaTypeManifest,
		Config:        cfgDesc,
		Layers:        []descriptor{layerDesc},
	})
	if err != nil {
		return fmt.Errorf("encode manifest: %w", err)
	}
	manDesc := blobDescriptor(mediaTypeManifest, manBlob)
	manDesc.Platform = &platform{Architecture: runtime.GOARCH, OS: "linux"}
	_, tag, _ := strings.Cut(name[strings.LastIndex(name, "/")+1:], ":")
	manDesc.Annotations = map[string]string{annotationImageName: name, annotationRefName: tag}

	idxBlob, err := json.Marshal(index{SchemaVersion: 2, MediaType: mediaTypeIndex, Manifests: []descriptor{manDesc}})
	if err != nil {
		return fmt.Errorf("encode index: %w", err)
	}

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	files := []struct {
		name string
		data []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{"index.json", idxBlob},
		{blobPath(layerDesc), layer},
		{blobPath(cfgDesc), cfgBlob},
		{blobPath(manDesc), manBlob},
	}
	for _, dir := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: 0o755}); err != nil {
			return fmt.Errorf("image archive: %w", err)
		}
	}
	for _, f := range files {
		if err := writeTarFile(tw, f.name, 0o644, f.data); err != nil {
			return fmt.Errorf("image archive: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("image archive: %w", err)
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		return fmt.Errorf("write image archive: %w", err)
	}
	return nil
}

// busyboxLayer returns an uncompressed layer tar with a minimal root: busybox, one symlink
// per applet (so `sh`, `ip`, `nc`, `ping`, `hostname` resolve via PATH=/bin), the mount
// points runc expects and a root user.
func busyboxLayer(busybox string) ([]byte, error) {
	bin, err := os.ReadFile(busybox)
	if err != nil {
		return nil, fmt.Errorf("read busybox: %w", err)
	}
	out, err := exec.Command(busybox, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("busybox --list: %w", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, d := range []struct {
		name string
		mode int64
	}{{"bin/", 0o755}, {"dev/", 0o755}, {"etc/", 0o755}, {"proc/", 0o555}, {"sys/", 0o555}, {"root/", 0o700}, {"tmp/", 0o1777}, {"var/", 0o755}} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d.name, Mode: d.mode}); err != nil {
			return nil, fmt.Errorf("layer: %w", err)
		}
	}
	if err := writeTarFile(tw, "bin/busybox", 0o755, bin); err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	for _, applet := range strings.Fields(string(out)) {
		if applet == "busybox" || strings.Contains(applet, "/") {
			continue
		}
		h := &tar.Header{Typeflag: tar.TypeSymlink, Name: "bin/" + applet, Linkname: "busybox", Mode: 0o777}
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("layer: %w", err)
		}
	}
	for _, f := range []struct{ name, data string }{
		{"etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"},
		{"etc/group", "root:x:0:\n"},
	} {
		if err := writeTarFile(tw, f.name, 0o644, []byte(f.data)); err != nil {
			return nil, fmt.Errorf("layer: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	return buf.Bytes(), nil
}

// writeTarFile writes a regular file with a fixed time, so the same input always gives the
// same digest.
func writeTarFile(tw *tar.Writer, name string, mode int64, data []byte) error {
	h := &tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data)), ModTime: time.Unix(0, 0)}
	if err := tw.WriteHeader(h); err != nil {
		return err
	}
	_, err := tw.Write(data)
	return err
}

func blobDescriptor(mediaType string, blob []byte) descriptor {
	sum := sha256.Sum256(blob)
	return descriptor{MediaType: mediaType, Digest: "sha256:" + hex.EncodeToString(sum[:]), Size: int64(len(blob))}
}

func blobPath(d descriptor) string {
	return "blobs/sha256/" + strings.TrimPrefix(d.Digest, "sha256:")
}

// importImage loads the archive into containerd's k8s.io namespace (the CRI's) and unpacks
// it for snapshotter, so RunPodSandbox finds it without pulling.
func importImage(ctx context.Context, sock, snapshotter, archive string) error {
	cmd := exec.CommandContext(ctx, "ctr", "--address", sock, "--namespace", "k8s.io",
		"images", "import", "--snapshotter", snapshotter, archive)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("ctr images import %s: %w: %s", archive, err, bytes.TrimSpace(out))
	}
	return nil
}

// TestImageArchive checks the archive's structure without root or a runtime, so a broken
// image shows up here instead of as an opaque import error.
func TestImageArchive(t *testing.T) {
	if _, err := os.Stat(busyboxPath); err != nil {
		t.Skipf("no %s: %v", busyboxPath, err)
	}
	path := filepath.Join(t.TempDir(), "image.tar")
	const name = "netagent.local/pause:1"
	if err := writeImage(path, name); err != nil {
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

package k8s

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"
)

// The lab's images are OCI archives (the layout `ctr images import` reads) of one
// uncompressed layer, written here rather than with an image library: the format needs
// five media types and a tar, and the lab runs inside the netagent binary, whose start-up
// cost is measured.
const (
	mediaTypeIndex    = "application/vnd.oci.image.index.v1+json"
	mediaTypeManifest = "application/vnd.oci.image.manifest.v1+json"
	mediaTypeConfig   = "application/vnd.oci.image.config.v1+json"
	mediaTypeLayer    = "application/vnd.oci.image.layer.v1.tar"

	annotationRefName = "org.opencontainers.image.ref.name"
	// containerd's importer names the image after this annotation when present.
	annotationImageName = "io.containerd.image.name"
)

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

// Image describes one image to write.
type Image struct {
	Name       string   // e.g. ghcr.io/netagent/netagent:0.1.0
	Root       string   // directory whose tree becomes the single layer
	Entrypoint []string // may be nil
	Cmd        []string // may be nil
	Env        []string
	StopSignal string
}

type imageConfig struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
	Config       struct {
		Env        []string `json:"Env,omitempty"`
		Entrypoint []string `json:"Entrypoint,omitempty"`
		Cmd        []string `json:"Cmd,omitempty"`
		StopSignal string   `json:"StopSignal,omitempty"`
	} `json:"config"`
	RootFS struct {
		Type    string   `json:"type"`
		DiffIDs []string `json:"diff_ids"`
	} `json:"rootfs"`
}

// WriteArchive writes img as an OCI archive at path. The same tree always gives the same
// digests (fixed times, owners and order).
func WriteArchive(path string, img Image) error {
	layer, err := layerTar(img.Root)
	if err != nil {
		return fmt.Errorf("image %s: %w", img.Name, err)
	}
	layerDesc := blobDescriptor(mediaTypeLayer, layer)
	var cfg imageConfig
	cfg.Architecture, cfg.OS = runtime.GOARCH, "linux"
	cfg.Config.Env = img.Env
	cfg.Config.Entrypoint = img.Entrypoint
	cfg.Config.Cmd = img.Cmd
	cfg.Config.StopSignal = img.StopSignal
	cfg.RootFS.Type = "layers"
	cfg.RootFS.DiffIDs = []string{layerDesc.Digest} // uncompressed: the diff ID is the digest
	cfgBlob, err := json.Marshal(cfg)
	if err != nil {
		return err
	}
	cfgDesc := blobDescriptor(mediaTypeConfig, cfgBlob)
	manBlob, err := json.Marshal(map[string]any{
		"schemaVersion": 2, "mediaType": mediaTypeManifest, "config": cfgDesc, "layers": []descriptor{layerDesc},
	})
	if err != nil {
		return err
	}
	manDesc := blobDescriptor(mediaTypeManifest, manBlob)
	manDesc.Platform = &platform{Architecture: runtime.GOARCH, OS: "linux"}
	_, tag, _ := strings.Cut(img.Name[strings.LastIndex(img.Name, "/")+1:], ":")
	manDesc.Annotations = map[string]string{annotationImageName: img.Name, annotationRefName: tag}
	idxBlob, err := json.Marshal(map[string]any{
		"schemaVersion": 2, "mediaType": mediaTypeIndex, "manifests": []descriptor{manDesc},
	})
	if err != nil {
		return err
	}

	f, err := os.Create(path)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(f)
	for _, dir := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: 0o755, ModTime: time.Unix(0, 0)}); err != nil {
			f.Close()
			return err
		}
	}
	for _, b := range []struct {
		name string
		data []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{"index.json", idxBlob},
		{blobPath(layerDesc), layer},
		{blobPath(cfgDesc), cfgBlob},
		{blobPath(manDesc), manBlob},
	} {
		if err := writeTarFile(tw, b.name, 0o644, b.data); err != nil {
			f.Close()
			return fmt.Errorf("image %s: %w", img.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// layerTar packs the tree under root: regular files, directories and symlinks, owned by
// root, in name order.
func layerTar(root string) ([]byte, error) {
	var paths []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != root {
			paths = append(paths, p)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	sort.Strings(paths)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, p := range paths {
		fi, err := os.Lstat(p)
		if err != nil {
			return nil, err
		}
		rel, _ := filepath.Rel(root, p)
		h := &tar.Header{Name: filepath.ToSlash(rel), Mode: tarMode(fi.Mode()), ModTime: time.Unix(0, 0)}
		switch {
		case fi.IsDir():
			h.Typeflag, h.Name = tar.TypeDir, h.Name+"/"
			if err := tw.WriteHeader(h); err != nil {
				return nil, err
			}
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return nil, err
			}
			h.Typeflag, h.Linkname = tar.TypeSymlink, target
			if err := tw.WriteHeader(h); err != nil {
				return nil, err
			}
		case fi.Mode().IsRegular():
			h.Typeflag, h.Size = tar.TypeReg, fi.Size()
			if err := tw.WriteHeader(h); err != nil {
				return nil, err
			}
			src, err := os.Open(p)
			if err != nil {
				return nil, err
			}
			_, err = io.Copy(tw, src)
			src.Close()
			if err != nil {
				return nil, err
			}
		default:
			return nil, fmt.Errorf("%s: unsupported file type %v", p, fi.Mode().Type())
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func tarMode(m fs.FileMode) int64 {
	mode := int64(m.Perm())
	for _, b := range []struct {
		fm  fs.FileMode
		bit int64
	}{{fs.ModeSetuid, 0o4000}, {fs.ModeSetgid, 0o2000}, {fs.ModeSticky, 0o1000}} {
		if m&b.fm != 0 {
			mode |= b.bit
		}
	}
	return mode
}

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

func blobPath(d descriptor) string { return "blobs/sha256/" + strings.TrimPrefix(d.Digest, "sha256:") }

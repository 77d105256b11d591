package containerd

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"path/filepath"

	"github.com/netagent/netagent/pkg/lab/k8s"
)

// writeImage writes an OCI image archive (the layout `ctr images import` reads) holding one
// image named name: busybox with a symlink per applet in /bin, whose default command sleeps
// forever, so it serves both as the sandbox ("pause") image and as an application image.
func writeImage(path, name string) error {
	root := filepath.Join(filepath.Dir(path), "busybox-root")
	if err := k8s.BusyboxRoot(root); err != nil {
		return err
	}
	return k8s.WriteArchive(path, k8s.Image{
		Name: name, Root: root, Env: []string{"PATH=/bin"},
		Cmd: []string{"/bin/busybox", "sleep", "2147483647"},
		// PID 1 in a pid namespace ignores SIGTERM unless it handles it; SIGKILL keeps
		// StopContainer from waiting out its grace period.
		StopSignal: "SIGKILL",
	})
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

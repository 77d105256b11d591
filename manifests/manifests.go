// Package manifests holds netagent's Kubernetes manifests as a kustomize tree (base, the
// kube and etcd-tls overlays, cleanup) and builds them. netagent.yaml is the kube overlay
// rendered into one file for `kubectl apply -f`; `go run ./manifests/render` rewrites it
// and a test fails while it is stale. The objects themselves are checked in
// cmd/netagent, against the real flag parsers of the commands they run.
package manifests

//go:generate go run ./render -dir .

import (
	"fmt"
	"path/filepath"

	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

// Rendered is the single-file manifest, relative to the manifests directory, and
// RenderedFrom the overlay it is built from.
const (
	Rendered     = "netagent.yaml"
	RenderedFrom = "kube"
)

const header = `# netagent with the Kubernetes subnet manager, in one file: kubectl apply -f netagent.yaml
# Generated from manifests/kube by ` + "`go run ./manifests/render`" + `; edit the kustomize tree, not this.
`

// Build is `kustomize build dir`: the objects of the kustomization in dir, as YAML
// documents.
func Build(dir string) ([]byte, error) {
	opt := krusty.MakeDefaultOptions()
	opt.Reorder = krusty.ReorderOptionLegacy // as the kustomize CLI and kubectl: namespaces first, workloads last
	m, err := krusty.MakeKustomizer(opt).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return nil, fmt.Errorf("kustomize build %s: %w", dir, err)
	}
	b, err := m.AsYaml()
	if err != nil {
		return nil, fmt.Errorf("kustomize build %s: %w", dir, err)
	}
	return b, nil
}

// Render is the content of Rendered, given the manifests directory.
func Render(dir string) ([]byte, error) {
	b, err := Build(filepath.Join(dir, RenderedFrom))
	if err != nil {
		return nil, err
	}
	return append([]byte(header), b...), nil
}

// Command render writes manifests/netagent.yaml, the kube overlay built into one file for
// `kubectl apply -f`. Run it from the repository root after changing the kustomize tree:
//
//	go run ./manifests/render
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/netagent/netagent/manifests"
)

func main() {
	dir := flag.String("dir", "manifests", "the manifests directory")
	flag.Parse()
	b, err := manifests.Render(*dir)
	if err == nil {
		err = os.WriteFile(filepath.Join(*dir, manifests.Rendered), b, 0o644)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "render:", err)
		os.Exit(1)
	}
}

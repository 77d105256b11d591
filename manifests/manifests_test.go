package manifests

import (
	"bytes"
	"os"
	"testing"
)

func TestRenderedIsCurrent(t *testing.T) {
	want, err := Render(".")
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(Rendered)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s is stale (it is not the build of %s): run `go run ./manifests/render` and commit it", Rendered, RenderedFrom)
	}
}

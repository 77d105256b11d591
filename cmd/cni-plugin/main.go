// Command netagent-cni is the CNI plugin a container runtime executes for each pod: it
// wires the pod's veth into the node bridge and gives it an address from the node subnet
// (ADD), and undoes that (DEL), verifies it (CHECK), reports readiness (STATUS) and drops
// what the runtime no longer knows about (GC).
//
// An error gets its CNI code where it is found (cmd.go, config.go; cniError keeps a code
// given further down). This file prints the error objects, each with the cniVersion the
// runtime spoke, which skel alone does not.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
)

// supported is every CNI version the plugin speaks; results are answered in the config's.
var supported = version.PluginSupports("0.3.1", "0.4.0", "1.0.0", "1.1.0")

const about = "netagent-cni: bridge + node-subnet IPAM CNI plugin of netagent"

func main() {
	stdin, err := replayStdin()
	if err != nil {
		printError("1.1.0", types.NewError(types.ErrIOFailure, "read stdin", err.Error()))
		os.Exit(1)
	}
	if e := skel.PluginMainFuncsWithError(skel.CNIFuncs{
		Add:    cmdAdd,
		Del:    cmdDel,
		Check:  cmdCheck,
		GC:     cmdGC,
		Status: cmdStatus,
	}, supported, about); e != nil {
		printError(errorVersion(stdin), e)
		os.Exit(1)
	}
}

// replayStdin reads the config so the error path knows its cniVersion, and puts an identical
// stream back for skel. VERSION and missing-command calls may have no stdin at all.
func replayStdin() ([]byte, error) {
	if os.Getenv("CNI_COMMAND") == "" || os.Getenv("CNI_COMMAND") == "VERSION" {
		return nil, nil
	}
	b, err := io.ReadAll(os.Stdin)
	if err != nil {
		return nil, err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	go func() {
		_, _ = w.Write(b)
		_ = w.Close()
	}()
	os.Stdin = r
	return b, nil
}

// errorVersion is the cniVersion an error object carries: the config's when it is one we
// speak, else the newest we speak.
func errorVersion(stdin []byte) string {
	var v struct {
		CNIVersion string `json:"cniVersion"`
	}
	if json.Unmarshal(stdin, &v) == nil {
		for _, s := range supported.SupportedVersions() {
			if s == v.CNIVersion {
				return s
			}
		}
	}
	return "1.1.0"
}

func printError(cniVersion string, e *types.Error) {
	out := struct {
		CNIVersion string `json:"cniVersion"`
		*types.Error
	}{cniVersion, e}
	b, err := json.MarshalIndent(out, "", "    ")
	if err != nil {
		fmt.Fprintln(os.Stderr, e.Error())
		return
	}
	_, _ = os.Stdout.Write(append(b, '\n'))
}

// cniError gives err a CNI code unless it already has one.
func cniError(code uint, msg string, err error) error {
	var e *types.Error
	if errors.As(err, &e) {
		return e
	}
	return types.NewError(code, msg, err.Error())
}

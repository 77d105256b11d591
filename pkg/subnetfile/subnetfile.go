// Package subnetfile is the contract between the node agent and the CNI plugin: the agent
// writes the node's leased subnet once its lease and first reconcile succeeded, the plugin
// reads it on ADD. The format is shell-style KEY=VALUE lines so an operator can `cat` or
// `source` it:
//
//	NETAGENT_NETWORK=10.244.0.0/16
//	NETAGENT_SUBNET=10.244.1.0/24
//	NETAGENT_MTU=1450
//
// The gateway is the subnet's first address. Unknown keys are ignored (newer agents may add
// some); known keys must parse.
package subnetfile

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/netagent/netagent/pkg/atomicfile"
)

// DefaultPath is where the agent writes and the plugin reads the file.
const DefaultPath = "/run/netagent/subnet.env"

// Info is the content of the subnet file.
type Info struct {
	Network netip.Prefix // the whole cluster pod network
	Subnet  netip.Prefix // this node's pod subnet
	MTU     int          // pod interface MTU
}

// Marshal renders the file content.
func (i Info) Marshal() []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "NETAGENT_NETWORK=%s\n", i.Network)
	fmt.Fprintf(&b, "NETAGENT_SUBNET=%s\n", i.Subnet)
	fmt.Fprintf(&b, "NETAGENT_MTU=%d\n", i.MTU)
	return b.Bytes()
}

// Parse reads file content; errors name the offending line.
func Parse(data []byte) (Info, error) {
	var i Info
	sc := bufio.NewScanner(bytes.NewReader(data))
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return Info{}, fmt.Errorf("line %d: want KEY=VALUE, got %q", n, line)
		}
		var err error
		switch k {
		case "NETAGENT_NETWORK":
			i.Network, err = netip.ParsePrefix(v)
		case "NETAGENT_SUBNET":
			i.Subnet, err = netip.ParsePrefix(v)
		case "NETAGENT_MTU":
			i.MTU, err = strconv.Atoi(v)
			if err == nil && (i.MTU < 576 || i.MTU > 65535) {
				err = fmt.Errorf("%d is out of range 576-65535", i.MTU)
			}
		}
		if err != nil {
			return Info{}, fmt.Errorf("line %d: %s: %w", n, k, err)
		}
	}
	if err := sc.Err(); err != nil {
		return Info{}, err
	}
	if !i.Subnet.IsValid() {
		return Info{}, errors.New("NETAGENT_SUBNET is missing")
	}
	if i.Subnet != i.Subnet.Masked() {
		return Info{}, fmt.Errorf("NETAGENT_SUBNET %s is not a network address (want %s)", i.Subnet, i.Subnet.Masked())
	}
	if i.Network.IsValid() && !i.Network.Contains(i.Subnet.Addr()) {
		return Info{}, fmt.Errorf("NETAGENT_SUBNET %s is outside NETAGENT_NETWORK %s", i.Subnet, i.Network)
	}
	return i, nil
}

// Read reads and parses the file at path.
func Read(path string) (Info, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Info{}, err
	}
	i, err := Parse(b)
	if err != nil {
		return Info{}, fmt.Errorf("%s: %w", path, err)
	}
	return i, nil
}

// Write replaces the file atomically (mode 0644: the subnet is no secret, and runtimes or
// tools running as other users may read it).
func Write(path string, i Info) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return atomicfile.Write(path, i.Marshal(), 0o644)
}

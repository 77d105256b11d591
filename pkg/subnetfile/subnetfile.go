// Package subnetfile is the contract between the node agent and the CNI plugin: the agent
// writes the node's leased subnet once its lease and first reconcile succeeded, the plugin
// reads it on ADD. The format is shell-style KEY=VALUE lines so an operator can `cat` or
// `source` it:
//
//	NETAGENT_NETWORK=10.244.0.0/16
//	NETAGENT_SUBNET=10.244.1.0/24
//	NETAGENT_MTU=1450
//	NETAGENT_IPV6_NETWORK=fd00:10:244::/48    (dual-stack and IPv6-only clusters)
//	NETAGENT_IPV6_SUBNET=fd00:10:244:1::/64
//
// An IPv6-only cluster's file has no NETAGENT_NETWORK and NETAGENT_SUBNET. The gateway is
// the subnet's first address. Unknown keys are ignored (newer agents may add
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
	// Network6 and Subnet6 are the IPv6 ones (unset: no IPv6).
	Network6, Subnet6 netip.Prefix
}

// Marshal renders the file content.
func (i Info) Marshal() []byte {
	var b bytes.Buffer
	if i.Subnet.IsValid() {
		fmt.Fprintf(&b, "NETAGENT_NETWORK=%s\n", i.Network)
		fmt.Fprintf(&b, "NETAGENT_SUBNET=%s\n", i.Subnet)
	}
	fmt.Fprintf(&b, "NETAGENT_MTU=%d\n", i.MTU)
	if i.Subnet6.IsValid() {
		fmt.Fprintf(&b, "NETAGENT_IPV6_NETWORK=%s\n", i.Network6)
		fmt.Fprintf(&b, "NETAGENT_IPV6_SUBNET=%s\n", i.Subnet6)
	}
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
		case "NETAGENT_IPV6_NETWORK":
			i.Network6, err = netip.ParsePrefix(v)
		case "NETAGENT_IPV6_SUBNET":
			i.Subnet6, err = netip.ParsePrefix(v)
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
	if !i.Subnet.IsValid() && !i.Subnet6.IsValid() {
		return Info{}, errors.New("NETAGENT_SUBNET is missing")
	}
	for _, f := range []struct {
		key, netKey     string
		subnet, network netip.Prefix
		v6              bool
	}{{"NETAGENT_SUBNET", "NETAGENT_NETWORK", i.Subnet, i.Network, false}, {"NETAGENT_IPV6_SUBNET", "NETAGENT_IPV6_NETWORK", i.Subnet6, i.Network6, true}} {
		switch {
		case !f.subnet.IsValid():
		case f.subnet.Addr().Is6() != f.v6 || f.subnet.Addr().Is4In6():
			return Info{}, fmt.Errorf("%s %s is of the wrong family", f.key, f.subnet)
		case f.subnet != f.subnet.Masked():
			return Info{}, fmt.Errorf("%s %s is not a network address (want %s)", f.key, f.subnet, f.subnet.Masked())
		case f.network.IsValid() && !f.network.Contains(f.subnet.Addr()):
			return Info{}, fmt.Errorf("%s %s is outside %s %s", f.key, f.subnet, f.netKey, f.network)
		}
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

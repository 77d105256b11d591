package main

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/netagent/netagent/pkg/bridge"
	"github.com/netagent/netagent/pkg/hostport"
	"github.com/netagent/netagent/pkg/ipam"
	"github.com/netagent/netagent/pkg/subnetfile"
)

const (
	defaultBridge  = "cni0"
	defaultDataDir = ipam.DefaultDataDir
	defaultMTU     = 1500
	defaultWait    = 5 * time.Second
)

// netConf is the plugin's configuration as the runtime passes it on stdin. It declares
// only the standard fields the plugin uses rather than embedding types.PluginConf: decoding
// runs once per ADD in a fresh process, where reflecting over every nested type of the
// full struct is a measurable part of the call.
type netConf struct {
	CNIVersion       string                `json:"cniVersion"`
	Name             string                `json:"name"`
	Type             string                `json:"type"`
	IPAM             struct{ Type string } `json:"ipam"`
	DNS              types.DNS             `json:"dns"`
	RawPrevResult    json.RawMessage       `json:"prevResult,omitempty"`
	ValidAttachments []types.GCAttachment  `json:"cni.dev/valid-attachments,omitempty"`
	PrevResult       types.Result          `json:"-"`

	Bridge           string `json:"bridge"`
	Subnet           string `json:"subnet"`
	RangeStart       string `json:"rangeStart"`
	RangeEnd         string `json:"rangeEnd"`
	Gateway          string `json:"gateway"`
	IPv6Subnet       string `json:"ipv6Subnet"`
	IPv6Gateway      string `json:"ipv6Gateway"`
	SubnetFile       string `json:"subnetFile"`
	SubnetFileWait   string `json:"subnetFileWait"`
	DataDir          string `json:"dataDir"`
	MTU              int    `json:"mtu"`
	HairpinMode      *bool  `json:"hairpinMode"`
	PodInterface     string `json:"podInterface"`
	IsDefaultGateway *bool  `json:"isDefaultGateway"`

	RuntimeConfig struct {
		PortMappings []hostport.Mapping `json:"portMappings,omitempty"`
	} `json:"runtimeConfig"`

	// Parsed and defaulted values.
	subnet, network  netip.Prefix
	subnet6          netip.Prefix
	start, end, gw   netip.Addr
	gw6              netip.Addr
	v4FromFile       bool // the IPv4 subnet comes from the agent's subnet file
	wait             time.Duration
	hairpin, defGW   bool
	routed           bool // podInterface "routed": no bridge, host routes (bridge.AddRouted)
	subnetFromAgent  bool
	delegateIPAM     bool
	subnetFileLoaded bool
}

// configError is an invalid-config error (CNI code 7) naming the field.
func configError(field, format string, args ...any) error {
	return types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("invalid %s: %s", field, fmt.Sprintf(format, args...)), "")
}

// parseConfig decodes and validates stdin. It does not look at the subnet file (that may
// wait); pool does.
func parseConfig(stdin []byte) (*netConf, error) { return parse(stdin, false) }

// parseConfigForDel is parseConfig for DEL: DEL must be able to clean up even after the
// config was changed to something ADD would refuse, so only what DEL uses (the network
// name, dataDir, the delegated IPAM type) is checked.
func parseConfigForDel(stdin []byte) (*netConf, error) { return parse(stdin, true) }

func parse(stdin []byte, forDel bool) (*netConf, error) {
	c := &netConf{}
	if err := json.Unmarshal(stdin, c); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("decode network config: %v", err), "")
	}
	if c.CNIVersion == "" {
		return nil, configError("cniVersion", "missing")
	}
	if _, _, _, err := version.ParseVersion(c.CNIVersion); err != nil {
		return nil, types.NewError(types.ErrIncompatibleCNIVersion, fmt.Sprintf("invalid cniVersion %q", c.CNIVersion), err.Error())
	}
	if len(c.RawPrevResult) > 0 && string(c.RawPrevResult) != "null" {
		pc := types.PluginConf{CNIVersion: c.CNIVersion}
		if err := json.Unmarshal(c.RawPrevResult, &pc.RawPrevResult); err != nil {
			return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("decode prevResult: %v", err), "")
		}
		if err := version.ParsePrevResult(&pc); err != nil {
			return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("decode prevResult: %v", err), "")
		}
		c.PrevResult = pc.PrevResult
	}
	if c.Bridge == "" {
		c.Bridge = defaultBridge
	}
	if c.DataDir == "" {
		c.DataDir = defaultDataDir
	}
	if !filepath.IsAbs(c.DataDir) {
		return nil, configError("dataDir", "%q is not an absolute path", c.DataDir)
	}
	c.delegateIPAM = c.IPAM.Type != ""
	if forDel {
		return c, nil
	}
	if err := bridge.ValidIfName(c.Bridge); err != nil {
		return nil, configError("bridge", "%v", err)
	}
	if c.MTU != 0 && (c.MTU < 576 || c.MTU > 65535) {
		return nil, configError("mtu", "%d is out of range 576-65535", c.MTU)
	}
	// IPv4 comes from the agent's subnet file unless the config fixes the subnets: an
	// explicit subnet, or an ipv6Subnet without a subnetFile (IPv6 only).
	c.v4FromFile = c.Subnet == "" && (c.IPv6Subnet == "" || c.SubnetFile != "")
	if c.SubnetFile == "" {
		c.SubnetFile = subnetfile.DefaultPath
	}
	if !filepath.IsAbs(c.SubnetFile) {
		return nil, configError("subnetFile", "%q is not an absolute path", c.SubnetFile)
	}
	c.wait = defaultWait
	if c.SubnetFileWait != "" {
		d, err := time.ParseDuration(c.SubnetFileWait)
		if err != nil || d < 0 || d > time.Minute {
			return nil, configError("subnetFileWait", "%q is not a duration between 0 and 1m", c.SubnetFileWait)
		}
		c.wait = d
	}
	c.hairpin = c.HairpinMode == nil || *c.HairpinMode
	c.defGW = c.IsDefaultGateway == nil || *c.IsDefaultGateway
	switch c.PodInterface {
	case "", "bridge":
	case "routed":
		c.routed = true
		if !c.defGW {
			return nil, configError("isDefaultGateway", "false with podInterface routed: a routed pod reaches everything, its own subnet too, through its default routes")
		}
	default:
		return nil, configError("podInterface", "%q is not bridge or routed", c.PodInterface)
	}
	for _, f := range []struct{ name, v string }{{"subnet", c.Subnet}, {"ipv6Subnet", c.IPv6Subnet}} {
		if c.delegateIPAM && f.v != "" {
			return nil, configError("ipam", "set either %s or an ipam section, not both", f.name)
		}
	}
	for i, m := range c.RuntimeConfig.PortMappings {
		if err := m.Validate(); err != nil {
			return nil, configError(fmt.Sprintf("runtimeConfig.portMappings[%d]", i), "%v", err)
		}
	}
	for _, f := range []struct {
		name string
		s    string
		dst  *netip.Addr
		v6   bool
	}{
		{"rangeStart", c.RangeStart, &c.start, false}, {"rangeEnd", c.RangeEnd, &c.end, false},
		{"gateway", c.Gateway, &c.gw, false}, {"ipv6Gateway", c.IPv6Gateway, &c.gw6, true},
	} {
		if f.s == "" {
			continue
		}
		a, err := netip.ParseAddr(f.s)
		if err != nil {
			return nil, configError(f.name, "%q is not an IP address", f.s)
		}
		if f.v6 && (!a.Is6() || a.Is4In6()) {
			return nil, configError(f.name, "%s is not an IPv6 address", a)
		}
		if !f.v6 && !a.Is4() {
			return nil, configError(f.name, "%s is not an IPv4 address (IPv6 goes in ipv6Gateway)", a)
		}
		*f.dst = a
	}
	if c.Subnet != "" {
		p, err := parseSubnet("subnet", c.Subnet)
		if err != nil {
			return nil, err
		}
		if !p.Addr().Is4() {
			return nil, configError("subnet", "%s: only IPv4 subnets go here (IPv6 goes in ipv6Subnet)", p)
		}
		if p.Bits() > 30 {
			return nil, configError("subnet", "%s is too small (at most /30)", p)
		}
		c.subnet = p
	}
	if c.IPv6Subnet != "" {
		p, err := parseSubnet("ipv6Subnet", c.IPv6Subnet)
		if err != nil {
			return nil, err
		}
		switch a := p.Addr(); {
		case !a.Is6() || a.Is4In6():
			return nil, configError("ipv6Subnet", "%s is not an IPv6 prefix (IPv4 goes in subnet)", p)
		case a.IsLinkLocalUnicast() || a.IsMulticast() || a.IsLoopback() || a.IsUnspecified():
			return nil, configError("ipv6Subnet", "%s is not a unicast prefix pods can use (link-local, multicast or loopback)", p)
		case p.Bits() < minV6Bits || p.Bits() > maxV6Bits:
			return nil, configError("ipv6Subnet", "prefix length /%d is out of range /%d-/%d", p.Bits(), minV6Bits, maxV6Bits)
		}
		c.subnet6 = p
	} else if c.gw6.IsValid() {
		return nil, configError("ipv6Gateway", "set without ipv6Subnet")
	}
	return c, nil
}

// The IPv6 node subnet's prefix length: a node subnet wider than /48 makes no sense, and
// /126 is the smallest with an address left after the gateway.
const minV6Bits, maxV6Bits = 48, 126

// parseSubnet parses a subnet field: a CIDR prefix with no host bits.
func parseSubnet(field, s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, configError(field, "%q is not a CIDR prefix", s)
	}
	if p != p.Masked() {
		return netip.Prefix{}, configError(field, "%s has host bits set (did you mean %s?)", p, p.Masked())
	}
	return p, nil
}

// mtu is the pod interface MTU: the config's, else the agent's, else 1500.
func (c *netConf) mtu(agent int) int {
	switch {
	case c.MTU != 0:
		return c.MTU
	case agent != 0:
		return agent
	}
	return defaultMTU
}

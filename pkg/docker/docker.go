// Package docker makes a Docker host use the subnet netagent leased for it (route mode):
// by writing `bip` and `mtu` into daemon.json, by checking that the docker bridge already
// carries the subnet, or by creating a user-defined bridge network on it. In a dual-stack
// cluster the host's IPv6 subnet goes the same ways (`ipv6` and `fixed-cidr-v6`, or the
// network's second IPAM pool). Docker has no IPv6-only bridge network, so a Docker host
// always needs the IPv4 subnet.
//
// The Engine API is spoken directly over its unix socket with net/http (three calls): the
// Docker SDK would bring in far more code than these calls need.
package docker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/netagent/netagent/pkg/atomicfile"
	"github.com/netagent/netagent/pkg/nldump"
)

// Gateway is the bridge address Docker should use for subnet: its first address, with the
// subnet's length (the form of `bip`).
func Gateway(subnet netip.Prefix) netip.Prefix {
	return netip.PrefixFrom(subnet.Addr().Next(), subnet.Bits())
}

// Subnets are the subnets a Docker host leased: V4 always, V6 in a dual-stack cluster.
type Subnets struct {
	V4, V6 netip.Prefix
}

func (s Subnets) String() string {
	if s.V6.IsValid() {
		return s.V4.String() + "," + s.V6.String()
	}
	return s.V4.String()
}

// WriteConfig merges bip and mtu (and with an IPv6 subnet, ipv6 and fixed-cidr-v6) into
// the daemon.json at path, keeping every other key. It reports whether the file changed
// (dockerd must then be restarted to apply it). Without an IPv6 subnet it leaves the IPv6
// keys as they are: they may be the admin's, for networks of their own.
func WriteConfig(path string, subnets Subnets, mtu int) (bool, error) {
	cfg := map[string]any{}
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return false, fmt.Errorf("read %s: %w", path, err)
	default:
		if len(bytes.TrimSpace(b)) > 0 {
			if err := json.Unmarshal(b, &cfg); err != nil {
				return false, fmt.Errorf("%s is not a JSON object: %w", path, err)
			}
		}
	}
	want := map[string]any{"bip": Gateway(subnets.V4).String(), "mtu": float64(mtu)}
	if subnets.V6.IsValid() {
		want["ipv6"], want["fixed-cidr-v6"] = true, subnets.V6.String()
	}
	same := true
	for k, v := range want {
		same = same && cfg[k] == v
		cfg[k] = v
	}
	if same {
		return false, nil
	}
	out, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return false, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return false, err
	}
	return true, atomicfile.Write(path, append(out, '\n'), 0o644)
}

// CheckBridge verifies that the bridge dev carries the gateway of each subnet; the error
// says what it carries instead and how to fix it.
func CheckBridge(h *netlink.Handle, dev string, subnets Subnets) error {
	want := Gateway(subnets.V4)
	l, err := h.LinkByName(dev)
	if err != nil {
		return fmt.Errorf("docker bridge %s not found (is dockerd running, started with --bip=%s?): %w", dev, want, err)
	}
	addrs, err := nldump.Retry(func() ([]netlink.Addr, error) { return h.AddrList(l, netlink.FAMILY_ALL) })
	if err != nil {
		return fmt.Errorf("addresses of %s: %w", dev, err)
	}
	has := func(want netip.Prefix) ([]string, bool) {
		var have []string
		for _, a := range addrs {
			ip, _ := netip.AddrFromSlice(a.IP)
			ip = ip.Unmap()
			if ip.Is4() != want.Addr().Is4() || ip.IsLinkLocalUnicast() {
				continue
			}
			ones, _ := a.Mask.Size()
			p := netip.PrefixFrom(ip, ones)
			if p == want {
				return nil, true
			}
			have = append(have, p.String())
		}
		return have, false
	}
	if have, ok := has(want); !ok {
		return fmt.Errorf("docker bridge %s carries %v, not the leased %s: start dockerd with --bip=%s (or let netagent write it: --write-docker-config /etc/docker/daemon.json)", dev, have, subnets.V4, want)
	}
	if subnets.V6.IsValid() {
		if have, ok := has(Gateway(subnets.V6)); !ok {
			return fmt.Errorf("docker bridge %s carries IPv6 %v, not the leased %s: start dockerd with --ipv6 --fixed-cidr-v6=%s (or let netagent write it: --write-docker-config /etc/docker/daemon.json)", dev, have, subnets.V6, subnets.V6)
		}
	}
	return nil
}

// BridgeSubnet is the subnet of dev's first IPv4 address (invalid when dev is missing or
// has none): what a host that already runs Docker has, and may keep (route mode adopts it
// when it is free in the cluster network).
func BridgeSubnet(h *netlink.Handle, dev string) netip.Prefix {
	l, err := h.LinkByName(dev)
	if err != nil {
		return netip.Prefix{}
	}
	addrs, err := h.AddrList(l, netlink.FAMILY_V4)
	if err != nil || len(addrs) == 0 {
		return netip.Prefix{}
	}
	ip, _ := netip.AddrFromSlice(addrs[0].IP.To4())
	ones, _ := addrs[0].Mask.Size()
	return netip.PrefixFrom(ip, ones).Masked()
}

// Holder names the link carrying an address inside subnet, of either family ("" when none
// does).
func Holder(h *netlink.Handle, subnet netip.Prefix) (string, netip.Prefix) {
	addrs, err := h.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return "", netip.Prefix{}
	}
	for _, a := range addrs {
		ip, _ := netip.AddrFromSlice(a.IP)
		if ip = ip.Unmap(); !subnet.Contains(ip) {
			continue
		}
		ones, _ := a.Mask.Size()
		name := fmt.Sprint(a.LinkIndex)
		if l, err := h.LinkByIndex(a.LinkIndex); err == nil {
			name = l.Attrs().Name
		}
		return name, netip.PrefixFrom(ip, ones)
	}
	return "", netip.Prefix{}
}

// DefaultConfig is dockerd's daemon.json when it is started without --config-file.
const DefaultConfig = "/etc/docker/daemon.json"

// FlagConflicts lists the running dockerd processes (found under procRoot, normally
// /proc) that read configPath and set bip or mtu on their command line: dockerd refuses
// to start when a directive is both a flag and in daemon.json, so writing ours would
// break their next restart. Each entry says "pid N: --flag".
func FlagConflicts(procRoot, configPath string) []string {
	entries, err := os.ReadDir(procRoot)
	if err != nil {
		return nil
	}
	want := filepath.Clean(configPath)
	var out []string
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(procRoot, e.Name(), "cmdline"))
		if err != nil || len(b) == 0 {
			continue
		}
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if filepath.Base(args[0]) != "dockerd" {
			continue
		}
		cfg, flags := DefaultConfig, []string{}
		for i, a := range args[1:] {
			name, val, hasVal := strings.Cut(a, "=")
			switch name {
			case "--config-file":
				if !hasVal && i+2 < len(args) {
					val = args[i+2]
				}
				cfg = val
			case "--bip", "--mtu":
				flags = append(flags, name)
			}
		}
		if len(flags) > 0 && filepath.Clean(cfg) == want {
			out = append(out, fmt.Sprintf("pid %s: %s", e.Name(), strings.Join(flags, " ")))
		}
	}
	return out
}

// Client talks to the Docker Engine API on a unix socket.
type Client struct {
	path string
	http *http.Client
}

// NewClient returns a client for the socket at path.
func NewClient(path string) *Client {
	return &Client{path: path, http: &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		}},
	}}
}

type pool struct {
	Subnet  string `json:"Subnet"`
	Gateway string `json:"Gateway,omitempty"`
}

type network struct {
	Name       string            `json:"Name"`
	Driver     string            `json:"Driver"`
	EnableIPv6 bool              `json:"EnableIPv6,omitempty"`
	Options    map[string]string `json:"Options,omitempty"`
	IPAM       struct {
		Config []pool `json:"Config"`
	} `json:"IPAM"`
}

// EnsureNetwork creates the bridge network name on the subnets (with mtu) unless it
// exists; an existing network on other subnets is an error, not silently replaced
// (containers may be attached to it).
func (c *Client) EnsureNetwork(ctx context.Context, name string, subnets Subnets, mtu int) error {
	var cur network
	code, err := c.do(ctx, http.MethodGet, "/networks/"+name, nil, &cur)
	if err != nil {
		return err
	}
	want := []netip.Prefix{subnets.V4}
	if subnets.V6.IsValid() {
		want = append(want, subnets.V6)
	}
	if code == http.StatusOK {
		missing := slices.DeleteFunc(slices.Clone(want), func(p netip.Prefix) bool {
			return slices.ContainsFunc(cur.IPAM.Config, func(c pool) bool { return c.Subnet == p.String() })
		})
		if len(missing) == 0 {
			return nil
		}
		return fmt.Errorf("docker network %s exists on %+v, not the leased %s: remove it (docker network rm %s) and netagent recreates it", name, cur.IPAM.Config, subnets, name)
	}
	n := network{Name: name, Driver: "bridge", EnableIPv6: subnets.V6.IsValid(), Options: map[string]string{"com.docker.network.driver.mtu": strconv.Itoa(mtu)}}
	for _, p := range want {
		n.IPAM.Config = append(n.IPAM.Config, pool{p.String(), Gateway(p).Addr().String()})
	}
	code, err = c.do(ctx, http.MethodPost, "/networks/create", n, nil)
	if err != nil {
		return err
	}
	if code != http.StatusCreated && code != http.StatusOK {
		return fmt.Errorf("create docker network %s: HTTP %d", name, code)
	}
	return nil
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) (int, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return 0, err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://docker"+path, body)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
		return 0, fmt.Errorf("dockerd is not listening on %s (not running yet, or another --docker-socket?): %w", c.path, err)
	}
	if err != nil {
		return 0, fmt.Errorf("docker API %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode >= 400 && resp.StatusCode != http.StatusNotFound {
		return resp.StatusCode, fmt.Errorf("docker API %s %s: HTTP %d: %s", method, path, resp.StatusCode, bytes.TrimSpace(b))
	}
	if out != nil && resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(b, out); err != nil {
			return resp.StatusCode, fmt.Errorf("docker API %s %s: %w", method, path, err)
		}
	}
	return resp.StatusCode, nil
}

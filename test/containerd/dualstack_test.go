package containerd

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"
)

var (
	podSubnet6 = netip.MustParsePrefix("fd00:244:1::/64")
	// nodeAddr6 is the node's IPv6 address, the one an IPv6 hostPort is reached on.
	nodeAddr6 = netip.MustParsePrefix("2001:db8::10/128")
)

// TestNetagentCNIDualStackUnderContainerd is TestNetagentCNIUnderContainerd on a
// dual-stack network (subnet + ipv6Subnet): containerd reads both of a pod's addresses from
// the plugin's result (PodSandboxStatus ip and additional_ips), the pods reach each other
// and the node over both families, a hostPort answers over both, and StopPodSandbox and
// RemovePodSandbox release both addresses and leave no interface or NAT rule behind.
func TestNetagentCNIDualStackUnderContainerd(t *testing.T) { runNetagent(t, podSubnet6, false) }

// TestNetagentCNIRoutedUnderContainerd is the dual-stack scenario with routed pods
// (podInterface routed): no bridge, host-prefix addresses via 169.254.1.1 and fe80::1,
// the same reachability, host ports and clean removal under the real runtime.
func TestNetagentCNIRoutedUnderContainerd(t *testing.T) { runNetagent(t, podSubnet6, true) }

// gateways are the bridge addresses a scenario needs beyond the IPv4 gateway.
func (sc scenario) gateways() []netip.Prefix {
	if !sc.subnet6.IsValid() {
		return nil
	}
	return []netip.Prefix{gateway6(sc.subnet6)}
}

// gateway6 is the IPv6 gateway the plugin puts on the bridge: the subnet's first address.
func gateway6(subnet netip.Prefix) netip.Prefix {
	return netip.PrefixFrom(subnet.Masked().Addr().Next(), subnet.Bits())
}

func podIP(p *pod) string { return p.ip }

// podIP6 is the pod's IPv6 address from PodSandboxStatus (invalid if it has none).
func podIP6(p *pod) netip.Addr {
	for _, s := range append([]string{p.ip}, p.additional...) {
		if a, err := netip.ParseAddr(s); err == nil && a.Is6() && !a.Is4In6() {
			return a
		}
	}
	return netip.Addr{}
}

func podIP6String(p *pod) string { return podIP6(p).String() }

// checkIPv6 is runPods' checks of a dual-stack network over IPv6, while the pods run.
func checkIPv6(ctx context.Context, t *testing.T, n *node, pods []*pod, servers []string, sc scenario) {
	gw := gateway6(sc.subnet6)
	t.Run("distinct IPv6 addresses in the pod subnet", func(t *testing.T) {
		seen := map[netip.Addr]string{}
		for _, p := range pods {
			ip := podIP6(p)
			if !sc.subnet6.Contains(ip) || ip == sc.subnet6.Addr() || ip == gw.Addr() {
				t.Errorf("pod %s has IPv6 address %v (PodSandboxStatus additional_ips %v), want a host address of %s other than the gateway %s", p.name, ip, p.additional, sc.subnet6, gw.Addr())
			}
			if other, dup := seen[ip]; dup {
				t.Errorf("pods %s and %s both have IPv6 address %s", other, p.name, ip)
			}
			seen[ip] = p.name
		}
	})
	t.Run("pod IPv6 address usable and IPv6 default route", func(t *testing.T) {
		for i, p := range pods {
			// `ip addr` flags an address still doing duplicate address detection "tentative":
			// the plugin must hand over a usable one.
			addrs, err := n.execSync(ctx, servers[i], 5*time.Second, "ip", "-o", "-6", "addr", "show", "dev", "eth0", "scope", "global")
			want := sc.podAddr(podIP6(p).String(), sc.subnet6)
			switch {
			case err != nil:
				t.Errorf("pod %s: %v", p.name, err)
			case !strings.Contains(addrs, " "+want+" "):
				t.Errorf("pod %s: eth0 IPv6 addresses %q, want %s", p.name, strings.TrimSpace(addrs), want)
			case strings.Contains(addrs, "tentative"):
				t.Errorf("pod %s: eth0 IPv6 address still tentative after RunPodSandbox: %q", p.name, strings.TrimSpace(addrs))
			}
			routes, err := n.execSync(ctx, servers[i], 5*time.Second, "ip", "-6", "route", "show", "default")
			if err != nil {
				t.Errorf("pod %s: %v", p.name, err)
			} else if want := "default via " + sc.gateway(true); !strings.Contains(routes, want) {
				t.Errorf("pod %s: IPv6 default route %q, want %q", p.name, strings.TrimSpace(routes), want)
			}
		}
	})
	t.Run("node pings every pod over IPv6", func(t *testing.T) {
		for p, err := range pingAll(ctx, n.ns, pods, podIP6String) {
			if err != nil {
				t.Errorf("ping pod %s at %s from the node: %v", p.name, podIP6(p), err)
			}
		}
	})
	t.Run("pod to pod TCP over IPv6", func(t *testing.T) {
		for i, p := range pods {
			dst := pods[(i+1)%len(pods)]
			ip := podIP6(dst).String()
			out, err := n.execSync(ctx, servers[i], 5*time.Second, "nc", "-w", "2", ip, fmt.Sprint(serverPort))
			if err != nil {
				t.Errorf("pod %s -> %s ([%s]:%d): %v", p.name, dst.name, ip, serverPort, err)
			} else if got := strings.TrimSpace(out); got != dst.name {
				t.Errorf("pod %s -> %s ([%s]:%d) answered %q, want %q", p.name, dst.name, ip, serverPort, got, dst.name)
			}
		}
	})
	if sc.hostPort {
		t.Run("host port reaches its pod over IPv6", func(t *testing.T) {
			addr := fmt.Sprintf("[%s]:%d", nodeAddr6.Addr(), hostPort)
			out, err := n.ns.Run("/bin/busybox", "nc", "-w", "2", nodeAddr6.Addr().String(), fmt.Sprint(hostPort))
			if err != nil {
				t.Fatalf("connect to %s from the node: %v", addr, err)
			}
			if got := strings.TrimSpace(out); got != pods[0].name {
				t.Errorf("%s answered %q, want %q", addr, got, pods[0].name)
			}
		})
	}
}

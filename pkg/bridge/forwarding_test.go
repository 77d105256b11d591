package bridge_test

import (
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/bridge"
	"github.com/netagent/netagent/test/netns"
)

// EnsureForwarding turns on what is off, and only that, in a namespace's every state of
// the two switches (the kernel's answer over netlink decides what it writes).
func TestEnsureForwarding(t *testing.T) {
	netns.RequireRoot(t)
	const v4, v6 = "/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"
	for _, tc := range []struct {
		name         string
		before4      string
		before6      string
		ipv6         bool
		want4, want6 string
	}{
		{"both off, IPv4 only", "0", "0", false, "1", "0"},
		{"both off, dual stack", "0", "0", true, "1", "1"},
		{"IPv4 on, dual stack", "1", "0", true, "1", "1"},
		{"IPv6 on, dual stack", "0", "1", true, "1", "1"},
		{"both on", "1", "1", true, "1", "1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := netns.New(t, "fwd")
			read := func(p string) string {
				b, err := os.ReadFile(p)
				if err != nil {
					t.Fatal(err)
				}
				return strings.TrimSpace(string(b))
			}
			if err := ns.Do(func() error {
				if err := os.WriteFile(v4, []byte(tc.before4), 0o644); err != nil {
					return err
				}
				if err := os.WriteFile(v6, []byte(tc.before6), 0o644); err != nil {
					return err
				}
				on, err := bridge.ForwardingOn([]int{unix.AF_INET, unix.AF_INET6})
				if err != nil {
					return err
				}
				if on[unix.AF_INET] != (tc.before4 == "1") || on[unix.AF_INET6] != (tc.before6 == "1") {
					t.Errorf("netlink says forwarding is %v with the files at %s/%s", on, tc.before4, tc.before6)
				}
				if err := bridge.EnsureForwarding(tc.ipv6); err != nil {
					return err
				}
				if got4, got6 := read(v4), read(v6); got4 != tc.want4 || got6 != tc.want6 {
					t.Errorf("forwarding after EnsureForwarding(%v) = %s/%s, want %s/%s", tc.ipv6, got4, got6, tc.want4, tc.want6)
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
		})
	}
}

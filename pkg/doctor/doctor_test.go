package doctor

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/netagent/netagent/pkg/nat"
	"github.com/netagent/netagent/test/netns"
)

// TestIPv6Checks runs doctor in a node namespace set up each way its IPv6 checks tell
// apart, and checks each verdict. Every sysctl is set inside the namespace.
func TestIPv6Checks(t *testing.T) {
	netns.RequireRoot(t)
	const dual = `{"cniVersion":"1.0.0","name":"netagent","plugins":[{"type":"netagent-cni","subnet":"10.244.1.0/24","ipv6Subnet":"fd00:244:1::/64"}]}`
	const v4 = `{"cniVersion":"1.0.0","name":"netagent","plugins":[{"type":"netagent-cni","subnet":"10.244.1.0/24"}]}`
	healthy := [][]string{
		{"sysctl", "-qw", "net.ipv6.conf.eth0.accept_ra=2"},
		{"sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"},
		{"ip6tables", "-P", "FORWARD", "DROP"},
		{"ip6tables", "-N", nat.FwdChain},
		{"ip6tables", "-A", "FORWARD", "-j", nat.FwdChain},
	}
	// want maps a check to its severity and a piece of its message; a check missing from
	// the output has severity "".
	type verdict struct {
		sev  Severity
		text string
	}
	tests := []struct {
		name     string
		conflist string
		iface    string // the --iface flag
		setup    [][]string
		want     map[string]verdict
	}{
		{"IPv4-only network: no IPv6 checks", v4, "eth0", nil, map[string]verdict{
			"IPv6 forwarding": {}, "accept_ra": {}, "IPv6 FORWARD": {},
		}},
		{"a fresh node", dual, "eth0", nil, map[string]verdict{
			"CNI config":      {OK, "IPv6 subnet fd00:244:1::/64"},
			"IPv6 forwarding": {Problem, "net.ipv6.conf.all.forwarding is 0"},
			"accept_ra":       {Problem, "accept_ra is 1 on eth0: with IPv6 forwarding on, the kernel ignores router advertisements unless accept_ra is 2"},
			"IPv6 FORWARD":    {Warn, "not hooked into IPv6 FORWARD (policy ACCEPT"},
		}},
		{"healthy", dual, "eth0", healthy, map[string]verdict{
			"IPv6 forwarding": {OK, "forwarding = 1"},
			"accept_ra":       {OK, "accept_ra = 2 on eth0"},
			"IPv6 FORWARD":    {OK, "policy DROP, netagent's accept chain first"},
		}},
		{"forwarding with accept_ra 1 and an RA-learned default route", dual, "eth0", [][]string{
			{"sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"},
			{"ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0", "proto", "ra"},
		}, map[string]verdict{
			"IPv6 forwarding": {OK, ""},
			"accept_ra":       {Problem, "so this node loses its IPv6 default route"},
		}},
		{"accept_ra 1 with a static default route, uplink found by route", dual, "", [][]string{
			{"sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"},
			{"ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0"},
		}, map[string]verdict{
			"accept_ra": {OK, "accept_ra = 1 on eth0, but the IPv6 default route is static"},
		}},
		{"accept_ra 0", dual, "eth0", [][]string{{"sysctl", "-qw", "net.ipv6.conf.eth0.accept_ra=0"}}, map[string]verdict{
			"accept_ra": {OK, "accept_ra = 0 on eth0"},
		}},
		{"FORWARD policy DROP without our chain", dual, "eth0", [][]string{{"ip6tables", "-P", "FORWARD", "DROP"}}, map[string]verdict{
			"IPv6 FORWARD": {Problem, "IPv6 FORWARD policy is DROP and netagent's accept chain is not hooked in: pod IPv6 traffic between nodes is dropped"},
		}},
		{"our chain below a DROP rule", dual, "eth0", append(healthy, []string{"ip6tables", "-I", "FORWARD", "1", "-s", "2001:db8::1", "-j", "DROP"}), map[string]verdict{
			"IPv6 FORWARD": {Problem, "rule 2 in IPv6 FORWARD, not first"},
		}},
		{"ipv6Subnet not IPv6", strings.Replace(dual, "fd00:244:1::/64", "10.9.0.0/16", 1), "eth0", nil, map[string]verdict{
			"CNI config":      {Problem, `ipv6Subnet "10.9.0.0/16" is not an IPv6 prefix`},
			"IPv6 forwarding": {},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			n := netns.New(t, "doctor")
			n.MustRun(t, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
			n.MustRun(t, "ip", "link", "set", "eth0", "up")
			for _, c := range tc.setup {
				n.MustRun(t, c[0], c[1:]...)
			}
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, "10-netagent.conflist"), []byte(tc.conflist), 0o644); err != nil {
				t.Fatal(err)
			}
			var got []Finding
			if err := n.Do(func() error {
				got = Run(Options{SubnetFile: filepath.Join(dir, "subnet.env"), CNIConfDir: dir, Bridge: "cni0", Underlay: tc.iface})
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			for check, want := range tc.want {
				var f *Finding
				for i := range got {
					if got[i].Check == check {
						f = &got[i]
						break
					}
				}
				switch {
				case f == nil && want.sev != "":
					t.Errorf("no %q finding, want %s %q; got %v", check, want.sev, want.text, got)
				case f != nil && want.sev == "":
					t.Errorf("%q finding %v, want none", check, *f)
				case f != nil && (f.Severity != want.sev || !strings.Contains(f.What, want.text)):
					t.Errorf("%q finding = %s %q, want %s containing %q", check, f.Severity, f.What, want.sev, want.text)
				}
			}
		})
	}
}

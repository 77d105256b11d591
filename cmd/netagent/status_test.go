package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/agent"
)

func TestPrintStatusStore(t *testing.T) {
	since := time.Now().Add(-time.Minute)
	tests := []struct {
		name  string
		store *agent.StoreStatus
		want  string // "" : no store line
	}{
		{"no health (kube)", nil, ""},
		{"connected", &agent.StoreStatus{State: "connected", Since: since}, ""},
		{"unreachable", &agent.StoreStatus{State: "unreachable", Since: since, Error: "etcd unreachable: context deadline exceeded"},
			"store unreachable since " + since.UTC().Format(time.RFC3339) + " (1m0s ago): etcd unreachable: context deadline exceeded"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b strings.Builder
			if err := printStatus(&b, agent.Status{Node: "n1", Store: tt.store}, ""); err != nil {
				t.Fatal(err)
			}
			got := ""
			for _, line := range strings.Split(b.String(), "\n") {
				if strings.HasPrefix(line, "store ") {
					got = line
				}
			}
			if got != tt.want {
				t.Errorf("printStatus store line = %q, want %q", got, tt.want)
			}
		})
	}
}

// TestStatusIPv6: status shows the node's IPv6 pod subnet, right below the node line, when
// the CNI config the runtime uses gives netagent-cni one, and nothing otherwise.
func TestStatusIPv6(t *testing.T) {
	const dual = `{"cniVersion":"1.0.0","name":"netagent","plugins":[{"type":"netagent-cni","subnetFile":"/run/netagent/subnet.env","ipv6Subnet":"fd00:244:1::/64"},{"type":"portmap"}]}`
	tests := []struct {
		name  string
		files map[string]string // CNI config dir content; nil: no directory
		want  string            // the second line of the output; "" : no IPv6 line
	}{
		{"dual stack", map[string]string{"10-netagent.conflist": dual}, "IPv6 subnet fd00:244:1::/64 (from DIR/10-netagent.conflist)"},
		{"IPv4 only", map[string]string{"10-netagent.conflist": `{"cniVersion":"1.0.0","name":"netagent","plugins":[{"type":"netagent-cni","subnetFile":"/run/netagent/subnet.env"}]}`}, ""},
		{"another network first", map[string]string{"00-other.conf": `{"cniVersion":"1.0.0","name":"x","type":"bridge","ipv6Subnet":"fd00:1::/64"}`, "10-netagent.conflist": dual}, ""},
		{"no CNI config directory", nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "net.d")
			if tt.files != nil {
				if err := os.Mkdir(dir, 0o755); err != nil {
					t.Fatal(err)
				}
				for name, data := range tt.files {
					if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
						t.Fatal(err)
					}
				}
			}
			var b strings.Builder
			if err := printStatus(&b, agent.Status{Node: "n1"}, cniIPv6(dir)); err != nil {
				t.Fatal(err)
			}
			lines := strings.Split(b.String(), "\n")
			got := lines[1]
			if !strings.HasPrefix(got, "IPv6 ") {
				got = ""
			}
			if want := strings.ReplaceAll(tt.want, "DIR", dir); got != want {
				t.Errorf("status line 2 = %q, want %q\n%s", got, want, b.String())
			}
		})
	}
}

// TestStatusDualStack: the agent's own IPv6 subnet comes first (the CNI files may live in
// another mount namespace, as under a kubelet), and the peer table shows both families.
func TestStatusDualStack(t *testing.T) {
	st := agent.Status{Node: "n1", Subnet: "10.244.1.0/24", Subnet6: "fd00:0:0:1::/64", Network6: "fd00::/48", PublicIP6: "2001:db8::1",
		Peers: []agent.PeerStatus{
			{Node: "n2", Subnet: "10.244.2.0/24", Subnet6: "fd00:0:0:2::/64", PublicIP: "192.0.2.2", PublicIP6: "2001:db8::2", Mode: "vxlan", Route: true},
			{Node: "n3", Subnet6: "fd00:0:0:3::/64", PublicIP6: "2001:db8::3", Mode: "direct", Route: true},
		}}
	var b strings.Builder
	if err := printStatus(&b, st, "IPv6 subnet from a CNI file"); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"\nIPv6 subnet fd00:0:0:1::/64  network fd00::/48  public IP 2001:db8::1\n",
		"n2    10.244.2.0/24,fd00:0:0:2::/64  192.0.2.2,2001:db8::2",
		"n3    fd00:0:0:3::/64                2001:db8::3",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "CNI file") {
		t.Errorf("status shows the CNI file's IPv6 line although the agent reports its own:\n%s", out)
	}
}

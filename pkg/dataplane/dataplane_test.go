package dataplane

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/lease"
	"github.com/netagent/netagent/pkg/nat"
	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/test/netns"
)

// nsIPTables runs iptables inside a test namespace.
type nsIPTables struct{ n *netns.NS }

func (r nsIPTables) Save(_ context.Context, v6 bool) (string, error) {
	return r.n.Run(nat.Binary(v6) + "-save")
}

func (r nsIPTables) Restore(ctx context.Context, v6 bool, input string) error {
	cmd := r.n.Command(ctx, nat.Binary(v6)+"-restore", "--noflush", "-w", "5")
	cmd.Stdin = strings.NewReader(input)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s-restore: %s: %w", nat.Binary(v6), out, err)
	}
	return nil
}

// refs are copies of ls as plan.Input.Peers and Planner.Update take them.
func refs(ls ...lease.Lease) []*lease.Lease {
	out := make([]*lease.Lease, len(ls))
	for i, l := range ls {
		out[i] = &l
	}
	return out
}

func peer(node, subnet, ip string) lease.Lease {
	return lease.Lease{Node: node, Subnet: netip.MustParsePrefix(subnet), PublicIP: netip.MustParseAddr(ip), VTEPMAC: plan.VTEPMAC(node).String()}
}

// TestSetTransitions applies plans in order to a namespace's kernel: a full plan creates
// everything; the same plan again changes nothing; a delta changes only its entries; a
// delta that does not follow the last plan is refused; what someone deletes by hand is
// put back by the next full Set once the mirrors are invalidated.
func TestSetTransitions(t *testing.T) {
	netns.RequireRoot(t)
	n := netns.New(t, "dataplane")
	n.MustRun(t, "ip", "link", "add", "eth0", "type", "bridge")
	n.MustRun(t, "ip", "addr", "add", "192.0.2.11/24", "dev", "eth0")
	n.MustRun(t, "ip", "link", "set", "eth0", "up")
	d := newIn(t, n)
	ctx := t.Context()
	cfg, err := config.Parse([]byte(`{"network":"10.244.0.0/16","backend":{"type":"hybrid"}}`))
	if err != nil {
		t.Fatal(err)
	}
	var ul Underlay
	if ul, err = d.Underlay("eth0", netip.Addr{}); err != nil {
		t.Fatal(err)
	}
	in := plan.Input{Config: cfg, Self: peer("n1", "10.244.1.0/24", "192.0.2.11"), Underlay: plan.Underlay{Dev: ul.Dev, MTU: ul.MTU, Connected: ul.Connected},
		Peers: refs(peer("n2", "10.244.2.0/24", "192.0.2.12"), peer("n3", "10.244.3.0/24", "198.51.100.13"))}
	planner, p := plan.NewPlanner(in)

	routes := func() string { return n.MustRun(t, "ip", "route", "show", "proto", "180") }
	contains := func(step, what, got string, want ...string) {
		t.Helper()
		for _, w := range want {
			if !strings.Contains(got, w) {
				t.Errorf("%s: %s lacks %q:\n%s", step, what, w, got)
			}
		}
	}

	st, err := d.Set(ctx, p)
	if err != nil {
		t.Fatalf("first Set: %v", err)
	}
	if st.Routes.Added != 2 || !st.VXLAN.DeviceCreated || !st.Allow.Rebuilt || st.NAT.ChainsRewritten != 2 {
		t.Errorf("first Set stats %+v, want 2 routes, the device, the allow-list and both NAT chains", st)
	}
	contains("first Set", "routes", routes(), "10.244.2.0/24 via 192.0.2.12 dev eth0", "10.244.3.0/24 via 10.244.3.0 dev netagent.1 onlink mtu 1450")
	contains("first Set", "fdb", n.MustRun(t, "bridge", "fdb", "show", "dev", "netagent.1"), plan.VTEPMAC("n3").String()+" dst 198.51.100.13 self permanent")
	contains("first Set", "device", n.MustRun(t, "ip", "-d", "link", "show", "netagent.1"), plan.VTEPMAC("n1").String(), "vxlan id 1", "dev eth0")
	contains("first Set", "allow-list", n.MustRun(t, "nft", "list", "table", "ip", "netagent"), "192.0.2.12", "198.51.100.13")
	contains("first Set", "NAT", n.MustRun(t, "iptables-save", "-t", "nat"), "-s 10.244.1.0/24 ! -d 224.0.0.0/4")

	if st, err := d.Set(ctx, p); err != nil || st.Changed() {
		t.Errorf("same plan again: %+v, %v; want no change", st, err)
	}

	next := planner.Update(refs(peer("n4", "10.244.4.0/24", "198.51.100.14")))
	st, err = d.Set(ctx, next)
	if err != nil || st.Routes.Added != 1 || st.VXLAN.NeighSet != 1 || st.VXLAN.FDBSet != 1 || st.Allow.Added == 0 || st.NAT.Changed() {
		t.Errorf("delta with n4: %+v, %v; want its route, neighbour, FDB and allow-list entries only", st, err)
	}
	contains("delta", "routes", routes(), "10.244.4.0/24 via 10.244.4.0 dev netagent.1 onlink")

	stale := planner.Update(refs(lease.Lease{Node: "n4"}))
	stale.Delta.From = 12345
	if _, err := d.Set(ctx, stale); !errors.Is(err, ErrStale) {
		t.Errorf("delta from another plan: %v, want ErrStale", err)
	}
	if !strings.Contains(routes(), "10.244.4.0/24") {
		t.Error("a refused delta changed the kernel")
	}

	n.MustRun(t, "ip", "route", "del", "10.244.2.0/24")
	d.Invalidate(Tables)
	full := planner.Plan()
	st, err = d.Set(ctx, full)
	if err != nil || st.Routes.Added != 1 || st.Routes.Deleted != 1 {
		t.Errorf("full plan after a route was deleted by hand (and n4 left): %+v, %v; want it back and n4's gone", st, err)
	}
	got := routes()
	contains("repair", "routes", got, "10.244.2.0/24 via 192.0.2.12")
	if strings.Contains(got, "10.244.4.0/24") {
		t.Errorf("n4's route still there:\n%s", got)
	}
}

// An underlay IPv6 address in duplicate address detection is reported as tentative, not
// taken; once detection ends it is the node's IPv6 address.
func TestUnderlayTentative6(t *testing.T) {
	netns.RequireRoot(t)
	n := netns.New(t, "underlay6")
	// A veth pair (a bridge without ports has no carrier, and no detection runs then).
	n.MustRun(t, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
	n.MustRun(t, "sysctl", "-qw", "net.ipv6.conf.eth0.dad_transmits=2")
	n.MustRun(t, "ip", "link", "set", "eth1", "up")
	n.MustRun(t, "ip", "link", "set", "eth0", "up")
	n.MustRun(t, "ip", "addr", "add", "2001:db8:1::11/64", "dev", "eth0")
	d := newIn(t, n)
	tentative := func() bool {
		return strings.Contains(n.MustRun(t, "ip", "-6", "addr", "show", "dev", "eth0", "tentative"), "2001:db8:1::11")
	}
	for _, c := range []struct {
		name      string
		ip6       string
		tentative bool
	}{
		{"in detection", "invalid IP", true},
		{"after detection", "2001:db8:1::11", false},
	} {
		deadline := time.Now().Add(10 * time.Second)
		for tentative() != c.tentative {
			if time.Now().After(deadline) {
				t.Fatalf("%s: the address never got there:\n%s", c.name, n.MustRun(t, "ip", "-6", "addr"))
			}
			time.Sleep(20 * time.Millisecond)
		}
		ul, err := d.Underlay("eth0", netip.Addr{})
		if err != nil || ul.IP6.String() != c.ip6 || ul.Tentative6 != c.tentative {
			t.Errorf("%s: Underlay() = IP6 %s tentative %v, %v; want %s, %v", c.name, ul.IP6, ul.Tentative6, err, c.ip6, c.tentative)
		}
	}
	// No usable address and none coming: an error, as before.
	n.MustRun(t, "ip", "addr", "flush", "dev", "eth0", "scope", "global")
	if _, err := d.Underlay("eth0", netip.Addr{}); err == nil {
		t.Error("Underlay() of an interface without addresses: no error")
	}
}

// newIn is a dataplane of namespace n, logging to the test.
func newIn(t *testing.T, n *netns.NS) *Linux {
	t.Helper()
	var d *Linux
	if err := n.Do(func() (err error) {
		d, err = New(slog.New(slog.NewTextHandler(t.Output(), nil)), nsIPTables{n})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return d
}

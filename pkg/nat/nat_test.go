package nat

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/test/netns"
)

// nsRunner runs iptables inside a test namespace.
type nsRunner struct{ n *netns.NS }

func (r nsRunner) Save(ctx context.Context, v6 bool) (string, error) {
	return r.n.Run(Binary(v6) + "-save")
}

func (r nsRunner) Restore(ctx context.Context, v6 bool, input string) error {
	cmd := r.n.Command(ctx, Binary(v6)+"-restore", "--noflush", "-w", "5")
	cmd.Stdin = strings.NewReader(input)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return &restoreErr{string(out)}
	}
	return nil
}

type restoreErr struct{ out string }

func (e *restoreErr) Error() string { return "iptables-restore: " + e.out }

func TestSyncTransitions(t *testing.T) {
	netns.RequireRoot(t)
	n := netns.New(t, "nat")
	n.MustRun(t, "iptables", "-P", "FORWARD", "DROP")
	n.MustRun(t, "iptables", "-A", "FORWARD", "-i", "lo", "-j", "ACCEPT")
	r := New(nsRunner{n})
	ctx := context.Background()
	p := plan.NAT{Network: netip.MustParsePrefix("10.244.0.0/16"), Subnet: netip.MustParsePrefix("10.244.1.0/24")}

	steps := []struct {
		name   string
		before []string // iptables commands run first
		want   Stats
	}{
		{"first sync", nil, Stats{ChainsRewritten: 2, JumpsFixed: 2}},
		{"no change", nil, Stats{}},
		{"someone inserts above our jump", []string{"-I FORWARD 1 -s 192.0.2.66 -j DROP"}, Stats{JumpsFixed: 1}},
		{"our chain flushed", []string{"-t nat -F " + PostChain}, Stats{ChainsRewritten: 1}},
		{"a rule of ours deleted", []string{"-D " + FwdChain + " 2"}, Stats{ChainsRewritten: 1}},
		{"jump and chain removed", []string{"-D FORWARD -j " + FwdChain, "-F " + FwdChain, "-X " + FwdChain}, Stats{ChainsRewritten: 1, JumpsFixed: 1}},
		{"duplicate jump", []string{"-A FORWARD -j " + FwdChain}, Stats{JumpsFixed: 1}},
		// What an agent from before 2026-12 left: commented FORWARD rules (evaluated per
		// packet); an upgrade replaces jump and chain.
		{"upgrade from commented rules", []string{"-D FORWARD -j " + FwdChain, "-I FORWARD 1 -m comment --comment netagent -j " + FwdChain,
			"-F " + FwdChain, "-A " + FwdChain + " -s 10.244.0.0/16 -m comment --comment netagent:cluster-out -j ACCEPT"}, Stats{ChainsRewritten: 1, JumpsFixed: 1}},
		{"settled", nil, Stats{}},
	}
	for _, s := range steps {
		for _, c := range s.before {
			n.MustRun(t, "iptables", strings.Fields(c)...)
		}
		st, err := r.Sync(ctx, p)
		if err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if st != s.want {
			t.Errorf("%s: stats %+v, want %+v", s.name, st, s.want)
		}
		fwd := n.MustRun(t, "iptables", "-S", "FORWARD")
		lines := strings.Split(strings.TrimSpace(fwd), "\n")
		if len(lines) < 2 || !strings.Contains(lines[1], "-j "+FwdChain) || strings.Count(fwd, "-j "+FwdChain) != 1 {
			t.Errorf("%s: our jump is not first (exactly once) in FORWARD:\n%s", s.name, fwd)
		}
		post := n.MustRun(t, "iptables", "-t", "nat", "-S", PostChain)
		if !strings.Contains(post, "-s 10.244.1.0/24 ! -d 224.0.0.0/4") || !strings.Contains(post, "MASQUERADE --random-fully") {
			t.Errorf("%s: masquerade rule missing:\n%s", s.name, post)
		}
	}
	if !strings.Contains(n.MustRun(t, "iptables", "-S", "FORWARD"), "-s 192.0.2.66/32 -j DROP") {
		t.Error("a foreign FORWARD rule was removed")
	}
	// Remove takes older jump forms too.
	n.MustRun(t, "iptables", "-A", "FORWARD", "-m", "comment", "--comment", "netagent", "-j", FwdChain)
	if err := r.Remove(ctx); err != nil {
		t.Fatal(err)
	}
	if all := n.MustRun(t, "iptables-save"); strings.Contains(all, "NETAGENT") {
		t.Errorf("Remove left rules:\n%s", all)
	}
}

// TestSyncDockerHost: on a Docker host our FORWARD jump goes right below Docker's
// DOCKER-USER and isolation jumps (whatever Docker version's layout), is put back there
// when Docker re-inserts its jumps on a restart, and accepts only cluster <-> own subnet.
func TestSyncDockerHost(t *testing.T) {
	netns.RequireRoot(t)
	p := plan.NAT{Network: netip.MustParsePrefix("10.244.0.0/16"), Subnet: netip.MustParsePrefix("10.244.1.0/24"), Final: true}
	for _, tc := range []struct {
		name   string
		docker []string // the FORWARD layout dockerd sets up
		want   []string // FORWARD after our sync
	}{
		{"no docker yet", nil, []string{"-j " + FwdChain}},
		{"docker 20.10", []string{"-N DOCKER-USER", "-N DOCKER-ISOLATION-STAGE-1", "-N DOCKER",
			"-A FORWARD -j DOCKER-USER", "-A FORWARD -j DOCKER-ISOLATION-STAGE-1", "-A FORWARD -o docker0 -j DOCKER", "-A FORWARD -i docker0 ! -o docker0 -j ACCEPT"},
			[]string{"-j DOCKER-USER", "-j DOCKER-ISOLATION-STAGE-1", "-j " + FwdChain, "-o docker0 -j DOCKER", "-i docker0 ! -o docker0 -j ACCEPT"}},
		// What route mode before 2026-12 left: wide accepts, jumped to first.
		{"upgrade on docker 20.10", []string{"-N DOCKER-USER", "-N DOCKER-ISOLATION-STAGE-1", "-N " + FwdChain,
			"-A FORWARD -j DOCKER-USER", "-A FORWARD -j DOCKER-ISOLATION-STAGE-1", "-I FORWARD 1 -j " + FwdChain,
			"-A " + FwdChain + " -s 10.244.0.0/16 -j ACCEPT", "-A " + FwdChain + " -d 10.244.0.0/16 -j ACCEPT"},
			[]string{"-j DOCKER-USER", "-j DOCKER-ISOLATION-STAGE-1", "-j " + FwdChain}},
		{"docker 28", []string{"-N DOCKER-USER", "-N DOCKER-FORWARD", "-A FORWARD -j DOCKER-USER", "-A FORWARD -j DOCKER-FORWARD"},
			[]string{"-j DOCKER-USER", "-j " + FwdChain, "-j DOCKER-FORWARD"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := netns.New(t, "natd")
			n.MustRun(t, "iptables", "-P", "FORWARD", "DROP")
			for _, c := range tc.docker {
				n.MustRun(t, "iptables", strings.Fields(c)...)
			}
			r := New(nsRunner{n})
			ctx := context.Background()
			check := func(stage string, want Stats) {
				t.Helper()
				st, err := r.Sync(ctx, p)
				if err != nil {
					t.Fatalf("%s: %v", stage, err)
				}
				if st != want {
					t.Errorf("%s: stats %+v, want %+v", stage, st, want)
				}
				if got := forward(t, n); !slices.Equal(got, tc.want) {
					t.Errorf("%s: FORWARD\n%s\nwant\n%s", stage, strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
				}
			}
			check("first sync", Stats{ChainsRewritten: 2, JumpsFixed: 2})
			check("settled", Stats{})
			if len(tc.docker) > 0 {
				// A dockerd restart deletes its jumps and inserts them first again; ours
				// stays right below them.
				for _, c := range []string{"-D FORWARD -j DOCKER-USER", "-I FORWARD 1 -j DOCKER-USER"} {
					n.MustRun(t, "iptables", strings.Fields(c)...)
				}
				check("after a dockerd restart", Stats{})
				// A rule an admin inserts first stays above everything; a rule inserted
				// between Docker's jumps and ours goes below ours.
				n.MustRun(t, "iptables", "-I", "FORWARD", "1", "-s", "192.0.2.66/32", "-j", "DROP")
				n.MustRun(t, "iptables", "-I", "FORWARD", fmt.Sprint(slices.Index(tc.want, "-j "+FwdChain)+2), "-s", "192.0.2.67/32", "-j", "DROP")
				want := slices.Insert(slices.Clone(tc.want), slices.Index(tc.want, "-j "+FwdChain)+1, "-s 192.0.2.67/32 -j DROP")
				want = slices.Insert(want, 0, "-s 192.0.2.66/32 -j DROP")
				if st, err := r.Sync(ctx, p); err != nil || st != (Stats{JumpsFixed: 1}) {
					t.Errorf("foreign rules: stats %+v, %v; want one jump fixed", st, err)
				}
				if got := forward(t, n); !slices.Equal(got, want) {
					t.Errorf("foreign rules: FORWARD\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
				}
			}
			want := []string{"-s 10.244.1.0/24 -d 10.244.1.0/24 -j RETURN", "-s 10.244.0.0/16 -d 10.244.1.0/24 -j ACCEPT", "-s 10.244.1.0/24 -d 10.244.0.0/16 -j ACCEPT"}
			if got := chain(t, n, FwdChain); !slices.Equal(got, want) {
				t.Errorf("%s:\n%s\nwant\n%s", FwdChain, strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
		})
	}
}

// forward is FORWARD's rules without "-A FORWARD ".
func forward(t *testing.T, n *netns.NS) []string { return chain(t, n, "FORWARD") }

func chain(t *testing.T, n *netns.NS, name string) []string {
	t.Helper()
	var out []string
	for _, l := range strings.Split(n.MustRun(t, "iptables", "-S", name), "\n") {
		if r, ok := strings.CutPrefix(l, "-A "+name+" "); ok {
			out = append(out, r)
		}
	}
	return out
}

// IPv6 gets its chains through ip6tables, with the masquerade only where configured; an
// IPv4-only plan never touches ip6tables.
func TestSyncIPv6(t *testing.T) {
	netns.RequireRoot(t)
	n := netns.New(t, "nat6")
	r := New(nsRunner{n})
	ctx := context.Background()
	v4 := plan.NAT{Network: netip.MustParsePrefix("10.244.0.0/16"), Subnet: netip.MustParsePrefix("10.244.1.0/24")}
	if _, err := r.Sync(ctx, v4); err != nil {
		t.Fatal(err)
	}
	if out := n.MustRun(t, "ip6tables-save"); strings.Contains(out, PostChain) || strings.Contains(out, FwdChain) {
		t.Fatalf("an IPv4-only plan wrote IPv6 chains:\n%s", out)
	}
	dual := v4
	dual.Network6, dual.Subnet6, dual.Masquerade6 = netip.MustParsePrefix("fd00::/48"), netip.MustParsePrefix("fd00:0:0:1::/64"), true
	chain6 := func(table, name string) []string {
		var out []string
		for _, l := range strings.Split(n.MustRun(t, "ip6tables", "-t", table, "-S", name), "\n") {
			if r, ok := strings.CutPrefix(l, "-A "+name+" "); ok {
				out = append(out, r)
			}
		}
		return out
	}
	for _, step := range []struct {
		name   string
		before []string // ip6tables commands
		p      plan.NAT
		want   Stats
		post   []string
	}{
		{"dual", nil, dual, Stats{ChainsRewritten: 2, JumpsFixed: 2}, []string{
			`-s fd00::/48 -d fd00::/48 -m comment --comment "netagent:pod-to-pod" -j RETURN`,
			`-s fd00:0:0:1::/64 ! -d ff00::/8 -m comment --comment "netagent:pod-egress" -j MASQUERADE --random-fully`}},
		{"settled", nil, dual, Stats{}, nil},
		{"IPv6 chain flushed by hand is repaired", []string{"-t nat -F " + PostChain}, dual, Stats{ChainsRewritten: 1}, nil},
		{"masquerade switched off", nil, func() plan.NAT { p := dual; p.Masquerade6 = false; return p }(), Stats{ChainsRewritten: 1}, []string{
			`-s fd00::/48 -d fd00::/48 -m comment --comment "netagent:pod-to-pod" -j RETURN`}},
	} {
		for _, c := range step.before {
			n.MustRun(t, "ip6tables", strings.Fields(c)...)
		}
		st, err := r.Sync(ctx, step.p)
		if err != nil || st != step.want {
			t.Errorf("%s: Sync = %+v, %v; want %+v", step.name, st, err, step.want)
		}
		if step.post != nil {
			if got := chain6("nat", PostChain); !slices.Equal(got, step.post) {
				t.Errorf("%s: %s\n%s\nwant\n%s", step.name, PostChain, strings.Join(got, "\n"), strings.Join(step.post, "\n"))
			}
		}
	}
	if got, want := chain6("filter", FwdChain), []string{"-s fd00::/48 -j ACCEPT", "-d fd00::/48 -j ACCEPT"}; !slices.Equal(got, want) {
		t.Errorf("%s: %v, want %v", FwdChain, got, want)
	}
	if got := chain(t, n, FwdChain); !slices.Equal(got, []string{"-s 10.244.0.0/16 -j ACCEPT", "-d 10.244.0.0/16 -j ACCEPT"}) {
		t.Errorf("IPv4 %s: %v", FwdChain, got)
	}
}

package wgguard

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/netagent/netagent/test/netns"
)

// TestSetDriftRemove applies specs in order against a real kernel: the rule nft prints,
// nothing written when nothing changed, drift seen and repaired, the zero Spec removing it.
func TestSetDriftRemove(t *testing.T) {
	netns.RequireRoot(t)
	ns := netns.New(t, "wgguard")
	var g *Guard
	if err := ns.Do(func() (err error) { g, err = New(); return err }); err != nil {
		t.Fatal(err)
	}
	list := func() string {
		out, err := ns.Run("nft", "list", "table", "ip", Table)
		if err != nil {
			return ""
		}
		return out
	}
	a := Spec{Underlay: "eth0", Network: netip.MustParsePrefix("10.244.0.0/16")}
	b := Spec{Underlay: "ens3", Network: netip.MustParsePrefix("10.42.0.0/16")}
	for _, step := range []struct {
		name  string
		spec  Spec
		drift func()
		want  string // in nft's listing ("" : no table)
	}{
		{"first", a, nil, `iifname "eth0" ip daddr 10.244.0.0/16 counter packets 0 bytes 0 drop`},
		{"again", a, nil, `iifname "eth0" ip daddr 10.244.0.0/16`},
		{"another underlay and network", b, nil, `iifname "ens3" ip daddr 10.42.0.0/16`},
		{"rule deleted", b, func() { ns.MustRun(t, "nft", "flush", "chain", "ip", Table, Chain) }, `iifname "ens3" ip daddr 10.42.0.0/16`},
		{"table deleted", b, func() { ns.MustRun(t, "nft", "delete", "table", "ip", Table) }, `iifname "ens3" ip daddr 10.42.0.0/16`},
		{"a rule added", b, func() { ns.MustRun(t, "nft", "add", "rule", "ip", Table, Chain, "accept") }, `iifname "ens3" ip daddr 10.42.0.0/16`},
		{"removed", Spec{}, nil, ""},
		{"removed again", Spec{}, nil, ""},
	} {
		t.Run(step.name, func(t *testing.T) {
			if step.drift != nil {
				step.drift()
				if g.Drifted() == "" {
					t.Fatal("Drifted() = \"\" after a change behind the guard's back")
				}
			}
			if err := g.Set(step.spec); err != nil {
				t.Fatal(err)
			}
			if why := g.Drifted(); why != "" {
				t.Errorf("Drifted() = %q right after Set", why)
			}
			got := list()
			switch {
			case step.want == "" && got != "":
				t.Errorf("table left:\n%s", got)
			case step.want != "" && (!strings.Contains(got, step.want) || strings.Count(got, "drop") != 1 || strings.Count(got, "accept") != 1 ||
				!strings.Contains(got, "type filter hook prerouting priority raw; policy accept;")):
				t.Errorf("table:\n%s\nwant one rule with %q at prerouting, raw", got, step.want)
			}
		})
	}
	if err := g.Set(Spec{Underlay: "eth0"}); err == nil {
		t.Error("Set without a network succeeded")
	}
}

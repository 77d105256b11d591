package hostport

import (
	"net/netip"
	"strings"
	"testing"
)

func TestRules(t *testing.T) {
	got := Rules(Tag("abc", "eth0"), netip.MustParseAddr("10.244.1.5"), netip.MustParsePrefix("10.244.1.0/24"), []Mapping{
		{HostPort: 8080, ContainerPort: 80},
		{HostPort: 53, ContainerPort: 5353, Protocol: "UDP", HostIP: "192.0.2.10"},
	})
	want := []string{
		"-A NETAGENT-HOSTPORTS -p tcp -m tcp --dport 8080 -s 10.244.1.0/24 -m comment --comment netagent-hp:abc:eth0 -j MARK --set-xmark 0x2000/0x2000",
		"-A NETAGENT-HOSTPORTS -p tcp -m tcp --dport 8080 -m comment --comment netagent-hp:abc:eth0 -j DNAT --to-destination 10.244.1.5:80",
		"-A NETAGENT-HOSTPORTS -d 192.0.2.10/32 -p udp -m udp --dport 53 -s 10.244.1.0/24 -m comment --comment netagent-hp:abc:eth0 -j MARK --set-xmark 0x2000/0x2000",
		"-A NETAGENT-HOSTPORTS -d 192.0.2.10/32 -p udp -m udp --dport 53 -m comment --comment netagent-hp:abc:eth0 -j DNAT --to-destination 10.244.1.5:5353",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("Rules() =\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestTags(t *testing.T) {
	tests := []struct {
		rule, tag string
		id, ifn   string
	}{
		{`-A NETAGENT-HOSTPORTS -p tcp -m comment --comment netagent-hp:abc:eth0 -j DNAT`, "netagent-hp:abc:eth0", "abc", "eth0"},
		{`-A NETAGENT-HOSTPORTS -p tcp -m comment --comment "netagent-hp:a.b_c-1:net1" -j DNAT`, "netagent-hp:a.b_c-1:net1", "a.b_c-1", "net1"},
		{`-A NETAGENT-HOSTPORTS -m comment --comment other -j DNAT`, "", "", ""},
		{`-N NETAGENT-HOSTPORTS`, "", "", ""},
	}
	for _, tt := range tests {
		if got := tagOf(tt.rule); got != tt.tag {
			t.Errorf("tagOf(%q) = %q, want %q", tt.rule, got, tt.tag)
		}
		if tt.tag == "" {
			continue
		}
		id, ifn, ok := ParseTag(tt.tag)
		if !ok || id != tt.id || ifn != tt.ifn {
			t.Errorf("ParseTag(%q) = %q, %q, %v", tt.tag, id, ifn, ok)
		}
	}
}

func TestMappingValidate(t *testing.T) {
	tests := []struct {
		m    Mapping
		want string
	}{
		{Mapping{HostPort: 80, ContainerPort: 80, Protocol: "tcp"}, ""},
		{Mapping{HostPort: 80, ContainerPort: 80, Protocol: "SCTP", HostIP: "0.0.0.0"}, ""},
		{Mapping{HostPort: 0, ContainerPort: 80}, "hostPort 0"},
		{Mapping{HostPort: 80, ContainerPort: 65536}, "containerPort 65536"},
		{Mapping{HostPort: 80, ContainerPort: 80, Protocol: "icmp"}, "protocol"},
		{Mapping{HostPort: 80, ContainerPort: 80, HostIP: "2001:db8::1"}, ""},
		{Mapping{HostPort: 80, ContainerPort: 80, HostIP: "::"}, ""},
		{Mapping{HostPort: 80, ContainerPort: 80, HostIP: "::ffff:192.0.2.1"}, "plain IPv4 or IPv6"},
		{Mapping{HostPort: 80, ContainerPort: 80, HostIP: "fe80::1%eth0"}, "plain IPv4 or IPv6"},
		{Mapping{HostPort: 80, ContainerPort: 80, HostIP: "nope"}, "hostIP"},
	}
	for _, tt := range tests {
		err := tt.m.Validate()
		if (tt.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.want)) {
			t.Errorf("%+v.Validate() = %v, want %q", tt.m, err, tt.want)
		}
	}
}

// A jump that exists twice (someone added one by hand, or an old version did) is removed
// twice in the teardown: one left would keep the chain in use and make -X fail forever.
func TestTeardownRemovesDuplicateJumps(t *testing.T) {
	saved := strings.Join([]string{
		"*nat",
		":" + Chain + " - [0:0]",
		":" + PostChain + " - [0:0]",
		jumps[0].line, jumps[0].line, jumps[1].line, jumps[2].line, jumps[3].line,
		"COMMIT",
	}, "\n")
	st := parseState(saved)
	if len(st.setup()) != 0 {
		t.Fatalf("setup of a complete state: %q", st.setup())
	}
	got := strings.Join(st.teardown(), "\n")
	want := strings.Join([]string{
		"-D" + strings.TrimPrefix(jumps[0].line, "-A"), "-D" + strings.TrimPrefix(jumps[0].line, "-A"),
		"-D" + strings.TrimPrefix(jumps[1].line, "-A"), "-D" + strings.TrimPrefix(jumps[2].line, "-A"),
		"-F " + Chain, "-X " + Chain, "-F " + PostChain, "-X " + PostChain,
	}, "\n")
	if got != want {
		t.Fatalf("teardown:\n%s\nwant:\n%s", got, want)
	}
	// Half made: only what is missing is created.
	st = parseState(strings.Join([]string{":" + Chain + " - [0:0]", jumps[0].line}, "\n"))
	if got := st.setup(); len(got) != 4 || got[0] != ":"+PostChain+" - [0:0]" {
		t.Fatalf("setup of a half-made state: %q", got)
	}
}

// TestRulesPerFamily: a mapping without hostIP goes into both families, one with a hostIP
// only into its own; IPv6 rules carry /128 and bracketed DNAT targets.
func TestRulesPerFamily(t *testing.T) {
	ms := []Mapping{
		{HostPort: 8080, ContainerPort: 80},
		{HostPort: 53, ContainerPort: 53, Protocol: "udp", HostIP: "192.0.2.10"},
		{HostPort: 443, ContainerPort: 8443, HostIP: "2001:db8::10"},
		{HostPort: 22, ContainerPort: 22, HostIP: "::"},
	}
	tag := Tag("abc", "eth0")
	got := Rules(tag, netip.MustParseAddr("fd00:244:1::5"), netip.MustParsePrefix("fd00:244:1::/64"), ms)
	want := []string{
		"-A NETAGENT-HOSTPORTS -p tcp -m tcp --dport 8080 -s fd00:244:1::/64 -m comment --comment netagent-hp:abc:eth0 -j MARK --set-xmark 0x2000/0x2000",
		"-A NETAGENT-HOSTPORTS -p tcp -m tcp --dport 8080 -m comment --comment netagent-hp:abc:eth0 -j DNAT --to-destination [fd00:244:1::5]:80",
		"-A NETAGENT-HOSTPORTS -d 2001:db8::10/128 -p tcp -m tcp --dport 443 -s fd00:244:1::/64 -m comment --comment netagent-hp:abc:eth0 -j MARK --set-xmark 0x2000/0x2000",
		"-A NETAGENT-HOSTPORTS -d 2001:db8::10/128 -p tcp -m tcp --dport 443 -m comment --comment netagent-hp:abc:eth0 -j DNAT --to-destination [fd00:244:1::5]:8443",
		"-A NETAGENT-HOSTPORTS -p tcp -m tcp --dport 22 -s fd00:244:1::/64 -m comment --comment netagent-hp:abc:eth0 -j MARK --set-xmark 0x2000/0x2000",
		"-A NETAGENT-HOSTPORTS -p tcp -m tcp --dport 22 -m comment --comment netagent-hp:abc:eth0 -j DNAT --to-destination [fd00:244:1::5]:22",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("Rules(IPv6) =\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	got4 := Rules(tag, netip.MustParseAddr("10.244.1.5"), netip.MustParsePrefix("10.244.1.0/24"), ms)
	if len(got4) != 4 || !strings.Contains(got4[2], "-d 192.0.2.10/32") {
		t.Errorf("Rules(IPv4) = %q, want the 8080 and 53 mappings only", got4)
	}
}

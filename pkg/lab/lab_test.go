package lab

import (
	"fmt"
	"os"
	"strings"
	"testing"

	labns "github.com/netagent/netagent/pkg/lab/netns"
	"github.com/netagent/netagent/test/netns"
)

// TestUnderlayIPv6AtOnce: an IPv6-only lab's underlay carries traffic as soon as it is
// made, through the router too. Its links' link-local addresses skip duplicate address
// detection: the router solicits the next hop of a packet it forwards from its link-local
// address, and sent nothing while that was tentative (one to two seconds after link up), so
// a node's first packets to a node behind the router waited a second or more in the
// router's neighbour queue (the agents' first WireGuard handshakes across it took 0.7-1.2 s
// and pods' first pings were lost). Each ping is one packet, sent at once, with a 1 s wait.
func TestUnderlayIPv6AtOnce(t *testing.T) {
	netns.RequireRoot(t)
	l := &Lab{Opt: Options{Nodes: 3, Remote: 1, IPFamily: "ipv6"}, IPFamily: "ipv6",
		Prefix: fmt.Sprintf("%s%d-ul-", labns.Prefix, os.Getpid()), Dir: t.TempDir()}
	t.Cleanup(func() {
		if err := l.Down(); err != nil {
			t.Error(err)
		}
	})
	if err := l.underlay(); err != nil {
		t.Fatal(err)
	}
	n1, n2, n3 := l.Nodes[0], l.Nodes[1], l.Nodes[2]
	for _, tt := range []struct {
		name string
		from *labns.NS
		to   string
	}{
		{"node1 -> node3 through the router", l.NodeNS(n1), n3.IP6.String()},
		{"node3 -> node2 through the router", l.NodeNS(n3), n2.IP6.String()},
		{"outside -> node3 through the router", l.ExtNS(), n3.IP6.String()},
		{"node1 -> node2 on the switch", l.NodeNS(n1), n2.IP6.String()},
	} {
		if out, err := tt.from.Run("ping", "-6", "-c", "1", "-W", "1", "-n", tt.to); err != nil {
			t.Errorf("%s: the first ping was not answered within 1 s: %v", tt.name, err)
		} else {
			t.Logf("%s: %s", tt.name, rtt(out))
		}
	}
	// Why, if it failed: no underlay address may be tentative.
	for _, n := range append([]*labns.NS{l.ns("router"), l.ExtNS()}, l.NodeNS(n1), l.NodeNS(n2), l.NodeNS(n3)) {
		if out, err := n.Run("ip", "-6", "addr", "show", "tentative"); err != nil || strings.TrimSpace(out) != "" {
			t.Errorf("%s: tentative IPv6 addresses (%v):\n%s", n.Name, err, out)
		}
	}
}

// rtt is ping's round-trip line.
func rtt(out string) string {
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "time=") {
			return strings.TrimSpace(line)
		}
	}
	return strings.TrimSpace(out)
}

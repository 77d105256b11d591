package main

import (
	"encoding/json"
	"net/netip"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/google/go-cmp/cmp"
)

// TestResultJSONMatchesLibrary: the hand-written 1.x result must mean exactly what the
// library would print.
func TestResultJSONMatchesLibrary(t *testing.T) {
	for _, r := range []addResult{
		{cniVersion: "1.0.0", bridge: "cni0", bridgeMAC: "0a:58:0a:f4:01:01", hostVeth: "na0123456789a", hostMAC: "0a:5a:0a:f4:01:05",
			ifName: "eth0", podMAC: "0a:58:0a:f4:01:05", netns: "/var/run/netns/cni-1234",
			addrs: []ifAddr{{netip.MustParsePrefix("10.244.1.5/24"), netip.MustParseAddr("10.244.1.1")}}, defaultRoute: true},
		{cniVersion: "1.1.0", bridge: "br-\"x\\", bridgeMAC: "0a:58:0a:00:00:01", hostVeth: "na1", hostMAC: "0a:5a:0a:00:00:02",
			ifName: "net1", podMAC: "0a:58:0a:00:00:02", netns: "/proc/123/ns/net\n\u2028",
			addrs: []ifAddr{{netip.MustParsePrefix("10.0.0.2/30"), netip.MustParseAddr("10.0.0.1")}}},
		{cniVersion: "1.0.0", bridge: "cni0", bridgeMAC: "0a:58:0a:f4:01:01", hostVeth: "na0123456789a", hostMAC: "0a:5a:0a:f4:01:05",
			ifName: "eth0", podMAC: "0a:58:0a:f4:01:05", netns: "/var/run/netns/cni-1234",
			addrs: []ifAddr{
				{netip.MustParsePrefix("10.244.1.5/24"), netip.MustParseAddr("10.244.1.1")},
				{netip.MustParsePrefix("fd00:244:1::5/64"), netip.MustParseAddr("fd00:244:1::1")},
			}, defaultRoute: true},
		{cniVersion: "1.1.0", bridge: "cni0", bridgeMAC: "0a:58:0a:f4:01:01", hostVeth: "na0123456789a", hostMAC: "0a:5a:0a:f4:01:05",
			ifName: "eth0", podMAC: "0a:58:0a:f4:01:05", netns: "/var/run/netns/cni-1234",
			addrs: []ifAddr{{netip.MustParsePrefix("2001:db8:1::5/112"), netip.MustParseAddr("2001:db8:1::1")}}, defaultRoute: true},
	} {
		var ours, lib current.Result
		if err := json.Unmarshal(r.json(), &ours); err != nil {
			t.Fatalf("our JSON does not decode: %v\n%s", err, r.json())
		}
		res, err := r.library().GetAsVersion(r.cniVersion)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := json.Marshal(res)
		if err := json.Unmarshal(b, &lib); err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(lib, ours); diff != "" {
			t.Errorf("result differs from the library's (-library +ours):\n%s", diff)
		}
	}
	if r := (addResult{cniVersion: "1.0.0", dns: types.DNS{Nameservers: []string{"10.96.0.10"}}}); r.dns.IsEmpty() {
		t.Error("DNS results must take the library path")
	}
}

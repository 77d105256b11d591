package lease

import (
	"net/netip"
	"slices"
	"testing"
)

func TestPeersTracksChangesPerNode(t *testing.T) {
	p := NewPeers()
	l := func(node, subnet string) Lease {
		return Lease{Node: node, Subnet: netip.MustParsePrefix(subnet), PublicIP: netip.MustParseAddr("192.0.2.1")}
	}
	p.mu.Lock()
	p.replace(map[string]Lease{"k1": l("a", "10.0.1.0/24"), "k2": l("b", "10.0.2.0/24")})
	p.mu.Unlock()
	if ch, full := p.Take(); !full || len(ch) != 0 {
		t.Fatalf("after replace: Take() = %v, %v; want full and no per-node changes", ch, full)
	}
	// a moves to a new subnet: put at the new key, then delete the old one.
	p.mu.Lock()
	p.put("k3", l("a", "10.0.3.0/24"))
	p.del("k1")
	p.mu.Unlock()
	ch, full := p.Take()
	if full || len(ch) != 1 || ch[0].Node != "a" || ch[0].Subnet.String() != "10.0.3.0/24" {
		t.Fatalf("after a moved: Take() = %v, %v; want a at 10.0.3.0/24", ch, full)
	}
	// b leaves.
	p.mu.Lock()
	p.del("k2")
	p.mu.Unlock()
	ch, _ = p.Take()
	if len(ch) != 1 || ch[0].Node != "b" || ch[0].Subnet.IsValid() {
		t.Fatalf("after b left: Take() = %v; want a deletion of b", ch)
	}
	var nodes []string
	for _, x := range p.Snapshot() {
		nodes = append(nodes, x.Node)
	}
	if !slices.Equal(nodes, []string{"a"}) || p.Len() != 1 {
		t.Errorf("Snapshot nodes = %v, Len %d; want [a], 1", nodes, p.Len())
	}
}

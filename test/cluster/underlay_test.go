package cluster_test

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/lab"
	"github.com/netagent/netagent/pkg/plan"
	"github.com/netagent/netagent/pkg/subnetfile"
)

// TestUnderlayMTUChange: the underlay's MTU changes while the agent runs; the VXLAN
// device, the subnet file (the pods' MTU) and the reported pod MTU follow without a restart,
// and pods still reach each other.
func TestUnderlayMTUChange(t *testing.T) {
	l := newLabWith(t, lab.Options{Nodes: 2, Backend: "vxlan", PodsPerNode: 1})
	n1 := l.Nodes[0]
	vx := plan.VXLANDevName(1)
	mtuOf := func(dev string) int {
		h, err := l.NodeNS(n1).Handle()
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		link, err := h.LinkByName(dev)
		if err != nil {
			t.Fatal(err)
		}
		return link.Attrs().MTU
	}
	if got := mtuOf(vx); got != 1450 {
		t.Fatalf("%s mtu %d before the change, want 1450", vx, got)
	}
	for _, mtu := range []int{1400, 1500} {
		t.Run(fmt.Sprint(mtu), func(t *testing.T) {
			h, err := l.NodeNS(n1).Handle()
			if err != nil {
				t.Fatal(err)
			}
			defer h.Close()
			eth0, err := h.LinkByName("eth0")
			if err != nil {
				t.Fatal(err)
			}
			if err := h.LinkSetMTU(eth0, mtu); err != nil {
				t.Fatal(err)
			}
			want := mtu - 50 // VXLAN over IPv4
			took := waitUntil(t, 5*time.Second, "VXLAN device and subnet file follow the underlay MTU", func() bool {
				info, err := subnetfile.Read(filepath.Join(n1.Dir, "subnet.env"))
				return err == nil && info.MTU == want && mtuOf(vx) == want && status(t, l, n1).PodMTU == want
			})
			t.Logf("underlay mtu %d: %s and the subnet file at %d after %s", mtu, vx, want, took.Round(time.Millisecond))
			if f := lab.Failures(l.Matrix(context.Background())); len(f) > 0 {
				t.Errorf("connectivity after the MTU change: %v", f)
			}
		})
	}
}

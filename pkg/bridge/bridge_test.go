package bridge_test

import (
	"fmt"
	"net/netip"
	"os"
	"testing"

	vns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/netagent/netagent/pkg/bridge"
	"github.com/netagent/netagent/test/netns"
)

// When Up and Usable return, the pod's kernel takes its IPv6 addresses as its own: a packet
// for one is delivered at once. The kernel installs an IPv6 address's local route from a
// work item after the link gets its carrier; without Usable, the first routed pod already
// had none when Up returned, on an idle machine.
func TestUsable(t *testing.T) {
	netns.RequireRoot(t)
	for _, routed := range []bool{false, true} {
		t.Run(fmt.Sprintf("routed=%v", routed), func(t *testing.T) {
			node, pod := netns.New(t, "usnode"), netns.New(t, "uspod")
			h, err := node.Handle()
			if err != nil {
				t.Fatal(err)
			}
			defer h.Close()
			ph, err := pod.Handle()
			if err != nil {
				t.Fatal(err)
			}
			defer ph.Close()
			podFd, err := os.Open(pod.Path)
			if err != nil {
				t.Fatal(err)
			}
			defer podFd.Close()
			gw, gw6 := netip.MustParsePrefix("10.9.0.1/24"), netip.MustParsePrefix("fd00:9::1/64")
			br, err := bridge.Ensure(h, "br0", gw, 1500)
			if err != nil {
				t.Fatal(err)
			}
			if err := bridge.EnsureGateway(h, br, gw6); err != nil {
				t.Fatal(err)
			}
			for i := range 40 {
				p := bridge.Pod{
					NetnsFd: int(podFd.Fd()), IfName: fmt.Sprintf("eth%d", i), HostVeth: bridge.HostVethName("usable", fmt.Sprint(i)),
					Addr: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 9, 0, byte(2 + i)}), 24), Gateway: gw.Addr(),
					Addr6: netip.PrefixFrom(netip.MustParseAddr(fmt.Sprintf("fd00:9::%x", 2+i)), 64), Gateway6: gw6.Addr(), MTU: 1500,
				}
				if routed {
					p.Gateway, p.Gateway6 = netip.MustParseAddr("169.254.1.1"), netip.MustParseAddr("fe80::1")
				}
				if i > 0 {
					p.Gateway, p.Gateway6 = netip.Addr{}, netip.Addr{} // one default route per family
				}
				pn, err := bridge.OpenPodNS(vns.NsHandle(podFd.Fd()))
				if err != nil {
					t.Fatal(err)
				}
				defer pn.Close()
				add := func() (bridge.Wired, error) { return bridge.Add(h, br, pn, p) }
				if routed {
					add = func() (bridge.Wired, error) { return bridge.AddRouted(h, pn, p) }
				}
				var w bridge.Wired
				if err := node.Do(func() (err error) { w, err = add(); return err }); err != nil {
					t.Fatal(err)
				}
				if err := node.Do(func() error { return bridge.Up(h, pn, w, p.HostVeth, p.IfName) }); err != nil {
					t.Fatal(err)
				}
				if err := bridge.Usable(pn, w); err != nil {
					t.Fatal(err)
				}
				rs, err := ph.RouteGet(p.Addr6.Addr().AsSlice())
				if err != nil || len(rs) == 0 || rs[0].Type != unix.RTN_LOCAL {
					t.Fatalf("pod %d: %s is not local yet when Usable returned: %+v %v", i, p.Addr6.Addr(), rs, err)
				}
			}
		})
	}
}

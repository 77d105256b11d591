package route_test

import (
	"log/slog"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/netagent/netagent/pkg/nlbatch"
	"github.com/netagent/netagent/pkg/route"
	"github.com/netagent/netagent/test/netns"
)

// batchKernel is what pkg/dataplane gives the reconciler: a handle with batched writes.
type batchKernel struct {
	*netlink.Handle
	*nlbatch.Conn
}

// TestSyncDeletesAnyOfOurs: a route of our protocol that the plan does not want goes,
// whatever its type and scope (someone may have re-added one by hand), through the handle
// and through the batch; none is counted as deleted while it stays.
func TestSyncDeletesAnyOfOurs(t *testing.T) {
	netns.RequireRoot(t)
	for _, tc := range []struct {
		name  string
		stale [][]string
	}{
		{"blackhole and unreachable", [][]string{
			{"ip", "route", "add", "blackhole", "10.9.0.0/24", "proto", "180"},
			{"ip", "route", "add", "unreachable", "10.9.1.0/24", "proto", "180"},
			{"ip", "-6", "route", "add", "blackhole", "fd00:9::/64", "proto", "180"},
			{"ip", "route", "add", "10.9.2.0/24", "via", "192.0.2.7", "proto", "180"},
		}},
		{"scope link", [][]string{{"ip", "route", "add", "10.9.3.0/24", "dev", "d0", "proto", "180"}}},
	} {
		for _, batched := range []bool{false, true} {
			t.Run(tc.name+map[bool]string{false: "/handle", true: "/batch"}[batched], func(t *testing.T) {
				n := netns.New(t, "route-del")
				n.MustRun(t, "ip", "link", "add", "d0", "type", "bridge")
				n.MustRun(t, "ip", "link", "set", "d0", "up")
				n.MustRun(t, "ip", "addr", "add", "192.0.2.1/24", "dev", "d0")
				for _, c := range tc.stale {
					n.MustRun(t, c[0], c[1:]...)
				}
				h, err := n.Handle()
				if err != nil {
					t.Fatal(err)
				}
				defer h.Close()
				var k route.Kernel = h
				if batched {
					var c *nlbatch.Conn
					if err := n.Do(func() (err error) { c, err = nlbatch.Open(); return err }); err != nil {
						t.Fatal(err)
					}
					defer c.Close()
					k = batchKernel{h, c}
				}
				st, err := route.New(k, slog.New(slog.DiscardHandler)).Sync(nil)
				if err != nil || st.Deleted != len(tc.stale) {
					t.Errorf("Sync(nil) = %+v, %v; want %d deleted", st, err, len(tc.stale))
				}
				if left := n.MustRun(t, "ip", "route", "show", "proto", "180") + n.MustRun(t, "ip", "-6", "route", "show", "proto", "180"); left != "" {
					t.Errorf("left:\n%s", left)
				}
			})
		}
	}
}

package agent

import (
	"context"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/vxguard"
	"github.com/netagent/netagent/test/netns"
)

// Changes to netagent's own nftables tables and to anything else (iptables) are told apart
// from real kernel notifications.
func TestWatchFirewallClassifies(t *testing.T) {
	netns.RequireRoot(t)
	ns := netns.New(t, "fwwatch")
	fw, nft := make(chan struct{}, 1), make(chan struct{}, 1)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = ns.Do(func() error { watchFirewall(ctx, slog.New(slog.DiscardHandler), fw, nft); return nil })
	}()
	t.Cleanup(func() { cancel(); <-done })
	time.Sleep(100 * time.Millisecond)
	drain := func() (gotFW, gotNFT bool) {
		deadline := time.After(300 * time.Millisecond)
		for {
			select {
			case <-fw:
				gotFW = true
			case <-nft:
				gotNFT = true
			case <-deadline:
				return gotFW, gotNFT
			}
		}
	}
	for _, c := range []struct {
		cmd          string
		wantFW, want bool
	}{
		{"nft add table ip netagent", false, true},
		{"nft add chain ip netagent c", false, true},
		{"nft add set ip netagent s { type ipv4_addr; }", false, true},
		{"nft add element ip netagent s { 192.0.2.1 }", false, true},
		{"nft add table bridge netagent", false, true},
		{"iptables -t nat -N NETAGENT-TEST", true, false},
		{"iptables -A FORWARD -j ACCEPT", true, false},
		{"nft add table ip other", true, false},
		{"nft flush ruleset", true, true},
		{"own", false, false}, // this process's own transaction: the allow-list's echo
	} {
		if c.cmd == "own" {
			if err := ns.Do(func() error {
				g, err := vxguard.New()
				if err != nil {
					return err
				}
				defer g.Close()
				_, err = g.Sync(vxguard.Spec{Port: 8472, Network: netip.MustParsePrefix("10.244.0.0/16"), Peers: map[string]netip.Addr{"a": netip.MustParseAddr("192.0.2.1")}})
				return err
			}); err != nil {
				t.Fatal(err)
			}
			gotFW, gotNFT := drain()
			if gotFW || gotNFT {
				t.Errorf("our own transaction signalled: iptables %v, ours %v", gotFW, gotNFT)
			}
			continue
		}
		f := strings.Fields(c.cmd)
		ns.MustRun(t, f[0], f[1:]...)
		gotFW, gotNFT := drain()
		if gotFW != c.wantFW || gotNFT != c.want {
			t.Errorf("%s: iptables signal %v, ours %v; want %v, %v", c.cmd, gotFW, gotNFT, c.wantFW, c.want)
		}
	}
}

// The notification parser reads kernel bytes by hand: it must never panic or read out of
// bounds, whatever it is given.
func FuzzNftEvents(f *testing.F) {
	// A table message for "netagent" followed by a generation message (pid 1).
	msg := func(typ uint16, attrType uint16, val []byte) []byte {
		al := 4 + len(val)
		body := append([]byte{2, 0, 0, 0}, byte(al), byte(al>>8), byte(attrType), byte(attrType>>8))
		body = append(body, val...)
		for len(body)%4 != 0 {
			body = append(body, 0)
		}
		l := 16 + len(body)
		h := []byte{byte(l), byte(l >> 8), 0, 0, byte(typ), byte(typ >> 8), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
		return append(h, body...)
	}
	f.Add(append(msg(0xa00, 1, []byte("netagent\x00")), msg(0xa0f, 2, []byte{0, 0, 0, 1})...))
	f.Add(msg(0xa00, 1, []byte("nat\x00")))
	f.Add([]byte{})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		var ev nftEvents
		ev.feed(b)
		ev.feed(b)
	})
}

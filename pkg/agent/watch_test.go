package agent

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/nlattr"
	"github.com/netagent/netagent/pkg/vxguard"
	"github.com/netagent/netagent/test/netns"
)

// Changes to netagent's own nftables tables (ip and ip6: the allow-list, bridge: anti-spoofing)
// and to anything else (iptables) are told apart from real kernel notifications.
func TestWatchFirewallClassifies(t *testing.T) {
	netns.RequireRoot(t)
	ns := netns.New(t, "fwwatch")
	fw, ip, br := make(chan struct{}, 1), make(chan struct{}, 1), make(chan struct{}, 1)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = ns.Do(func() error { watchFirewall(ctx, slog.New(slog.DiscardHandler), fw, ip, br); return nil })
	}()
	t.Cleanup(func() { cancel(); <-done })
	time.Sleep(100 * time.Millisecond)
	// drain reports which signals arrived: "f" iptables, "i" our ip table, "b" our bridge table.
	drain := func() string {
		got := map[byte]bool{}
		deadline := time.After(300 * time.Millisecond)
		for {
			select {
			case <-fw:
				got['f'] = true
			case <-ip:
				got['i'] = true
			case <-br:
				got['b'] = true
			case <-deadline:
				out := ""
				for _, c := range []byte("fib") {
					if got[c] {
						out += string(c)
					}
				}
				return out
			}
		}
	}
	for _, c := range []struct {
		cmd, want string
	}{
		{"nft add table ip netagent", "i"},
		{"nft add chain ip netagent c", "i"},
		{"nft add set ip netagent s { type ipv4_addr; }", "i"},
		{"nft add element ip netagent s { 192.0.2.1 }", "i"},
		{"nft add table ip6 netagent", "i"}, // the allow-list over an IPv6 underlay
		{"nft add chain ip6 netagent c", "i"},
		{"nft add table bridge netagent", "b"},
		{"nft add set bridge netagent s { type ipv4_addr; }", "b"},
		{"nft add element bridge netagent s { 192.0.2.1 }", "b"},
		{"iptables -t nat -N NETAGENT-TEST", "f"},
		{"iptables -A FORWARD -j ACCEPT", "f"},
		{"nft add table ip other", "f"},
		{"nft flush ruleset", "fib"},
		{"own", ""}, // this process's own transaction: the allow-list's echo
		// A cold start's allow-list of 5,000 dual-stack peers: its echo (tens of thousands
		// of notifications) must not overflow the socket, whose overflow is handled as
		// "anything may have changed" (a second full pass right after the first).
		{"own, 5,000 dual-stack peers", ""},
	} {
		if strings.HasPrefix(c.cmd, "own") {
			peers := map[string]vxguard.Peer{"a": {IP: netip.MustParseAddr("192.0.2.1")}}
			spec := vxguard.Spec{Port: 8472, Network: netip.MustParsePrefix("10.244.0.0/16")}
			if c.cmd != "own" {
				spec = vxguard.Spec{Port: 8472, Network: netip.MustParsePrefix("10.0.0.0/8"), SubnetLen: 24,
					Network6: netip.MustParsePrefix("fd00::/48"), SubnetLen6: 64}
				peers = map[string]vxguard.Peer{}
				for i := range 5000 {
					peers[fmt.Sprint("n", i)] = vxguard.Peer{IP: netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}),
						Subnet:  netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0}), 24),
						Subnet6: netip.PrefixFrom(netip.AddrFrom16([16]byte{0: 0xfd, 6: byte(i >> 8), 7: byte(i)}), 64)}
				}
			}
			spec.Peers = peers
			if err := ns.Do(func() error {
				g, err := vxguard.New()
				if err != nil {
					return err
				}
				defer g.Close()
				_, err = g.Sync(spec)
				return err
			}); err != nil {
				t.Fatal(err)
			}
		} else {
			f := strings.Fields(c.cmd)
			ns.MustRun(t, f[0], f[1:]...)
		}
		if got := drain(); got != c.want {
			t.Errorf("%s: signals %q, want %q", c.cmd, got, c.want)
		}
	}
}

// A cold start's own allow-list echoes as tens of thousands of element messages: reading
// them allocates nothing (the parse into slices it replaced left megabytes of garbage).
func TestNftEventsAllocateNothing(t *testing.T) {
	elem := []byte{0, 0, 0, 0, 0x0c, 0x0d, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // nlmsghdr: 32 bytes, NFT_MSG_NEWSETELEM
		2, 0, 0, 0, 13, 0, 1, 0, 'n', 'e', 't', 'a', 'g', 'e', 'n', 't', 0, 0, 0, 0} // nfgenmsg, table "netagent"
	elem[0] = byte(len(elem))
	var b []byte
	for range 200 {
		b = append(b, elem...)
	}
	var ev nftEvents
	if n := testing.AllocsPerRun(10, func() { ev.feed(b) }); n != 0 || !ev.pendIP {
		t.Errorf("feed: %v allocations, pending ip %v; want none and true", n, ev.pendIP)
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
		// The in-place readers agree with the allocating ones they replace.
		msgs, err := syscall.ParseNetlinkMessage(b)
		if ok := eachMessage(b, nil); ok != (err == nil) {
			t.Fatalf("eachMessage says well-formed %v, syscall.ParseNetlinkMessage %v", ok, err)
		}
		if err != nil {
			return
		}
		i := 0
		eachMessage(b, func(typ uint16, body []byte) {
			if i >= len(msgs) || msgs[i].Header.Type != typ || !bytes.Equal(msgs[i].Data, body) {
				t.Fatalf("message %d: type %d body %x, syscall has %+v", i, typ, body, msgs)
			}
			for _, a := range []uint16{1, 2, 3} {
				want, _ := nlattr.Get(nlattr.Parse(body[min(4, len(body)):]), a)
				if len(body) < 4 {
					want = nil
				}
				if got := attr(body, a); !bytes.Equal(got, want) || (got == nil) != (want == nil) {
					t.Fatalf("attr(%x, %d) = %x, nlattr has %x", body, a, got, want)
				}
			}
			i++
		})
		if i != len(msgs) {
			t.Fatalf("eachMessage saw %d messages, syscall %d", i, len(msgs))
		}
	})
}

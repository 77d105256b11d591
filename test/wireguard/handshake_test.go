package wireguard_test

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestHandshakeCrossing: two nodes learn of each other (one Set each, back to back, as from
// one lease event) with no traffic between their pods; both must hold a handshake well
// within WireGuard's REKEY_TIMEOUT (5 s). With a delayed underlay (a relay holding every
// datagram 100 ms each way) any initiations sent by both sides cross: each side answers
// the other's and drops the answer to its own, and before the fix (both sides kicked a
// handshake at once) neither retried for 5 s. Without the delay, the leader's initiation
// is dropped when it reaches a peer that does not know it yet, and the leader's retry must
// start it. Both orders of the two Sets. Echoes the leader's pod sends while the handshake
// is under way are queued by WireGuard and must all be answered: a leader that retried by
// re-creating the peer, as it once did, threw away the queue and, on the slow path, the
// answer on its way. With the follower's pod already sending to the leader's, the
// follower's WireGuard starts a handshake of its own as soon as it knows the peer, which
// can cross the leader's: the leader sees the answer to its own dropped and starts again
// (without that, 2 of these 3 runs stalled in one try, none in another); the repair drops
// the packets the leader had queued for the peer.
func TestHandshakeCrossing(t *testing.T) {
	for _, tt := range []struct {
		name          string
		delay         time.Duration
		leaderFirst   bool
		followerSends bool
	}{
		{"direct, leader first", 0, true, false},
		{"direct, follower first", 0, false, false},
		{"100 ms underlay, leader first", 100 * time.Millisecond, true, false},
		{"100 ms underlay, follower first", 100 * time.Millisecond, false, false},
		{"direct, follower first, its pod sending", 0, false, true},
		{"direct, follower first, its pod sending, again", 0, false, true},
		{"direct, follower first, its pod sending, a third time", 0, false, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			a, z := newNodes(t)
			a.reconcile()
			z.reconcile()
			if tt.delay > 0 {
				ep := startRelay(t, a, z, tt.delay)
				a.endpoint, z.endpoint = ep, ep
			}
			// The leader is the side with the smaller public key.
			first, second := a, z
			if aLeads := bytes.Compare(rawKey(t, a), rawKey(t, z)) < 0; aLeads != tt.leaderFirst {
				first, second = z, a
			}
			t.Cleanup(func() {
				if t.Failed() {
					for _, n := range []*node{first, second} {
						for _, p := range n.device().Peers {
							t.Logf("%s: peer tx %d rx %d bytes, last handshake %v", n.dev, p.TransmitBytes, p.ReceiveBytes, p.LastHandshakeTime)
						}
					}
				}
			})
			leader, follower := a, z
			if bytes.Compare(rawKey(t, a), rawKey(t, z)) > 0 {
				leader, follower = z, a
			}
			if tt.followerSends {
				p := startPing(t, follower.pod, leader.podIP)
				t.Cleanup(func() { p.finish() })
				time.Sleep(50 * time.Millisecond)
			}
			t0 := time.Now()
			first.reconcile(second)
			second.reconcile(first)
			// Echoes 20 ms apart from the start of the handshake; the first ones wait in
			// WireGuard's queue for it. Five, all of which must come back; where the
			// handshakes may cross, the leader's repair drops what it had queued, so the
			// echoes span the 2 s the handshake is given and the last ten must come back.
			count := 5
			if tt.followerSends {
				count = 100
			}
			echoes := make(chan string, 1)
			go func() {
				out, _ := leader.pod.Run("ping", "-n", "-c", strconv.Itoa(count), "-i", "0.02", "-W", "3", follower.podIP.String())
				echoes <- out
			}()
			hs := func(n *node) bool {
				d := n.device()
				return len(d.Peers) == 1 && !d.Peers[0].LastHandshakeTime.IsZero()
			}
			// Well below REKEY_TIMEOUT: a crossing left alone costs 5 s or more.
			within(t, 2*time.Second, "a handshake on both nodes", func() bool { return hs(first) && hs(second) })
			t.Logf("first Set to a handshake on both nodes: %v (one-way delay %v)", time.Since(t0).Round(time.Millisecond), tt.delay)
			out := <-echoes
			for seq := count; seq > count-min(count, 10); seq-- {
				if !strings.Contains(out, fmt.Sprintf(" icmp_seq=%d ", seq)) {
					t.Errorf("echo %d of %d from the leader's pod was lost:\n%s", seq, count, out)
				}
			}
			if !tt.followerSends && !strings.Contains(out, " 5 received") {
				t.Errorf("echoes from the leader's pod sent during the handshake were lost:\n%s", out)
			}
			a.waitPing(z.podIP)
		})
	}
}

func rawKey(t testing.TB, n *node) []byte {
	t.Helper()
	k := mustKey(t, n.publicKey())
	return k[:]
}

// startRelay forwards WireGuard's UDP between a's and z's devices through one socket in a's
// namespace, holding each datagram for delay (this kernel has no netem). Both devices are
// given the relay as the other's endpoint; as it sends from its own address, WireGuard's
// roaming keeps it there.
func startRelay(t *testing.T, a, z *node, delay time.Duration) netip.AddrPort {
	t.Helper()
	var conn *net.UDPConn
	if err := a.ns.Do(func() error {
		var err error
		conn, err = net.ListenUDP("udp4", &net.UDPAddr{IP: a.underlay.AsSlice(), Port: port + 10})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	aEP, zEP := netip.AddrPortFrom(a.underlay, port), netip.AddrPortFrom(z.underlay, port)
	go func() {
		buf := make([]byte, 1<<16)
		for {
			k, from, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			to := aEP
			if netip.AddrPortFrom(from.Addr().Unmap(), from.Port()) == aEP {
				to = zEP
			}
			b := bytes.Clone(buf[:k])
			time.AfterFunc(delay, func() { _, _ = conn.WriteToUDPAddrPort(b, to) })
		}
	}()
	ep := netip.AddrPortFrom(a.underlay, port+10)
	if fmt.Sprint(conn.LocalAddr()) != ep.String() {
		t.Fatalf("relay bound %s, want %s", conn.LocalAddr(), ep)
	}
	return ep
}

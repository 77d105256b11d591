package wireguard_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/wireguard"
	"github.com/netagent/netagent/pkg/wireguard/device"
	"github.com/netagent/netagent/pkg/wireguard/key"
	"github.com/netagent/netagent/test/netns"
	"github.com/netagent/netagent/test/testbin"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// TestTunnel: two daemons configured by Set carry pod traffic; a second Set changes
// nothing; stats show the handshake and bytes.
func TestTunnel(t *testing.T) {
	a, b := newNodes(t)
	ch := a.reconcile(b)
	if !ch.Created || !ch.PrivateKey || !ch.ListenPort || !ch.Up || strings.Join(ch.Added, ",") != "node2" {
		t.Errorf("first Set on node1 = %q, want device created, key, port, up, node2 added", ch)
	}
	b.reconcile(a)
	if ch := a.reconcile(b); !ch.Empty() {
		t.Errorf("second Set on node1 = %q, want no change", ch)
	}
	a.waitPing(b.podIP)
	b.waitPing(a.podIP)
	// A packet of the device's full MTU crosses, and its encapsulation is not fragmented on
	// the underlay: the 60 bytes WireGuard adds fit in the underlay's 1500.
	c := startCapture(t, a.ns, "eth0")
	out, err := a.pod.Run("ping", "-c", "2", "-W", "2", "-M", "do", "-s", fmt.Sprint(mtu-28), b.podIP.String())
	if err != nil {
		t.Errorf("full-size ping through the tunnel: %v\n%s", err, out)
	}
	for _, f := range c.stop(t) {
		if k := frameKind(f); strings.HasPrefix(k, "ipv4 fragment") {
			t.Fatalf("full-size packets are fragmented on the underlay (%s): the device MTU %d is too large", k, mtu)
		}
	}
	if d := a.device(); d.PublicKey.String() != a.publicKey() || d.ListenPort != port {
		t.Errorf("device %s: public key %s port %d, want the stored key's and %d", a.dev, d.PublicKey, d.ListenPort, port)
	}
	l, err := a.h.LinkByName(a.dev)
	if err != nil || l.Attrs().MTU != mtu {
		t.Errorf("link %s mtu = %v, %v; want %d", a.dev, l, err, mtu)
	}
	st, err := wireguard.Stats(a.wg, a.dev)
	if err != nil || len(st) != 1 {
		t.Fatalf("Stats = %+v, %v; want one peer", st, err)
	}
	if st[0].PublicKey != b.publicKey() || st[0].LastHandshake.IsZero() || time.Since(st[0].LastHandshake) > time.Minute || st[0].RxBytes == 0 || st[0].TxBytes == 0 || st[0].Endpoint != netip.AddrPortFrom(b.underlay, port) {
		t.Errorf("Stats = %+v, want node2's key, a recent handshake, bytes both ways, its endpoint", st[0])
	}

	// node2's lease goes: node1 drops the peer, and node2 is cut off at once although it
	// still has node1 as its peer and a live session.
	if ch := a.reconcile(); len(ch.Removed) != 1 {
		t.Errorf("Set without node2 = %q, want it removed", ch)
	}
	if out, err := b.pod.Run("ping", "-c", "3", "-i", "0.2", "-W", "1", a.podIP.String()); err == nil {
		t.Errorf("node2's pod still reaches node1's pod after node2 was removed:\n%s", out)
	}
}

// TestPresharedKey: a pre-shared key read from a file is applied to every peer; a node
// without it cannot complete a handshake with one that has it, and can once it has it too.
func TestPresharedKey(t *testing.T) {
	a, b := newNodes(t)
	psk, err := wgtypes.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "psk")
	if err := os.WriteFile(file, []byte(psk.String()+"\n"), 0o400); err != nil {
		t.Fatal(err)
	}
	loaded, err := key.LoadPSK(file)
	if err != nil {
		t.Fatal(err)
	}
	a.psk = &loaded
	a.reconcile(b)
	b.reconcile(a)
	if got := a.device().Peers[0].PresharedKey; got != psk {
		t.Fatal("node1's peer does not carry the pre-shared key")
	}
	if _, err := a.pod.Run("ping", "-c", "2", "-W", "1", b.podIP.String()); err == nil {
		t.Fatal("ping works with the pre-shared key on one side only")
	}
	b.psk = &loaded
	if ch := b.reconcile(a); strings.Join(ch.Updated, ",") != "node1" {
		t.Errorf("Set with the pre-shared key = %q, want node1 updated", ch)
	}
	a.waitPing(b.podIP)
}

// TestUnderlaySeesOnlyCiphertext transfers a known random payload pod to pod and captures
// the underlay: no 32-byte run of it, and nothing but ARP and UDP between the WireGuard
// ports. The same detector must find the payload when it crosses in clear (the control).
func TestUnderlaySeesOnlyCiphertext(t *testing.T) {
	a, b := newNodes(t)
	a.reconcile(b)
	b.reconcile(a)
	a.waitPing(b.podIP)
	payload := make([]byte, 1<<20)
	if _, err := rand.Read(payload); err != nil {
		t.Fatal(err)
	}

	c := startCapture(t, a.ns, "eth0")
	transfer(t, a.pod, b.pod, b.podIP, payload)
	frames := c.stop(t)
	// Frames, not packets: wireguard-go sends UDP GSO batches, which the veth carries whole.
	total := 0
	for _, f := range frames {
		total += len(f)
	}
	if total < len(payload) {
		t.Fatalf("captured %d bytes in %d frames for a %d-byte transfer: the capture is not seeing the traffic", total, len(frames), len(payload))
	}
	if fi, off, ok := leaks(payload, frames); ok {
		t.Errorf("frame %d (%s) holds payload at offset %d", fi, frameKind(frames[fi]), off)
	}
	wgA, wgB := netip.AddrPortFrom(a.underlay, port).String(), netip.AddrPortFrom(b.underlay, port).String()
	kinds := map[string]int{}
	for _, f := range frames {
		kinds[frameKind(f)]++
	}
	for k, n := range kinds {
		if k != "arp" && k != "igmp" && k != "udp "+wgA+" > "+wgB && k != "udp "+wgB+" > "+wgA {
			t.Errorf("%d frames of %s on the underlay; want only ARP and UDP %s <-> %s", n, k, wgA, wgB)
		}
	}
	t.Logf("underlay during a %d-byte transfer: %d bytes in %d frames: %v", len(payload), total, len(frames), kinds)

	// Control: the same payload node to node in clear is found.
	c = startCapture(t, a.ns, "eth0")
	transfer(t, a.ns, b.ns, b.underlay, payload)
	if _, _, ok := leaks(payload, c.stop(t)); !ok {
		t.Fatal("the capture did not find the payload sent in clear: the leak check cannot be trusted")
	}
}

// transfer sends payload over TCP from namespace from to to's addr and checks it arrived whole.
func transfer(t *testing.T, from, to *netns.NS, addr netip.Addr, payload []byte) {
	t.Helper()
	var ln net.Listener
	if err := to.Do(func() error {
		var err error
		ln, err = net.Listen("tcp", net.JoinHostPort(addr.String(), "0"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan [32]byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- [32]byte{}
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(20 * time.Second))
		h := sha256.New()
		_, _ = io.Copy(h, c)
		got <- [32]byte(h.Sum(nil))
	}()
	var c net.Conn
	if err := from.Do(func() error {
		var err error
		c, err = net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.Write(payload); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if h := <-got; h != sha256.Sum256(payload) {
		t.Fatal("the payload arrived damaged or not at all")
	}
}

// TestDrift: each change made behind the reconciler's back is repaired by one Set, after
// which the next Set changes nothing and pods talk again.
func TestDrift(t *testing.T) {
	a, b := newNodes(t)
	a.reconcile(b)
	b.reconcile(a)
	a.waitPing(b.podIP)
	bKey, err := wgtypes.ParseKey(b.publicKey())
	if err != nil {
		t.Fatal(err)
	}
	pubA := a.device().PublicKey
	tests := []struct {
		name  string
		drift func(t *testing.T)
		want  func(ch wireguard.Changes) bool
	}{
		{"peer removed by hand", func(t *testing.T) {
			if err := a.wg.ConfigureDevice(a.dev, wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: bKey, Remove: true}}}); err != nil {
				t.Fatal(err)
			}
			if n := len(a.device().Peers); n != 0 {
				t.Fatalf("%d peers after removing by hand", n)
			}
		}, func(ch wireguard.Changes) bool { return strings.Join(ch.Added, ",") == "node2" }},
		{"endpoint changed", func(t *testing.T) {
			if err := a.wg.ConfigureDevice(a.dev, wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: bKey, UpdateOnly: true, Endpoint: &net.UDPAddr{IP: net.ParseIP("192.0.2.99"), Port: 4}}}}); err != nil {
				t.Fatal(err)
			}
		}, func(ch wireguard.Changes) bool { return strings.Join(ch.Updated, ",") == "node2" }},
		{"allowed IPs widened", func(t *testing.T) {
			_, n, _ := net.ParseCIDR("10.244.0.0/16")
			if err := a.wg.ConfigureDevice(a.dev, wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: bKey, UpdateOnly: true, AllowedIPs: []net.IPNet{*n}}}}); err != nil {
				t.Fatal(err)
			}
		}, func(ch wireguard.Changes) bool { return strings.Join(ch.Updated, ",") == "node2" }},
		{"unknown peer added", func(t *testing.T) {
			k, _ := wgtypes.GeneratePrivateKey()
			if err := a.wg.ConfigureDevice(a.dev, wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: k.PublicKey()}}}); err != nil {
				t.Fatal(err)
			}
		}, func(ch wireguard.Changes) bool { return len(ch.Removed) == 1 && len(ch.Added)+len(ch.Updated) == 0 }},
		{"mtu and down", func(t *testing.T) {
			a.ns.MustRun(t, "ip", "link", "set", a.dev, "mtu", "1300", "down")
		}, func(ch wireguard.Changes) bool { return ch.MTU && ch.Up }},
		{"device deleted", func(t *testing.T) {
			a.ns.MustRun(t, "ip", "link", "del", a.dev)
			// The daemon notices and goes, taking its socket along.
			for deadline := time.Now().Add(5 * time.Second); device.SocketLive(a.dev); {
				if time.Now().After(deadline) {
					t.Fatal("daemon still answers after its device was deleted")
				}
				time.Sleep(10 * time.Millisecond)
			}
		}, func(ch wireguard.Changes) bool {
			return ch.Created && ch.PrivateKey && ch.ListenPort && strings.Join(ch.Added, ",") == "node2"
		}},
		{"socket deleted", func(t *testing.T) {
			if err := os.Remove(device.SocketPath(a.dev)); err != nil {
				t.Fatal(err)
			}
			// Nobody could configure the device any more: the daemon goes, and its device.
			for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				if _, err := a.h.LinkByName(a.dev); err != nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("device still there after its socket was deleted")
				}
			}
		}, func(ch wireguard.Changes) bool {
			return ch.Created && ch.PrivateKey && strings.Join(ch.Added, ",") == "node2"
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.drift(t)
			ch := a.reconcile(b)
			if !tt.want(ch) {
				t.Errorf("repairing Set = %q", ch)
			}
			if ch := a.reconcile(b); !ch.Empty() {
				t.Errorf("Set after the repair = %q, want no change", ch)
			}
			if d := a.device(); d.PublicKey != pubA {
				t.Errorf("public key after repair = %s, want the stored %s", d.PublicKey, pubA)
			}
			a.waitPing(b.podIP)
		})
	}
}

// TestKeyRotation rotates node2's key under a 10 ms ping: node2 applies its new key, node1
// picks the new public key up (as it would from the lease watch), and the ping resumes.
// Both directions: the rotated node's first handshake reaches a peer that does not know
// its new key yet, so when only the rotated node sends, nothing but a retried handshake
// (WireGuard's REKEY_TIMEOUT, 5 s) would bring the tunnel back.
func TestKeyRotation(t *testing.T) {
	for _, tt := range []struct {
		name      string
		fromRotor bool // the pinging pod is behind the rotated node
	}{{"peer sends", false}, {"rotated node sends", true}} {
		t.Run(tt.name, func(t *testing.T) {
			a, b := newNodes(t)
			a.reconcile(b)
			b.reconcile(a)
			a.waitPing(b.podIP)
			b.waitPing(a.podIP)
			old := b.publicKey()
			p := startPing(t, a.pod, b.podIP)
			if tt.fromRotor {
				p.stop()
				p = startPing(t, b.pod, a.podIP)
			}
			p.waitReplies(50, 5*time.Second)

			if _, err := key.Rotate(b.keyDir); err != nil {
				t.Fatal(err)
			}
			t0 := time.Now()
			if ch := b.reconcile(a); !ch.PrivateKey || len(ch.Added)+len(ch.Removed)+len(ch.Updated) != 0 {
				t.Errorf("Set on the rotated node = %q, want only the private key", ch)
			}
			// The peer learns the new key a little later, as through the lease watch.
			time.Sleep(50 * time.Millisecond)
			if ch := a.reconcile(b); strings.Join(ch.Added, ",") != "node2" || len(ch.Removed) != 1 || ch.Removed[0] != old {
				t.Errorf("Set on its peer = %q, want node2 added with its new key and the old key removed", ch)
			}
			applied := time.Since(t0)
			p.waitReplies(100, 10*time.Second)
			gap, lost := p.finish()
			t.Logf("key rotation under a 10 ms ping: peer reconciled %v after the rotation; longest gap without replies %v, %d echo requests lost", applied.Round(time.Millisecond), gap.Round(time.Millisecond), lost)
			// 5 s is WireGuard's REKEY_TIMEOUT: a gap that long means the new session came
			// from a retried handshake, not from the peer applying the new key.
			if gap >= 5*time.Second {
				t.Errorf("ping gap %v across the rotation, want below the 5 s handshake retry", gap)
			}
			if b.device().PublicKey.String() == old || b.publicKey() == old {
				t.Error("node2 still has its old key")
			}
		})
	}
}

// TestDaemonOutlivesAgent: the process that starts and configures the daemon (the agent)
// is killed with SIGKILL under a 10 ms ping; not one echo is lost, and the next agent's
// first Set adopts the device without changing anything.
func TestDaemonOutlivesAgent(t *testing.T) {
	a, b := newNodes(t)
	b.reconcile(a)
	job, err := json.Marshal(agentJob{NetNS: a.ns.Path, Dev: a.dev, Bin: a.daemon.Binary, Log: a.daemon.LogPath, KeyDir: a.keyDir, Subnet: a.subnet.String(),
		Peers: []wireguard.PeerSpec{{Node: "node2", PublicKey: b.publicKey(), Endpoint: netip.AddrPortFrom(b.underlay, port).String(), AllowedIPs: []string{b.subnet.String()}}}})
	if err != nil {
		t.Fatal(err)
	}
	agent := exec.Command(os.Args[0], "-test.run=^$")
	agent.Env = append(os.Environ(), helperEnv+"="+string(job))
	stdin, err := agent.StdinPipe() // held open: the agent runs until killed
	if err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	out, err := agent.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	agent.Stderr = &stderr
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = agent.Process.Kill(); _ = agent.Wait() })
	line := make([]byte, 6)
	if _, err := io.ReadFull(out, line); err != nil || string(line) != "ready\n" {
		_ = agent.Wait()
		t.Fatalf("agent: %q, %v: %s", line, err, stderr.Bytes())
	}
	a.routes(b)
	a.waitPing(b.podIP)
	p := startPing(t, a.pod, b.podIP)
	p.waitReplies(50, 5*time.Second)
	if err := agent.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = agent.Wait()
	p.waitReplies(100, 5*time.Second)
	gap, lost := p.finish()
	t.Logf("agent killed under a 10 ms ping: %d lost, longest gap %v", lost, gap.Round(time.Millisecond))
	if lost != 0 {
		t.Errorf("%d echo requests lost when the agent died, want 0", lost)
	}
	if !device.SocketLive(a.dev) {
		t.Fatal("the daemon went with the agent")
	}
	if ch := a.reconcile(b); !ch.Empty() {
		t.Errorf("the next agent's first Set = %q, want it to adopt the device unchanged", ch)
	}
}

// TestDaemon: netagent-wireguard refuses an existing interface and a live socket with a
// clear error, replaces a stale socket file, and removes socket and device on SIGTERM.
func TestDaemon(t *testing.T) {
	netns.RequireRoot(t)
	bin := testbin.Build(t, "./cmd/netagent-wireguard", "netagent-wireguard")
	devSeq++
	dev := fmt.Sprintf("nwg%d-%d", os.Getpid()%1000000, devSeq)
	sock := device.SocketPath(dev)
	t.Cleanup(func() { _ = os.Remove(sock) })
	n1, n2 := netns.New(t, "wgd1"), netns.New(t, "wgd2")
	run := func(n *netns.NS) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		out, err := n.Command(ctx, bin, "--name", dev).CombinedOutput()
		return string(out), err
	}

	t.Run("interface exists", func(t *testing.T) {
		if err := netns.Veth(n1, dev, n2, "x0"); err != nil {
			t.Fatal(err)
		}
		out, err := run(n1)
		if err == nil || !strings.Contains(out, "interface "+dev+" already exists in this network namespace") {
			t.Fatalf("daemon beside an existing %s = %v: %s", dev, err, out)
		}
		// The agent's starter passes the daemon's reason on.
		d := &device.Daemon{Binary: bin, Name: dev, MTU: mtu, NetNS: n1.Path, LogPath: filepath.Join(t.TempDir(), "log")}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if started, err := d.Ensure(ctx); started || err == nil || !strings.Contains(err.Error(), "exited before its socket was up") || !strings.Contains(err.Error(), "already exists") {
			t.Fatalf("Daemon.Ensure beside an existing %s = %v, %v; want the daemon's reason", dev, started, err)
		}
		n1.MustRun(t, "ip", "link", "del", dev)
	})

	t.Run("stale socket replaced", func(t *testing.T) {
		// A socket file nobody listens on, as a daemon killed with SIGKILL leaves it.
		_ = os.MkdirAll(device.SocketDir, 0o755)
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		l.SetUnlinkOnClose(false)
		l.Close()
		if device.SocketLive(dev) {
			t.Fatal("stale socket answers")
		}
	})
	var daemon *exec.Cmd
	t.Run("starts", func(t *testing.T) {
		daemon = n1.Command(context.Background(), bin, "--name", dev)
		if err := n1.Start(daemon); err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(5 * time.Second); !device.SocketLive(dev); {
			if time.Now().After(deadline) {
				t.Fatal("daemon did not replace the stale socket")
			}
			time.Sleep(10 * time.Millisecond)
		}
		if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm()&0o077 != 0 {
			t.Errorf("socket %s: %v, %v; want no group/other access", sock, fi.Mode(), err)
		}
	})
	t.Run("live socket refused", func(t *testing.T) {
		out, err := run(n2)
		if err == nil || !strings.Contains(out, "in use by a running daemon") {
			t.Fatalf("second daemon for %s = %v: %s", dev, err, out)
		}
		if _, err := n2.Run("ip", "link", "show", dev); err == nil {
			t.Error("the refused daemon left an interface behind")
		}
	})
	t.Run("SIGTERM", func(t *testing.T) {
		if err := daemon.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if err := daemon.Wait(); err != nil {
			t.Errorf("daemon exit on SIGTERM: %v, want 0", err)
		}
		if _, err := os.Lstat(sock); !os.IsNotExist(err) {
			t.Errorf("socket %s after SIGTERM: %v, want it removed", sock, err)
		}
		if out, err := n1.Run("ip", "link", "show", dev); err == nil {
			t.Errorf("interface after SIGTERM: %s", out)
		}
	})
}

// TestChoose reports why this kernel gets the userspace device (the kernel has no
// WireGuard link kind here) and leaves nothing behind; with the kernel preferred it fails.
func TestChoose(t *testing.T) {
	netns.RequireRoot(t)
	n := netns.New(t, "wgk")
	h, err := n.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	impl, created, err := device.Choose(h, "wgk0", "auto")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Choose = %s", impl)
	if impl.Kind == device.Kernel {
		// A kernel with WireGuard: the device is there and is the kernel's.
		l, err := h.LinkByName("wgk0")
		if !created || err != nil || l.Type() != "wireguard" {
			t.Fatalf("kernel chosen: created %v, link %v, %v", created, l, err)
		}
		return
	}
	if created || !strings.Contains(impl.Reason, "RTM_NEWLINK kind wireguard") {
		t.Errorf("Choose = %s, created %v; want userspace with the kernel's answer", impl, created)
	}
	if _, err := h.LinkByName("wgk0"); err == nil {
		t.Error("Choose left a link behind")
	}
	if _, _, err := device.Choose(h, "wgk0", "kernel"); err == nil || !strings.Contains(err.Error(), "create kernel WireGuard device") {
		t.Errorf("Choose(kernel) = %v, want the kernel's refusal", err)
	}
	if impl, _, err := device.Choose(h, "wgk0", "userspace"); err != nil || impl.Kind != device.Userspace {
		t.Errorf("Choose(userspace) = %v, %v", impl, err)
	}
}

package device

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// fakeLinks holds links by name; addErr is what LinkAdd of a wireguard link returns.
type fakeLinks struct {
	links  map[string]netlink.Link
	addErr error
	added  []string
}

func (f *fakeLinks) LinkByName(name string) (netlink.Link, error) {
	if l, ok := f.links[name]; ok {
		return l, nil
	}
	return nil, netlink.LinkNotFoundError{}
}

func (f *fakeLinks) LinkAdd(l netlink.Link) error {
	if f.addErr != nil {
		return f.addErr
	}
	f.links[l.Attrs().Name] = l
	f.added = append(f.added, l.Attrs().Name)
	return nil
}

func (f *fakeLinks) LinkDel(l netlink.Link) error {
	delete(f.links, l.Attrs().Name)
	return nil
}

func TestChoose(t *testing.T) {
	wg := &netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: "wg0"}}
	tun := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "wg0"}}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "wg0"}}
	tests := []struct {
		name    string
		have    netlink.Link
		addErr  error
		prefer  string
		want    Kind
		created bool
		reason  string // in the reason, or in the error when want is ""
	}{
		{name: "kernel can", prefer: "auto", want: Kernel, created: true, reason: "kernel supports"},
		{name: "kernel cannot", addErr: unix.EOPNOTSUPP, prefer: "auto", want: Userspace, reason: "RTM_NEWLINK kind wireguard: operation not supported"},
		{name: "no permission", addErr: unix.EPERM, want: Userspace, reason: "needs CAP_NET_ADMIN"},
		{name: "kernel asked, cannot", addErr: unix.EOPNOTSUPP, prefer: "kernel", reason: "create kernel WireGuard device wg0"},
		{name: "userspace asked", prefer: "userspace", want: Userspace, reason: "userspace asked for"},
		{name: "adopt kernel", have: wg, want: Kernel, reason: "existing kernel device"},
		{name: "adopt userspace", have: tun, prefer: "auto", want: Userspace, reason: "existing userspace device"},
		{name: "kernel device, userspace asked", have: wg, prefer: "userspace", reason: "delete it first"},
		{name: "tun, kernel asked", have: tun, prefer: "kernel", reason: "userspace (TUN) device"},
		{name: "foreign link", have: veth, reason: "is a veth link, not a WireGuard device"},
		{name: "bad preference", prefer: "fast", reason: `"fast": want auto, kernel or userspace`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := &fakeLinks{links: map[string]netlink.Link{}, addErr: tt.addErr}
			if tt.have != nil {
				f.links["wg0"] = tt.have
			}
			impl, created, err := Choose(f, "wg0", tt.prefer)
			if tt.want == "" {
				if err == nil || !strings.Contains(err.Error(), tt.reason) {
					t.Fatalf("Choose = %v, %v; want an error with %q", impl, err, tt.reason)
				}
				return
			}
			if err != nil || impl.Kind != tt.want || created != tt.created || !strings.Contains(impl.Reason, tt.reason) {
				t.Fatalf("Choose = %v, created %v, %v; want %s (%q), created %v", impl, created, err, tt.want, tt.reason, tt.created)
			}
			if !created && len(f.added) != 0 {
				t.Errorf("Choose added %v without saying so", f.added)
			}
		})
	}
}

func TestKernelDeviceEnsure(t *testing.T) {
	f := &fakeLinks{links: map[string]netlink.Link{}}
	k := KernelDevice{Links: f, Name: "wg0"}
	if c, err := k.Ensure(context.Background()); !c || err != nil {
		t.Fatalf("Ensure(missing) = %v, %v; want created", c, err)
	}
	if c, err := k.Ensure(context.Background()); c || err != nil {
		t.Fatalf("Ensure(present) = %v, %v; want nothing to do", c, err)
	}
	f.links["wg0"] = &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "wg0"}}
	if _, err := k.Ensure(context.Background()); err == nil || !strings.Contains(err.Error(), "not a kernel WireGuard device") {
		t.Fatalf("Ensure(veth) = %v", err)
	}
	f = &fakeLinks{links: map[string]netlink.Link{}, addErr: fmt.Errorf("netlink: %w", unix.EOPNOTSUPP)}
	if _, err := (KernelDevice{Links: f, Name: "wg0"}).Ensure(context.Background()); err == nil || !strings.Contains(err.Error(), "operation not supported") {
		t.Fatalf("Ensure(no kernel support) = %v", err)
	}
}

func TestValidName(t *testing.T) {
	for _, tt := range []struct {
		name string
		ok   bool
	}{
		{"wg0", true}, {"netagent-wg", true}, {"a23456789012345", true},
		{"", false}, {"a234567890123456", false}, {".", false}, {"..", false}, {"a/b", false}, {"a b", false}, {"x:1", false},
	} {
		if err := ValidName(tt.name); (err == nil) != tt.ok {
			t.Errorf("ValidName(%q) = %v, want ok %v", tt.name, err, tt.ok)
		}
	}
}

// TestDaemonExternal: with the daemon run by someone else (its own container), Ensure
// adopts a live socket and never starts a process: a missing daemon is ErrNoDaemon. The
// binary would fail at once if started, which Ensure would report as an early exit.
func TestDaemonExternal(t *testing.T) {
	if err := os.MkdirAll(SocketDir, 0o755); err != nil {
		t.Skipf("cannot create %s: %v", SocketDir, err)
	}
	name := fmt.Sprintf("naext%d", os.Getpid()%1000000)
	for _, tt := range []struct {
		name string
		live bool
	}{{"no daemon", false}, {"daemon up", true}} {
		t.Run(tt.name, func(t *testing.T) {
			if tt.live {
				l, err := net.Listen("unix", SocketPath(name))
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { l.Close() })
			}
			d := &Daemon{Binary: "/bin/false", Name: name, MTU: 1420, External: true}
			started, err := d.Ensure(t.Context())
			if started {
				t.Error("Ensure started a daemon")
			}
			if tt.live && err != nil {
				t.Errorf("Ensure with a live socket: %v", err)
			}
			if !tt.live && !errors.Is(err, ErrNoDaemon) {
				t.Errorf("Ensure without a daemon: %v, want ErrNoDaemon", err)
			}
		})
	}
}

package crash_test

import (
	"fmt"
	"math/rand/v2"
	"net"
	"strings"
	"testing"
)

// TestAddRetriedAfterKill kills ADD at random points and then retries the same ADD, as a
// runtime may: what the killed ADD left is rebuilt and the retry succeeds, unless the kill
// landed after the attachment went live (its host veth up, ADD's last step), when the retry
// must be refused as the spec requires and the pod must keep working. Either way the pod
// reaches the gateway afterwards, and its DEL leaves nothing behind.
func TestAddRetriedAfterKill(t *testing.T) {
	n := newNode(t)
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 0x7265747279))
	addTook, _ := n.measure(0, false)
	trials := 24
	if testing.Short() {
		trials = 8
	}
	var rebuilt, refused int
	for i := range trials {
		p := n.newPod(fmt.Sprintf("retry-%03d", i), 0)
		killed, phase := n.killDuring("ADD", p, uniform(rng, addTook*12/10))
		live := n.hostVethUp(p)
		n.exec.command = ""
		_, err := n.add(p)
		switch {
		case err == nil && !live:
			rebuilt++
		case err != nil && live && strings.Contains(err.Error(), "already exists"):
			refused++
		default:
			t.Errorf("trial %d (killed %v, %s; host veth up %v): retried ADD = %v", i, killed, phase, live, err)
		}
		if _, err := p.ns.Run("ping", "-c", "1", "-W", "2", "-q", gateway); err != nil {
			t.Errorf("trial %d (%s): pod cannot reach the gateway after the retry: %v", i, phase, err)
		}
		if failed, err := n.delRetry(p); err != nil {
			t.Errorf("DEL %s: %v %v", p.id, failed, err)
		}
		if l := cleanPod(p); len(l) > 0 {
			t.Error(l)
		}
		n.remove(p)
	}
	t.Logf("%d retries rebuilt a half-done attachment, %d were refused on a live one", rebuilt, refused)
	if l := n.leaks(nil); len(l) > 0 {
		t.Errorf("left behind: %v", l)
	}
}

// hostVethUp reports whether p's host veth exists and is up.
func (n *node) hostVethUp(p *pod) bool {
	n.t.Helper()
	h, err := n.ns.Handle()
	if err != nil {
		n.t.Fatal(err)
	}
	defer h.Close()
	l, err := h.LinkByName(p.veth())
	return err == nil && l.Attrs().Flags&net.FlagUp != 0
}

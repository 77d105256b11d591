package cluster_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/lab"
)

// TestForwardingSwitchedOff: net.ipv4.ip_forward switched off in a node's namespace while
// a 10 ms ping crosses it; the agent hears of it from the kernel, switches it on again at
// once, logs it and counts the repair.
func TestForwardingSwitchedOff(t *testing.T) {
	l := newLabWith(t, lab.Options{Nodes: 2, Backend: "vxlan", PodsPerNode: 1})
	n1 := l.Nodes[0]
	a, b := n1.Pods[0], l.Nodes[1].Pods[0]
	p := startPinger(t, a.Name+"->"+b.Name, l.PodNS(a), b.IP.String())
	time.Sleep(500 * time.Millisecond)
	l.NodeNS(n1).MustRun(t, "sysctl", "-qw", "net.ipv4.ip_forward=0")
	off := time.Now()
	took := waitUntil(t, 5*time.Second, "ip_forward switched on again", func() bool {
		out, err := l.NodeNS(n1).Run("sysctl", "-n", "net.ipv4.ip_forward")
		return err == nil && strings.TrimSpace(out) == "1"
	})
	t.Logf("ip_forward repaired %s after it was switched off", took.Round(time.Millisecond))
	time.Sleep(500 * time.Millisecond)
	lost, sent := p.finish()
	t.Logf("10 ms ping: %d sent, %d lost (%s switched off)", sent, len(lost), time.Since(off).Round(time.Millisecond))
	if len(lost) > 20 {
		t.Errorf("%d pings lost: forwarding was off too long", len(lost))
	}
	if v := metric(t, l, n1, `netagent_drift_repairs_total{kind="ip-forward"}`); v != 1 {
		t.Errorf("ip-forward repairs = %v, want 1", v)
	}
	if v := metric(t, l, n1, "netagent_ip_forward"); v != 1 {
		t.Errorf("netagent_ip_forward = %v after the repair", v)
	}
	if code, _, _ := l.Get(n1, "/readyz"); code != 200 {
		t.Errorf("/readyz %d after the repair", code)
	}
	log, _ := os.ReadFile(filepath.Join(n1.Dir, "agent.log"))
	if !strings.Contains(string(log), "ip_forward was switched off") {
		t.Errorf("the repair is not in the log")
	}
}

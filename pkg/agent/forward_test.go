package agent

import (
	"io"
	"log/slog"
	"os"
	"strings"
	"testing"

	"github.com/netagent/netagent/test/netns"
)

// TestCheckForwarding switches net.ipv4.ip_forward off in a throw-away namespace and
// checks that the agent repairs it, or with repair off reports it (status, metric) until
// it is on again.
func TestCheckForwarding(t *testing.T) {
	netns.RequireRoot(t)
	tests := []struct {
		name       string
		repair     bool
		wantOn     string // ip_forward after the check
		wantErr    bool   // "forwarding" in status
		wantRepair float64
	}{
		{"repair", true, "1", false, 1},
		{"report only", false, "0", true, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ns := netns.New(t, "fwd")
			a := &Agent{opt: Options{Metrics: NewMetrics(), RepairForwarding: tt.repair}}
			a.setReady() // found off later, not at start-up
			log := slog.New(slog.NewTextHandler(io.Discard, nil))
			var got string
			err := ns.Do(func() error {
				if err := os.WriteFile(ipForward, []byte("0"), 0o644); err != nil {
					return err
				}
				a.checkForwarding(log)
				a.checkForwarding(log) // a second check changes nothing more
				b, err := os.ReadFile(ipForward)
				got = strings.TrimSpace(string(b))
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.wantOn {
				t.Errorf("ip_forward = %s after the check, want %s", got, tt.wantOn)
			}
			if _, has := a.status.Errors["forwarding"]; has != tt.wantErr {
				t.Errorf("status errors = %v, want forwarding error %v", a.status.Errors, tt.wantErr)
			}
			if n := gathered(t, a.opt.Metrics, "netagent_drift_repairs_total", "ip-forward"); n != tt.wantRepair {
				t.Errorf("ip-forward repairs = %v, want %v", n, tt.wantRepair)
			}
			if g, want := gathered(t, a.opt.Metrics, "netagent_ip_forward", ""), map[bool]float64{true: 0, false: 1}[tt.wantErr]; g != want {
				t.Errorf("netagent_ip_forward = %v, want %v", g, want)
			}
			if tt.wantErr {
				// Switched on by someone else: the error clears.
				_ = ns.Do(func() error {
					if err := os.WriteFile(ipForward, []byte("1"), 0o644); err != nil {
						return err
					}
					a.checkForwarding(log)
					return nil
				})
				if _, has := a.status.Errors["forwarding"]; has {
					t.Errorf("forwarding error still in status after ip_forward went back on: %v", a.status.Errors)
				}
			}
		})
	}
}

// gathered is the value of metric name (with label value kind, if given) from m's registry.
func gathered(t *testing.T, m *Metrics, name, kind string) float64 {
	t.Helper()
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, x := range mf.GetMetric() {
			if kind != "" && (len(x.GetLabel()) == 0 || x.GetLabel()[0].GetValue() != kind) {
				continue
			}
			if c := x.GetCounter(); c != nil {
				return c.GetValue()
			}
			return x.GetGauge().GetValue()
		}
	}
	t.Fatalf("no metric %s %s", name, kind)
	return 0
}

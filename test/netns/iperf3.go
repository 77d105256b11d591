package netns

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Iperf3 is an iperf3 server in a namespace. Benchmarks measure with iperf3, the usual
// tool for this, as separate client and server processes: a Go loop in the test process
// puts both ends of the flow on one Go scheduler with two cores, and that scheduling
// latency, not the dataplane, then decides a share of the result (it gave 0.76-0.86 for
// host-gw where iperf3 gave 0.89-0.94 in the same lab).
type Iperf3 struct {
	srv *exec.Cmd
	dst string
}

// ServeIperf3 starts an iperf3 server on addr:port inside namespace n; it stops when the
// test ends or with Stop.
func ServeIperf3(t testing.TB, n *NS, addr string, port int) *Iperf3 {
	t.Helper()
	if _, err := exec.LookPath("iperf3"); err != nil {
		t.Fatal("iperf3 is not installed (scripts/deps.sh installs it, or apt-get install iperf3)")
	}
	srv := n.Command(context.Background(), "iperf3", "-s", "-B", addr, "-p", strconv.Itoa(port))
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	s := &Iperf3{srv: srv, dst: net.JoinHostPort(addr, strconv.Itoa(port))}
	t.Cleanup(s.Stop) // on a failed run; Stop is idempotent
	// Ready when it accepts connections.
	for deadline := time.Now().Add(5 * time.Second); ; {
		var c net.Conn
		err := n.Do(func() error {
			var err error
			c, err = net.DialTimeout("tcp", s.dst, time.Second)
			return err
		})
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("iperf3 server on %s: %v", s.dst, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return s
}

// Stop stops the server.
func (s *Iperf3) Stop() {
	if s.srv.ProcessState == nil {
		_ = s.srv.Process.Kill()
		_ = s.srv.Wait()
	}
}

// From runs one TCP stream for d from namespace n and returns bits per second as the
// receiver counted them.
func (s *Iperf3) From(t testing.TB, n *NS, d time.Duration) float64 {
	t.Helper()
	host, port, _ := net.SplitHostPort(s.dst)
	ctx, cancel := context.WithTimeout(context.Background(), d+30*time.Second)
	defer cancel()
	for attempt := 0; ; attempt++ {
		out, err := n.Command(ctx, "iperf3", "-c", host, "-p", port, "-t", strconv.FormatFloat(d.Seconds(), 'f', -1, 64), "-J").Output()
		var r struct {
			End struct {
				SumReceived struct {
					BitsPerSecond float64 `json:"bits_per_second"`
				} `json:"sum_received"`
			} `json:"end"`
			Error string `json:"error"`
		}
		if jerr := json.Unmarshal(out, &r); jerr == nil && err == nil && r.End.SumReceived.BitsPerSecond > 0 {
			return r.End.SumReceived.BitsPerSecond
		}
		// The server takes one test at a time and can still be finishing the last one.
		if attempt < 3 && strings.Contains(r.Error, "busy") {
			time.Sleep(200 * time.Millisecond)
			continue
		}
		t.Fatalf("iperf3 -c %s: %v %s %s", s.dst, err, r.Error, bytes.TrimSpace(out))
	}
}

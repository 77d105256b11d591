package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/netagent/netagent/pkg/config"
	"github.com/netagent/netagent/pkg/lease"
)

// renewStore is a Store whose keepalive is lost once and whose re-claims fail with the
// scripted errors (then succeed), recording when each was tried.
type renewStore struct {
	mu       sync.Mutex
	lost     bool
	errs     []error
	attempts []time.Time
}

func (s *renewStore) Config(context.Context) (config.Network, int64, error) {
	return config.Network{}, 0, errors.New("unused")
}
func (s *renewStore) Acquire(context.Context, config.Network, lease.Lease, netip.Prefix) (lease.Held, error) {
	return lease.Held{}, errors.New("unused")
}
func (s *renewStore) Watch(context.Context, *lease.Peers, chan<- struct{}, lease.WatchStats) {}
func (s *renewStore) WatchConfig(context.Context, chan<- struct{})                           {}

func (s *renewStore) KeepAlive(ctx context.Context, h lease.Held) error {
	s.mu.Lock()
	lost := s.lost
	s.lost = true
	s.mu.Unlock()
	if !lost {
		return errors.New("keepalive stopped")
	}
	<-ctx.Done()
	return ctx.Err()
}

func (s *renewStore) Renew(ctx context.Context, h lease.Held) (lease.Held, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.attempts = append(s.attempts, time.Now())
	if len(s.errs) == 0 {
		return h, nil
	}
	err := s.errs[0]
	s.errs = s.errs[1:]
	return h, err
}

// TestKeepAliveReclaim: after a lost keepalive the agent re-claims with at most a second
// between attempts while the store is away, at once when the store is seen back, and
// slowly, saying so once, when another node holds the subnet.
func TestKeepAliveReclaim(t *testing.T) {
	down := errors.New("context deadline exceeded")
	conflict := fmt.Errorf("%w: held by node9", lease.ErrConflict)
	tests := []struct {
		name      string
		errs      []error
		wakeAfter int // signal reclaim after this many attempts (0: never)
		wantGaps  []time.Duration
		wantLog   []string
		maxErrors int // "taken by another node" lines
	}{
		{"outage: backoff capped at 1s", []error{down, down, down, down, down, down, down},
			0, []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond, time.Second, time.Second, time.Second},
			[]string{"keepalive lost", "lease re-claimed"}, 0},
		{"store back: at once", []error{down, down, down, down, down}, 4,
			[]time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, 0, time.Second},
			[]string{"lease re-claimed"}, 0},
		{"subnet taken: slow, said once", []error{conflict, conflict, conflict, conflict, conflict, conflict}, 0,
			[]time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond, 1600 * time.Millisecond, 3200 * time.Millisecond},
			[]string{"taken by another node"}, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				st := &renewStore{errs: append([]error(nil), tt.errs...)}
				var buf bytes.Buffer
				var logMu sync.Mutex
				log := slog.New(slog.NewTextHandler(lockedWriter{&logMu, &buf}, nil))
				a := &Agent{opt: Options{Store: st, Metrics: NewMetrics()}, reclaim: make(chan struct{}, 1)}
				ctx, cancel := context.WithCancel(t.Context())
				done := make(chan struct{})
				go func() { defer close(done); a.keepAlive(ctx, log, lease.Held{}) }()
				for {
					synctest.Wait()
					st.mu.Lock()
					n, left := len(st.attempts), len(st.errs)
					st.mu.Unlock()
					if left == 0 && n == len(tt.errs)+1 {
						break
					}
					if tt.wakeAfter > 0 && n == tt.wakeAfter {
						tt.wakeAfter = 0
						signal(a.reclaim)
						continue
					}
					time.Sleep(10 * time.Millisecond)
				}
				cancel()
				<-done
				var gaps []time.Duration
				for i := 1; i < len(st.attempts); i++ {
					gaps = append(gaps, st.attempts[i].Sub(st.attempts[i-1]).Truncate(10*time.Millisecond))
				}
				if fmt.Sprint(gaps) != fmt.Sprint(tt.wantGaps) {
					t.Errorf("gaps between re-claims = %v, want %v", gaps, tt.wantGaps)
				}
				logMu.Lock()
				out := buf.String()
				logMu.Unlock()
				for _, w := range tt.wantLog {
					if !strings.Contains(out, w) {
						t.Errorf("log lacks %q:\n%s", w, out)
					}
				}
				if c := strings.Count(out, "taken by another node"); c != tt.maxErrors {
					t.Errorf("%d 'taken' errors logged, want %d:\n%s", c, tt.maxErrors, out)
				}
				if v := gathered(t, a.opt.Metrics, "netagent_errors_total", "lease"); v != float64(len(tt.errs)+1) {
					t.Errorf("lease errors = %v, want %d (the loss and each failed re-claim)", v, len(tt.errs)+1)
				}
			})
		})
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// TestKeepAliveReassigned: when the store gives the node another subnet (a Node deleted and
// registered again with a new podCIDR), the agent stops re-claiming and reports it as
// fatal, so Run ends and the restarted agent takes the new subnet; before, it retried the
// old one forever, ready, while no peer could reach its node.
func TestKeepAliveReassigned(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		moved := fmt.Errorf("%w: node n1: its podCIDR is now 10.244.3.0/24", lease.ErrReassigned)
		st := &renewStore{errs: []error{moved, moved}}
		a := &Agent{opt: Options{Store: st, Metrics: NewMetrics()}, reclaim: make(chan struct{}, 1), fatal: make(chan error, 1), in: newInbox()}
		done := make(chan struct{})
		go func() { defer close(done); a.keepAlive(t.Context(), slog.New(slog.DiscardHandler), lease.Held{}) }()
		<-done
		select {
		case err := <-a.fatal:
			if !errors.Is(err, lease.ErrReassigned) {
				t.Errorf("fatal error %v, want lease.ErrReassigned", err)
			}
		default:
			t.Error("keepAlive returned without a fatal error")
		}
		if r := a.in.take(); r&rFatal == 0 {
			t.Errorf("reasons posted %b, want rFatal (the loop stops on it)", r)
		}
		if n := len(st.attempts); n != 1 {
			t.Errorf("%d re-claims, want 1 (a reassigned subnet is not retried)", n)
		}
	})
}

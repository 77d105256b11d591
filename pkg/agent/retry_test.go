package agent

import (
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"
)

// TestPassRetry: a failed full pass is retried after 100ms, doubling to 10s; a success
// resets the delay and cancels a pending retry.
func TestPassRetry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ch := make(chan struct{}, 1)
		r := newPassRetry(ch)
		var got []time.Duration
		for range 9 {
			start := time.Now()
			r.failed()
			<-ch
			got = append(got, time.Since(start))
		}
		ms := time.Millisecond
		want := []time.Duration{100 * ms, 200 * ms, 400 * ms, 800 * ms, 1600 * ms, 3200 * ms, 6400 * ms, 10 * time.Second, 10 * time.Second}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("retry delays (-want +got):\n%s", diff)
		}
		r.ok()
		r.failed()
		r.ok() // the pass succeeded (another event ran it) before the retry fired
		time.Sleep(time.Minute)
		select {
		case <-ch:
			t.Error("a retry fired after a successful pass")
		default:
		}
		start := time.Now()
		r.failed()
		<-ch
		if d := time.Since(start); d != 100*ms {
			t.Errorf("first retry after a success: %s, want 100ms", d)
		}
	})
}

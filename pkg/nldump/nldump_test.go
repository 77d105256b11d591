package nldump

import (
	"errors"
	"fmt"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func TestRetry(t *testing.T) {
	other := errors.New("no such device")
	tests := []struct {
		name      string
		errs      []error // what each dump returns, in order
		wantCalls int
		wantVal   int
		wantErr   error
	}{
		{"first dump complete", []error{nil}, 1, 1, nil},
		{"interrupted twice", []error{netlink.ErrDumpInterrupted, unix.EINTR, nil}, 3, 3, nil},
		{"other error not retried", []error{other}, 1, 1, other},
		{"interrupted every time", []error{netlink.ErrDumpInterrupted, netlink.ErrDumpInterrupted, netlink.ErrDumpInterrupted,
			fmt.Errorf("list: %w", netlink.ErrDumpInterrupted), netlink.ErrDumpInterrupted, nil}, Attempts, Attempts, netlink.ErrDumpInterrupted},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			calls := 0
			v, err := Retry(func() (int, error) {
				calls++
				return calls, tt.errs[calls-1]
			})
			if calls != tt.wantCalls || v != tt.wantVal || !errors.Is(err, tt.wantErr) || (tt.wantErr == nil) != (err == nil) {
				t.Errorf("Retry = %d, %v after %d calls; want %d, %v after %d", v, err, calls, tt.wantVal, tt.wantErr, tt.wantCalls)
			}
		})
	}
}

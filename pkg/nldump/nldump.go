// Package nldump retries netlink dumps the kernel interrupted. A dump that races with a
// change to the table it reads comes back flagged NLM_F_DUMP_INTR, and
// vishvananda/netlink returns what it read with ErrDumpInterrupted (EINTR in older
// versions). Such a result may miss or repeat entries, so nothing may be diffed against
// it: the dump is simply taken again. Every netlink dump in netagent goes through Retry.
package nldump

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Attempts is how many times Retry dumps before it gives up.
const Attempts = 5

// Retry calls dump until it completes uninterrupted, at most Attempts times. When every
// attempt was interrupted it returns the last result with an error wrapping
// netlink.ErrDumpInterrupted.
func Retry[T any](dump func() (T, error)) (T, error) {
	var v T
	var err error
	for range Attempts {
		if v, err = dump(); !Interrupted(err) {
			return v, err
		}
	}
	return v, fmt.Errorf("netlink dump interrupted %d times: %w", Attempts, err)
}

// Interrupted reports whether err says a dump was interrupted.
func Interrupted(err error) bool {
	return errors.Is(err, netlink.ErrDumpInterrupted) || errors.Is(err, unix.EINTR)
}

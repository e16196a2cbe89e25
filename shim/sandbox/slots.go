package sandbox

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// slotsDir, in the state directory, holds one lock file per start slot.
const slotsDir = ".starts"

// startSlot waits for one of the host's n start slots (0: as many as the
// host has CPUs) and returns its release. Starting a VM and its first
// container is CPU-bound; with many at once (a node's pods after a
// restart) they only slow each other down, so that every one of them is
// late. Taking turns, the first are ready early and the last no later.
// The slots are lock files shared by every shim of the host (flock, so a
// crashed shim's slot frees itself).
func startSlot(ctx context.Context, stateDir string, n int) (func(), error) {
	if n <= 0 {
		n = runtime.NumCPU()
	}
	dir := filepath.Join(stateDir, slotsDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("start slots: %w", err)
	}
	files := make([]*os.File, n)
	defer func() {
		for _, f := range files {
			if f != nil {
				f.Close()
			}
		}
	}()
	for i := range files {
		f, err := os.OpenFile(filepath.Join(dir, strconv.Itoa(i)), os.O_CREATE|os.O_RDWR, 0o600)
		if err != nil {
			return nil, fmt.Errorf("start slots: %w", err)
		}
		files[i] = f
	}
	for {
		for i, f := range files {
			err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
			if err == nil {
				files[i] = nil // kept open: closing it releases the slot
				return func() { f.Close() }, nil
			}
			if !errors.Is(err, unix.EWOULDBLOCK) {
				return nil, fmt.Errorf("start slot %s: %w", f.Name(), err)
			}
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for a start slot (runtime.max_parallel_starts): %w", context.Cause(ctx))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

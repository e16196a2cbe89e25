package sandbox

import (
	"context"
	"strings"
	"testing"
	"time"
)

// TestStartSlot: with one slot a second start waits for the first to
// release it, and gives up with a clear error when its context ends.
func TestStartSlot(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	release, err := startSlot(ctx, dir, 1)
	if err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if _, err := startSlot(short, dir, 1); err == nil || !strings.Contains(err.Error(), "runtime.max_parallel_starts") {
		t.Fatalf("second start with the slot taken: %v", err)
	}
	got := make(chan error, 1)
	go func() {
		r, err := startSlot(ctx, dir, 1)
		if err == nil {
			r()
		}
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("got the slot while it was taken: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	release()
	if err := <-got; err != nil {
		t.Fatal(err)
	}
}

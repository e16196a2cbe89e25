package vmoutput

import (
	"testing"
	"time"
)

// TestLineLimit: a burst goes through, then the rate; what is held back is
// counted on the next line logged.
func TestLineLimit(t *testing.T) {
	l := lineLimit{tokens: lineBurst}
	now := time.Unix(1000, 0)
	logged := 0
	for range lineBurst + 100 {
		if ok, _ := l.allow(now); ok {
			logged++
		}
	}
	if logged != lineBurst {
		t.Fatalf("logged %d of a burst, want %d", logged, lineBurst)
	}
	ok, held := l.allow(now.Add(time.Second))
	if !ok || held != 100 {
		t.Fatalf("after a second: allow %v, held back %d, want true, 100", ok, held)
	}
	n := 1
	for {
		if ok, _ := l.allow(now.Add(time.Second)); !ok {
			break
		}
		n++
	}
	if n != linesPerSecond {
		t.Errorf("a second refilled %d lines, want %d", n, linesPerSecond)
	}
}

// Package vmoutput keeps and logs the lines a VM's hypervisor process
// writes: the guest's console and the hypervisor's own messages. The guest
// is untrusted and writes its console as fast as it likes, so what reaches
// the log is rate-limited and stripped of escape sequences, and only the
// last lines are kept, for error messages.
package vmoutput

import (
	"bufio"
	"errors"
	"io"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"
)

const (
	// Kept is how many of the last lines an Output keeps.
	Kept = 50
	// A reader's lines are logged at up to lineBurst at once, then
	// linesPerSecond.
	lineBurst      = 200
	linesPerSecond = 50
)

// escapeSequence matches terminal escape sequences and control characters
// but tab: a guest must not drive the terminal of whoever reads the log.
var escapeSequence = regexp.MustCompile(`\x1b(\[[0-9;?]*[A-Za-z]|.)|[\x00-\x08\x0a-\x1f\x7f]`)

// Output keeps the last Kept lines its readers copied.
type Output struct {
	mu  sync.Mutex
	buf []string
}

// Lines returns the lines kept, oldest first.
func (o *Output) Lines() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.buf)
}

func (o *Output) add(line string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.buf) == Kept {
		o.buf = slices.Delete(o.buf, 0, 1)
	}
	o.buf = append(o.buf, line)
}

// Copy reads r until it ends, keeping each non-blank line (escape
// sequences removed, a line longer than 4 KiB split) and passing it to
// logLine while the reader's rate allows: heldBack counts the lines held
// back since the last one logged.
func (o *Output) Copy(r io.Reader, logLine func(line string, heldBack int)) {
	br := bufio.NewReaderSize(r, 4096)
	limit := lineLimit{tokens: lineBurst}
	for {
		b, err := br.ReadSlice('\n')
		if len(b) > 0 {
			line := escapeSequence.ReplaceAllString(strings.TrimRight(string(b), "\r\n"), "")
			if strings.TrimSpace(line) != "" {
				o.add(line)
				if ok, held := limit.allow(time.Now()); ok {
					logLine(line, held)
				}
			}
		}
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			return
		}
	}
}

// lineLimit is a token bucket of log lines, for one reader.
type lineLimit struct {
	tokens float64
	last   time.Time
	held   int
}

// allow tells whether to log a line now, and how many were held back
// since the last one logged.
func (l *lineLimit) allow(now time.Time) (bool, int) {
	if !l.last.IsZero() {
		l.tokens = min(lineBurst, l.tokens+now.Sub(l.last).Seconds()*linesPerSecond)
	}
	l.last = now
	if l.tokens < 1 {
		l.held++
		return false, 0
	}
	l.tokens--
	held := l.held
	l.held = 0
	return true, held
}

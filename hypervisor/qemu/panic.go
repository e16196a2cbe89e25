package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"

	"github.com/containerd/log"
)

// A guest kernel that panics writes to the pvpanic device, QEMU pauses the
// VM (-action panic=pause) and sends GUEST_PANICKED; Panicked is closed
// then. Dump writes the guest's memory with QMP dump-guest-memory, on a
// panicked VM or a running one (QEMU pauses it for the dump and resumes it
// after).

// Panicked is closed when the guest kernel has panicked; the VM is paused
// until it is stopped.
func (vm *VM) Panicked() <-chan struct{} { return vm.panicked }

// guestPanicked handles GUEST_PANICKED, from QMP's reader: it must not
// block.
func (vm *VM) guestPanicked(data json.RawMessage) {
	var d struct {
		Action string `json:"action"`
	}
	json.Unmarshal(data, &d)
	vm.panickedOnce.Do(func() {
		vm.logger.WithField("action", d.Action).Warn("qemu: the guest kernel panicked")
		close(vm.panicked)
	})
}

// dumpFD is the name the dump's pipe gets in QEMU (getfd); one dump runs
// at a time (vm.dumping), so one name does.
const dumpFD = "colo-dump"

// dumpGrace bounds waiting for QEMU to give up a dump whose reader went
// away, so that the VM runs again and the next dump can start.
const dumpGrace = 10 * time.Second

// dumpBlock is the unit the copy skips when it is all zeros, leaving a
// hole in the file: a guest's free memory costs no disk.
const dumpBlock = 4096

// Dump writes the guest's memory to path, a new file (an existing one, or
// a symlink, is refused: the file is created with O_EXCL|O_NOFOLLOW, mode
// 0600), as an ELF vmcore of the guest's physical memory (paging=false:
// crash reads it with the kernel's own page tables). It returns once the
// file is complete; when ctx ends first, the dump is cut short, the file
// removed and ctx's error returned.
//
// QEMU does not write the file: it writes into a pipe the driver copies
// from. QEMU 7.2 has no command to cancel a dump, but its write fails
// once the reader is gone, which ends the dump (and resumes a guest that
// was running); and QEMU, confined by its seccomp filter and capabilities,
// gets no file of the host's beyond the pipe.
func (vm *VM) Dump(ctx context.Context, path string) (retErr error) {
	fail := func(err error) error { return fmt.Errorf("qemu: vm %s: dump: %w", vm.id, err) }
	if ctx.Err() != nil {
		return fail(context.Cause(ctx))
	}
	select {
	case vm.dumping <- struct{}{}:
		defer func() { <-vm.dumping }()
	case <-ctx.Done():
		return fail(context.Cause(ctx))
	case <-vm.done:
		return fail(errExited)
	}

	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return fail(err)
	}
	defer func() {
		f.Close()
		if retErr != nil {
			os.Remove(path)
		}
	}()
	r, w, err := os.Pipe()
	if err != nil {
		return fail(err)
	}
	defer r.Close()
	_, err = vm.qmp.ExecuteWithFile(ctx, "getfd", map[string]any{"fdname": dumpFD}, w)
	// QEMU holds its own copy now: its closing it is the end of the data.
	w.Close()
	if err != nil {
		return fail(err)
	}
	started := time.Now()
	if _, err := vm.qmp.Execute(ctx, "dump-guest-memory", map[string]any{
		"paging":   false,
		"protocol": "fd:" + dumpFD,
		"detach":   true,
	}); err != nil {
		// The fd is still named unless the command took it before failing.
		undo, cancel := context.WithTimeout(context.WithoutCancel(ctx), undoTimeout)
		vm.qmp.Execute(undo, "closefd", map[string]any{"fdname": dumpFD})
		cancel()
		return fail(err)
	}

	// A ctx that ends closes the pipe's read end: QEMU's next write fails
	// with EPIPE and the dump ends.
	stop := context.AfterFunc(ctx, func() { r.Close() })
	n, copyErr := copySparse(f, r)
	cancelled := !stop()
	if cancelled {
		copyErr = context.Cause(ctx)
	}
	if copyErr != nil {
		// Closing the read end makes QEMU give up; wait (bounded) until
		// it has, so the guest runs again before the next dump starts.
		r.Close()
		wait, cancel := context.WithTimeout(context.WithoutCancel(ctx), dumpGrace)
		defer cancel()
		if _, err := vm.dumpResult(wait); err != nil {
			vm.logger.WithError(err).Warn("qemu: waiting for the dump to end")
		}
		return fail(copyErr)
	}
	// QEMU sets the dump's status before it closes the pipe: the result
	// is final now, or within moments.
	res, err := vm.dumpResult(ctx)
	if err != nil {
		return fail(err)
	}
	if res != "completed" {
		return fail(fmt.Errorf("QEMU reports the dump %s after %d bytes", res, n))
	}
	if err := f.Truncate(n); err != nil { // a trailing hole
		return fail(err)
	}
	// No fsync: the file is for whoever looks at the crash on this host,
	// and an fsync of a large file could outlast ctx uninterruptibly.
	if err := f.Close(); err != nil {
		return fail(err)
	}
	vm.logger.WithFields(log.Fields{"path": path, "bytes": n, "duration": time.Since(started).String()}).Info("qemu: guest memory dumped")
	return nil
}

// dumpResult polls query-dump until the dump is no longer active and
// returns its status ("completed", "failed", or "none").
func (vm *VM) dumpResult(ctx context.Context) (string, error) {
	for {
		raw, err := vm.qmp.Execute(ctx, "query-dump", nil)
		if err != nil {
			return "", err
		}
		var q struct {
			Status    string `json:"status"`
			Completed int64  `json:"completed"`
			Total     int64  `json:"total"`
		}
		if err := json.Unmarshal(raw, &q); err != nil {
			return "", fmt.Errorf("query-dump: %w", err)
		}
		if q.Status != "active" {
			return q.Status, nil
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("query-dump: still active (%d of %d bytes): %w", q.Completed, q.Total, context.Cause(ctx))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// copySparse copies r to the start of f, leaving holes for the
// dumpBlock-aligned blocks that are all zeros, and returns the bytes read.
// The caller sets the file's size (a hole at the end has no write to make
// it).
func copySparse(f io.WriterAt, r io.Reader) (int64, error) {
	buf := make([]byte, 1<<20)
	zero := make([]byte, dumpBlock)
	var off int64
	for {
		n, err := io.ReadFull(r, buf)
		chunk := buf[:n]
		// Runs of non-zero blocks go out in one write each.
		for start := 0; start < len(chunk); {
			end := start
			for end < len(chunk) {
				b := chunk[end:min(end+dumpBlock, len(chunk))]
				if bytes.Equal(b, zero[:len(b)]) {
					break
				}
				end += len(b)
			}
			if end > start {
				if _, werr := f.WriteAt(chunk[start:end], off+int64(start)); werr != nil {
					return off + int64(start), werr
				}
				start = end
				continue
			}
			start += min(dumpBlock, len(chunk)-start)
		}
		off += int64(n)
		switch {
		case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
			return off, nil
		case err != nil:
			return off, err
		}
	}
}

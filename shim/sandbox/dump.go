package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/hypervisor"
)

// A vmcore is the guest's memory as an ELF core (crash and gdb read it),
// written by the hypervisor driver (VM.Dump): when the guest kernel panics
// (watchPanic, into hypervisor.dump_dir) and on demand (POST /dump on the
// management socket, colo dump). The guest is untrusted and chooses
// nothing of it: the file's name is the sandbox's id and the host's clock,
// the file is new (never one that exists, nor a symlink's target) and
// root's alone.

// DumpRequest is the optional body of POST /dump.
type DumpRequest struct {
	// Dir is where the vmcore goes, an absolute path (made 0700 if
	// missing); hypervisor.dump_dir when empty.
	Dir string `json:"dir,omitempty"`
}

// DumpReply answers POST /dump: the vmcore written.
type DumpReply struct {
	Path  string `json:"path"`
	Bytes int64  `json:"bytes"`
}

// dumpSpaceFactor is how many times the guest's memory a vmcore's
// filesystem must have free: the core is about the memory's size, and a
// host whose disk a dump fills has worse problems than a missing core.
const dumpSpaceFactor = 2

// dumpName names the vmcore of sandbox id written at t (UTC, to the
// millisecond, so that names sort by time and two dumps rarely collide;
// one that does is refused, never overwritten). Only characters of
// containerd's ids are kept, so that the name stays one path component
// whatever the id.
func dumpName(id string, t time.Time) string {
	safe := strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_', r == '.':
			return r
		}
		return '_'
	}, id)
	return safe + "-" + t.UTC().Format("20060102T150405.000Z") + ".vmcore"
}

// checkDumpSpace refuses a dump of a guest of memoryMB into a filesystem
// with free bytes available, naming both.
func checkDumpSpace(dir string, free uint64, memoryMB int) error {
	need := (uint64(memoryMB) << 20) * dumpSpaceFactor
	if free < need {
		return errdefs.ErrFailedPrecondition.WithMessage(fmt.Sprintf(
			"not enough space for a vmcore: %s has %d MiB free, a guest of %d MiB needs %d MiB (%d times its memory)",
			dir, free>>20, memoryMB, need>>20, dumpSpaceFactor))
	}
	return nil
}

// freeSpace is what an unprivileged writer may still use of dir's
// filesystem (the blocks reserved for root stay for the host).
func freeSpace(dir string) (uint64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return st.Bavail * uint64(st.Bsize), nil
}

// writeDump writes a vmcore of the guest into dir, bounded by ctx and
// hypervisor.dump_timeout, and returns its path and size.
func (s *Sandbox) writeDump(ctx context.Context, dir string) (string, int64, error) {
	if !filepath.IsAbs(dir) {
		return "", 0, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("dump directory %q: want an absolute path", dir))
	}
	dir = filepath.Clean(dir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", 0, fmt.Errorf("dump directory: %w", err)
	}
	free, err := freeSpace(dir)
	if err != nil {
		return "", 0, err
	}
	if err := checkDumpSpace(dir, free, s.currentSize().memoryMB); err != nil {
		return "", 0, err
	}
	path := filepath.Join(dir, dumpName(s.id, time.Now()))
	ctx, cancel := context.WithTimeout(ctx, time.Duration(s.cfg.Hypervisor.DumpTimeout))
	defer cancel()
	begin := time.Now()
	// The guest is paused while its memory is written: its health
	// checks go unanswered, which is no failure.
	s.dumping.Add(1)
	err = s.vm.Dump(ctx, path)
	s.dumping.Add(-1)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			err = fmt.Errorf("%w (hypervisor.dump_timeout %s)", err, s.cfg.Hypervisor.DumpTimeout)
		}
		return "", 0, err
	}
	st, err := os.Lstat(path)
	if err != nil {
		return "", 0, fmt.Errorf("vmcore: %w", err)
	}
	log.G(ctx).WithFields(log.Fields{
		"path": path, "bytes": st.Size(), "took": time.Since(begin).String(),
	}).Info("vmcore written")
	return path, st.Size(), nil
}

// watchPanic waits for the guest kernel to panic, then writes a vmcore
// into hypervisor.dump_dir (if set and there is room) and fails the
// sandbox: its processes exit and it is torn down. The VM stays paused,
// its memory as the panic left it, until then.
func (s *Sandbox) watchPanic() {
	select {
	case <-s.stopping:
		return
	case <-s.vm.Panicked():
	}
	ctx := s.ctx
	log.G(ctx).WithField("console", s.vm.Console()).Error("the guest kernel panicked")
	reason := errors.New("the guest kernel panicked; no vmcore written (hypervisor.dump_dir is not set)")
	if dir := s.cfg.Hypervisor.DumpDir; dir != "" {
		path, _, err := s.writeDump(ctx, dir)
		if err != nil {
			log.G(ctx).WithError(err).Error("no vmcore written of the panicked guest")
			reason = fmt.Errorf("the guest kernel panicked; no vmcore written: %w", err)
		} else {
			reason = fmt.Errorf("the guest kernel panicked; vmcore %s", path)
		}
	}
	s.fail(reason)
}

// handleDump writes a vmcore of the running (or panicked) guest: POST
// /dump with an optional {"dir": "/abs/path"}, else into
// hypervisor.dump_dir. The guest is paused while its memory is written.
func (s *Sandbox) handleDump(w http.ResponseWriter, r *http.Request) {
	var req DumpRequest
	dec := json.NewDecoder(io.LimitReader(r.Body, maxRequestBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil && !errors.Is(err, io.EOF) {
		reply(w, hypervisor.Size{}, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf(`POST /dump: want no body or {"dir": "/abs/path"}: %v`, err)))
		return
	}
	dir := req.Dir
	if dir == "" {
		dir = s.cfg.Hypervisor.DumpDir
	}
	if dir == "" {
		reply(w, hypervisor.Size{}, errdefs.ErrInvalidArgument.WithMessage(`POST /dump: no directory: give {"dir": "/abs/path"} or set hypervisor.dump_dir`))
		return
	}
	if !s.alive() {
		reply(w, hypervisor.Size{}, errdefs.ErrFailedPrecondition.WithMessage(fmt.Sprintf("sandbox %s: its VM is gone", s.id)))
		return
	}
	ctx := r.Context()
	log.G(ctx).WithField("dir", dir).Info("vmcore asked on the management socket")
	path, n, err := s.writeDump(ctx, dir)
	if err != nil {
		log.G(ctx).WithError(err).Warn("vmcore asked on the management socket")
		reply(w, hypervisor.Size{}, err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(DumpReply{Path: path, Bytes: n})
}

package clh

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
)

// event is what CH writes to --event-monitor for each event: one JSON
// object (pretty-printed, so not one per line).
type event struct {
	Source     string            `json:"source"`
	Event      string            `json:"event"`
	Properties map[string]string `json:"properties"`
}

// readEvents reads CH's events until the pipe ends: a pvpanic write of the
// guest is source "guest", event "panic".
func (vm *VM) readEvents(r io.Reader) {
	dec := json.NewDecoder(r)
	for {
		var e event
		if err := dec.Decode(&e); err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, os.ErrClosed) {
				vm.logger.WithError(err).Warn("clh: reading events")
			}
			return
		}
		vm.logger.WithField("properties", e.Properties).Debugf("clh: event %s/%s", e.Source, e.Event)
		if e.Source == "guest" && e.Event == "panic" {
			vm.panickedOnce.Do(func() {
				vm.logger.WithField("properties", e.Properties).Warn("clh: the guest kernel panicked")
				close(vm.panicked)
			})
		}
	}
}

// Panicked is closed when the guest kernel has panicked (the pvpanic
// device). Without panic=-1 on its command line the guest stays in its
// panic loop with its memory as it was, until it is stopped.
func (vm *VM) Panicked() <-chan struct{} { return vm.panicked }

// Dump writes the guest's memory to path as an ELF core with vm.coredump,
// which CH has only when built with its guest_debug feature (release
// builds are not): CH's error then says so and reaches the caller. CH
// writes the file itself, so path must be a new file in a directory CH
// may write; the VM is paused for the dump and resumed after. A dump that
// fails or is cut short by ctx leaves no file.
func (vm *VM) Dump(ctx context.Context, path string) (retErr error) {
	fail := func(err error) error { return vm.fail(fmt.Errorf("dump: %w", err)) }
	if !filepath.IsAbs(path) {
		return fail(fmt.Errorf("path %q: want an absolute path", path))
	}
	select {
	case vm.dumping <- struct{}{}:
		defer func() { <-vm.dumping }()
	case <-ctx.Done():
		return fail(context.Cause(ctx))
	case <-vm.done:
		return fail(errExited)
	}
	// The file is made here, so that an existing one or a symlink is
	// refused before CH, which follows names, writes anything.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return fail(err)
	}
	f.Close()
	defer func() {
		if retErr != nil {
			os.Remove(path)
		}
	}()
	// vm.coredump needs a paused VM; a panicked one runs its panic loop.
	if err := vm.api.call(ctx, http.MethodPut, "vm.pause", nil, nil); err != nil {
		return fail(err)
	}
	defer func() {
		resume, cancel := context.WithTimeout(context.WithoutCancel(ctx), undoTimeout)
		defer cancel()
		if err := vm.api.call(resume, http.MethodPut, "vm.resume", nil, nil); err != nil {
			vm.logger.WithError(err).Warn("clh: resuming after the dump")
		}
	}()
	if err := vm.api.callNoTimeout(ctx, http.MethodPut, "vm.coredump", urlConfig{DestinationURL: "file://" + path}, nil); err != nil {
		if statusOf(err) == http.StatusNotFound || statusOf(err) == http.StatusBadRequest {
			err = fmt.Errorf("%w (vm.coredump needs a Cloud Hypervisor built with the guest_debug feature)", err)
		}
		return fail(err)
	}
	return nil
}

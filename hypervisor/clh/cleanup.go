package clh

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/log"

	"github.com/colo-runtime/colo/internal/procfs"
)

// Cleanup kills the CH a dead controller left running for dir, waits until
// it is gone and removes the driver's files there. It is a no-op when
// nothing is left. As the QEMU driver's, it needs no Driver (no binary
// looked up, nothing probed), and kills only a process known to be dir's:
//   - vm, the process the controller recorded, by pid and start time;
//   - the pid in the driver's pid file, if its command line is a CH's
//     with this dir's API socket;
//   - any process whose command line is a CH's with this API socket: the
//     controller may have died before writing the pid anywhere.
func Cleanup(ctx context.Context, dir string, vm procfs.Proc) error {
	dir = filepath.Clean(dir)
	sock := filepath.Join(dir, APISocket)
	byArgs := func(_ procfs.Stat, args []string) bool { return isCHArgs(args, sock) }
	type candidate struct {
		pid int
		ok  func(procfs.Stat, []string) bool
	}
	var cands []candidate
	if vm.Pid > 0 && vm.Start != 0 {
		cands = append(cands, candidate{vm.Pid, func(st procfs.Stat, _ []string) bool { return st.Start == vm.Start }})
	}
	pidfile := filepath.Join(dir, PidFile)
	b, err := os.ReadFile(pidfile)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("clh: cleanup %s: %w", dir, err)
	default:
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
			cands = append(cands, candidate{pid, byArgs})
		} else {
			log.G(ctx).Warnf("clh: cleanup: %s: no pid in %q, removing it", pidfile, b)
		}
	}
	for _, p := range procfs.Find(func(args []string) bool { return isCHArgs(args, sock) }) {
		cands = append(cands, candidate{p.Pid, func(st procfs.Stat, args []string) bool {
			return st.Start == p.Start && byArgs(st, args)
		}})
	}
	var errs []error
	var tried []int
	for _, c := range cands {
		if slices.Contains(tried, c.pid) {
			continue
		}
		tried = append(tried, c.pid)
		killed, err := procfs.KillIf(ctx, c.pid, func(st procfs.Stat, args []string) bool {
			if c.ok(st, args) {
				return true
			}
			log.G(ctx).WithField("pid", c.pid).Warnf("clh: cleanup: pid %d is not the Cloud Hypervisor of %s, leaving it alone", c.pid, dir)
			return false
		})
		if killed {
			log.G(ctx).WithField("pid", c.pid).Info("clh: cleanup: killed an abandoned VM")
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("clh: cleanup %s: %w", dir, err)
	}
	if err := removeFiles(ctx, driverFiles(dir)); err != nil {
		return fmt.Errorf("clh: cleanup %s: %w", dir, err)
	}
	return nil
}

// isCHArgs tells whether a command line is a CH (any binary name: the
// configuration may name another path) started by this driver with this
// API socket: "--api-socket path=<sock>".
func isCHArgs(args []string, sock string) bool {
	if len(args) == 0 {
		return false
	}
	for i := 1; i+1 < len(args); i++ {
		if args[i] == "--api-socket" && strings.HasPrefix(args[i+1], "path=") && filepath.Clean(strings.TrimPrefix(args[i+1], "path=")) == sock {
			return true
		}
	}
	return false
}

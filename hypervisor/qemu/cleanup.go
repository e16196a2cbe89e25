package qemu

import (
	"bytes"
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

// Cleanup kills the QEMU a dead controller left running for dir, waits
// until it is gone and removes the driver's files there. It is a no-op
// when nothing is left.
//
// It needs no Driver, hence no configuration: nothing is looked up in PATH
// and no device is probed. Cleanup runs after a crash, maybe long after,
// when QEMU may have been upgraded, moved or removed, or /dev/kvm may be
// gone: a Driver (New) would fail then, and the VM would leak for good.
//
// QEMU is not our child (its controller died), so it is killed and
// watched through a pidfd, and only once it is known to be this dir's:
//   - vm, the process the controller recorded: pid and start time name
//     that very process, whatever its command line says;
//   - the pid in QEMU's pid file (it writes it at once), if its command
//     line is QEMU's with this pid file: the pid may have been reused;
//   - any process whose command line is QEMU's with this pid file, which
//     is inside dir so no other VM's: the controller may have died after
//     launching QEMU but before anything recorded its pid.
func Cleanup(ctx context.Context, dir string, vm procfs.Proc) error {
	dir = filepath.Clean(dir)
	pidfile := filepath.Join(dir, PidFile)
	byArgs := func(st procfs.Stat, args []string) bool { return isQEMUArgs(args, pidfile) }
	type candidate struct {
		pid int
		ok  func(procfs.Stat, []string) bool
	}
	var cands []candidate
	if vm.Pid > 0 && vm.Start != 0 {
		cands = append(cands, candidate{vm.Pid, func(st procfs.Stat, _ []string) bool { return st.Start == vm.Start }})
	}
	b, err := os.ReadFile(pidfile)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("qemu: cleanup %s: %w", dir, err)
	default:
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
			cands = append(cands, candidate{pid, byArgs})
		} else {
			// QEMU writes the pid at once: a bad file is not a live QEMU's.
			log.G(ctx).Warnf("qemu: cleanup: %s: no pid in %q, removing it", pidfile, b)
		}
	}
	for _, p := range procfs.Find(func(args []string) bool { return isQEMUArgs(args, pidfile) }) {
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
			log.G(ctx).WithField("pid", c.pid).Warnf("qemu: cleanup: pid %d is not the QEMU of %s, leaving it alone", c.pid, dir)
			return false
		})
		if killed {
			log.G(ctx).WithField("pid", c.pid).Info("qemu: cleanup: killed an abandoned VM")
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("qemu: cleanup %s: %w", dir, err)
	}
	if err := removeFiles(ctx, driverFiles(dir)); err != nil {
		return fmt.Errorf("qemu: cleanup %s: %w", dir, err)
	}
	return nil
}

// isQEMU tells whether a /proc/<pid>/cmdline is a QEMU started with this
// pid file.
func isQEMU(cmdline []byte, pidfile string) bool {
	return isQEMUArgs(strings.Split(string(bytes.TrimRight(cmdline, "\x00")), "\x00"), pidfile)
}

// isQEMUArgs tells whether a command line is a QEMU started with this pid
// file. setpriv (confinement) runs first in the same process: until it
// execs QEMU, the command line is setpriv's, QEMU's after "--".
func isQEMUArgs(args []string, pidfile string) bool {
	if len(args) > 0 && filepath.Base(args[0]) == setprivBinary {
		i := slices.Index(args, "--")
		if i < 0 {
			return false
		}
		args = args[i+1:]
	}
	if len(args) == 0 || !strings.Contains(filepath.Base(args[0]), "qemu") {
		return false
	}
	for i := 1; i+1 < len(args); i++ {
		if args[i] == "-pidfile" && filepath.Clean(args[i+1]) == pidfile {
			return true
		}
	}
	return false
}

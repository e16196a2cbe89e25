package qemu

import (
	"bytes"
	"context"
	"fmt"
	"path/filepath"
	"slices"
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
	killed, refused, err := procfs.KillAbandoned(ctx, vm, pidfile, func(args []string) bool { return isQEMUArgs(args, pidfile) })
	for _, pid := range refused {
		log.G(ctx).WithField("pid", pid).Warnf("qemu: cleanup: pid %d is not the QEMU of %s, leaving it alone", pid, dir)
	}
	for _, pid := range killed {
		log.G(ctx).WithField("pid", pid).Info("qemu: cleanup: killed an abandoned VM")
	}
	if err != nil {
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

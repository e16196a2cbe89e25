package clh

import (
	"context"
	"fmt"
	"path/filepath"
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
	killed, refused, err := procfs.KillAbandoned(ctx, vm, filepath.Join(dir, PidFile), func(args []string) bool { return isCHArgs(args, sock) })
	for _, pid := range refused {
		log.G(ctx).WithField("pid", pid).Warnf("clh: cleanup: pid %d is not the Cloud Hypervisor of %s, leaving it alone", pid, dir)
	}
	for _, pid := range killed {
		log.G(ctx).WithField("pid", pid).Info("clh: cleanup: killed an abandoned VM")
	}
	if err != nil {
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

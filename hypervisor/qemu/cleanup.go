package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// Cleanup kills the QEMU whose pid file is in dir, waits until it is gone
// and removes the driver's files. The process is not our child (its
// controller died), so it is killed and watched through a pidfd, and only
// when its command line shows it is QEMU with this dir's pid file: the pid
// may have been reused since.
func (d *Driver) Cleanup(ctx context.Context, dir string) error {
	dir = filepath.Clean(dir)
	pidfile := filepath.Join(dir, PidFile)
	b, err := os.ReadFile(pidfile)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("qemu: cleanup %s: %w", dir, err)
	default:
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 0 {
			// QEMU writes the pid at once: a bad file is not a live QEMU's.
			log.G(ctx).Warnf("qemu: cleanup: %s: no pid in %q, removing it", pidfile, b)
		} else if err := killQEMU(ctx, pid, pidfile); err != nil {
			return fmt.Errorf("qemu: cleanup %s: %w", dir, err)
		}
	}
	if err := removeFiles(ctx, driverFiles(dir)); err != nil {
		return fmt.Errorf("qemu: cleanup %s: %w", dir, err)
	}
	return nil
}

func killQEMU(ctx context.Context, pid int, pidfile string) error {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	defer unix.Close(pidfd)

	// Read after the pidfd holds the process: a pid reused after this read
	// cannot be the one the pidfd signals.
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if !isQEMU(cmdline, pidfile) {
		log.G(ctx).Warnf("qemu: cleanup: pid %d from %s is not its QEMU, leaving it alone", pid, pidfile)
		return nil
	}
	log.G(ctx).WithField("pid", pid).Info("qemu: cleanup: killing an abandoned VM")
	if err := unix.PidfdSendSignal(pidfd, unix.SIGKILL, nil, 0); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil
		}
		return fmt.Errorf("kill %d: %w", pid, err)
	}
	// The pidfd turns readable when the process has exited (a zombie
	// waiting for its parent counts: it holds nothing any more).
	for {
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, 100) // ms: to notice ctx
		if err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("wait for %d: %w", pid, err)
		}
		if n > 0 {
			return nil
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("wait for %d to exit after SIGKILL: %w", pid, err)
		}
	}
}

// isQEMU tells whether a /proc/<pid>/cmdline is a QEMU started with this
// pid file.
func isQEMU(cmdline []byte, pidfile string) bool {
	args := strings.Split(string(bytes.TrimRight(cmdline, "\x00")), "\x00")
	if !strings.Contains(filepath.Base(args[0]), "qemu") {
		return false
	}
	for i := 1; i+1 < len(args); i++ {
		if args[i] == "-pidfile" && filepath.Clean(args[i+1]) == pidfile {
			return true
		}
	}
	return false
}

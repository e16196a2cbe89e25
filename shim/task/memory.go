package task

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// trimDelay is how long after a create the shim lets go of its start-up
// pages: after the start that follows and the guest details the sandbox
// logs a second after a create.
const trimDelay = 2 * time.Second

// trimmer lets go, a moment after each create, of the shim's mappings of
// its executable's read-only pages (code and constants). Starting a VM runs
// code an idle shim never runs again (package init, config, QEMU's launch,
// protobuf registration): some 10 MB of the 17 MB a shim maps. Read-only
// file pages are never modified, so dropping them from the page tables
// (MADV_DONTNEED) changes nothing the shim can see: the kernel keeps them in
// the page cache, shared by every shim, and maps back any that are needed
// again.
type trimmer struct {
	mu    sync.Mutex
	timer *time.Timer
}

// soon trims trimDelay from now, once however often it is called meanwhile.
func (t *trimmer) soon(ctx context.Context) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.timer != nil {
		t.timer.Reset(trimDelay)
		return
	}
	t.timer = time.AfterFunc(trimDelay, func() {
		if err := dropExecutablePages(); err != nil {
			log.G(ctx).WithError(err).Debug("drop start-up pages")
		}
	})
}

// dropExecutablePages drops the page-table entries of the read-only
// mappings of the process's own executable.
func dropExecutablePages() error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// start-end perms offset dev inode path
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 || fields[5] != exe || strings.ContainsRune(fields[1], 'w') {
			continue
		}
		lo, hi, _ := strings.Cut(fields[0], "-")
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil {
			return fmt.Errorf("/proc/self/maps: %q", sc.Text())
		}
		if _, _, errno := unix.Syscall(unix.SYS_MADVISE, uintptr(start), uintptr(end-start), unix.MADV_DONTNEED); errno != 0 {
			return fmt.Errorf("madvise %s: %w", fields[0], errno)
		}
	}
	return sc.Err()
}

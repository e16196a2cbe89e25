package agent

import (
	"context"
	"fmt"
	"os"
	"strconv"

	"github.com/containerd/log"
	"github.com/opencontainers/runc/libcontainer/exeseal"
)

// serviceExecutable returns the file PID 1 starts the agent service from,
// and a function that closes it once the service has started.
//
// With sealed (the default, colo.sealed_exe=1) it is a sealed memfd copy of
// colo-agent. libcontainer re-executes the service's own binary as every
// container's and every exec's "runc init", and keeps a container from
// overwriting that binary (CVE-2019-5736) by giving each init a sealed
// copy of it: a fresh overlayfs mount per init, made and torn down by
// emulated system calls on a restored VM's first and every later start,
// unless the binary already is a sealed memfd (exeseal.IsSelfExeCloned), as
// it then is. The copy is made once, at boot, before the VM is saved as a
// template: clones share its pages with the template.
//
// Failing to make the copy is not fatal: the service runs from /init and
// libcontainer seals a copy per init as before.
func serviceExecutable(ctx context.Context, sealed bool) (path string, closeExe func()) {
	const self = "/proc/self/exe"
	if !sealed {
		return self, func() {}
	}
	f, err := sealedSelf()
	if err != nil {
		log.G(ctx).WithError(err).Warn("the agent service runs from /init: libcontainer seals a copy of it for every container process")
		return self, func() {}
	}
	// The child resolves the path before exec closes the descriptor
	// (close-on-exec), as fexecve does.
	return "/proc/self/fd/" + strconv.Itoa(int(f.Fd())), func() { f.Close() }
}

func sealedSelf() (*os.File, error) {
	exe, err := os.Open("/proc/self/exe")
	if err != nil {
		return nil, err
	}
	defer exe.Close()
	st, err := exe.Stat()
	if err != nil {
		return nil, err
	}
	f, err := exeseal.CloneBinary(exe, st.Size(), "colo-agent", os.TempDir())
	if err != nil {
		return nil, fmt.Errorf("seal a copy of the agent: %w", err)
	}
	if !exeseal.IsCloned(f) {
		f.Close()
		return nil, fmt.Errorf("the agent's copy is not a sealed memfd")
	}
	return f, nil
}

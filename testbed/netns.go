package testbed

import (
	"fmt"
	"path/filepath"
	"runtime"

	"github.com/vishvananda/netns"
)

// NewNetNS creates the network namespace name, bound at
// /var/run/netns/NAME as `ip netns add` does, without leaving the calling
// thread in it, and returns its path and its removal.
func NewNetNS(name string) (path string, remove func() error, err error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return "", nil, err
	}
	defer orig.Close()
	ns, err := netns.NewNamed(name)
	if err != nil {
		return "", nil, fmt.Errorf("netns %s: %w", name, err)
	}
	ns.Close()
	if err := netns.Set(orig); err != nil {
		// The thread stays locked, and so is retired, in the wrong
		// namespace.
		runtime.LockOSThread()
		return "", nil, err
	}
	return filepath.Join("/var/run/netns", name), func() error { return netns.DeleteNamed(name) }, nil
}

// Command containerd-shim-colo-v2 is the containerd shim of the runtime
// io.containerd.colo.v2: it runs each task in a lightweight VM.
package main

import (
	"context"

	"github.com/containerd/containerd/v2/pkg/shim"

	"github.com/colo-runtime/colo/shim/manager"
	_ "github.com/colo-runtime/colo/shim/task/plugin"
)

func main() {
	shim.RunShim(context.Background(), manager.NewShimManager("io.containerd.colo.v2"), func(c *shim.Config) {
		// The shim waits for its own children (QEMU, virtiofsd); a
		// global reaper would steal their exit statuses. It runs no
		// container processes on the host, so it need not be a
		// subreaper either, which would only collect orphans (such as
		// virtiofsd's sandbox child) it never reaps.
		c.NoReaper = true
		c.NoSubreaper = true
	})
}

package e2e

import (
	"context"
	"strings"
	"testing"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/colo-runtime/colo/shim/sandbox"
)

// TestHostNamespaces: a pod asking for the node's network, PID or IPC
// namespace gets an error naming the field at RunPodSandbox, with both
// colo handlers, and nothing is left behind (each pod's cleanup checks);
// with the fallback allowed (the test bed's config) and asked for, it
// runs with the guest's own.
func TestHostNamespaces(t *testing.T) {
	for _, h := range criHandlers {
		if !h.vm {
			continue
		}
		t.Run(h.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), criTimeout)
			defer cancel()
			rs := criRuntime(t)
			for _, tc := range []struct {
				field string
				set   func(*runtimeapi.NamespaceOption)
			}{
				{"hostNetwork", func(o *runtimeapi.NamespaceOption) { o.Network = runtimeapi.NamespaceMode_NODE }},
				{"hostPID", func(o *runtimeapi.NamespaceOption) { o.Pid = runtimeapi.NamespaceMode_NODE }},
				{"hostIPC", func(o *runtimeapi.NamespaceOption) { o.Ipc = runtimeapi.NamespaceMode_NODE }},
			} {
				p := newPod(t, rs, "hostns-"+strings.ToLower(tc.field), func(c *runtimeapi.PodSandboxConfig) {
					tc.set(c.Linux.SecurityContext.NamespaceOptions)
				})
				_, err := rs.RunPodSandbox(ctx, p.config, h.handler)
				if err == nil || !strings.Contains(err.Error(), tc.field) || !strings.Contains(err.Error(), sandbox.HostNamespacesAnnotation) {
					t.Errorf("%s pod: RunPodSandbox %v, want an error naming %s and the fallback", tc.field, err, tc.field)
				}
			}
			// The fallback, asked for.
			p := runPod(ctx, t, rs, "hostns-guest", h.handler, func(c *runtimeapi.PodSandboxConfig) {
				c.Linux.SecurityContext.NamespaceOptions.Ipc = runtimeapi.NamespaceMode_NODE
				c.Annotations[sandbox.HostNamespacesAnnotation] = "guest"
			})
			c := p.startWith(ctx, t, "ipc", func(c *runtimeapi.ContainerConfig) { c.Command = []string{"sleep", "3600"} })
			if out, _, code := execSync(ctx, t, rs, c, "readlink", "/proc/self/ns/ipc"); code != 0 || !strings.HasPrefix(out, "ipc:[") {
				t.Errorf("a hostIPC pod on the guest's namespace: exec %q (exit %d)", out, code)
			}
		})
	}
}

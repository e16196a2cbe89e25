package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// TestPodSized: a pod whose container has a 1 GiB memory limit gets a VM
// of that size (the guest's own memory on top): inside the container it
// allocates and touches 700 MiB and exits 0, and the guest's MemTotal
// covers the limit. With both colo handlers: the pause container's
// annotations and the sandbox API's pod config carry the pod's size.
func TestPodSized(t *testing.T) {
	for _, h := range criHandlers {
		if !h.vm {
			continue
		}
		t.Run(h.name, func(t *testing.T) { testPodSized(t, h) })
	}
}

func testPodSized(t *testing.T, h criHandler) {
	const limit = 1 << 30
	ctx, cancel := context.WithTimeout(context.Background(), criTimeout)
	defer cancel()
	tools := buildOOMHog(ctx, t)
	rs := criRuntime(t)
	// kubelet gives the pod's resources, the sum of its containers'.
	p := runPod(ctx, t, rs, "sized", h.handler, func(c *runtimeapi.PodSandboxConfig) {
		c.Linux.Resources = &runtimeapi.LinuxContainerResources{MemoryLimitInBytes: limit}
	})
	hog := p.startWith(ctx, t, "hog", func(c *runtimeapi.ContainerConfig) {
		c.Command = []string{"sh", "-c", "grep MemTotal /proc/meminfo; exec /colo-tools/oomhog 700"}
		c.Mounts = []*runtimeapi.Mount{{
			ContainerPath: "/colo-tools",
			HostPath:      tools,
			Readonly:      true,
			Propagation:   runtimeapi.MountPropagation_PROPAGATION_PRIVATE,
		}}
		c.Linux.Resources = &runtimeapi.LinuxContainerResources{MemoryLimitInBytes: limit}
	})
	hogLog := func() string {
		b, _ := os.ReadFile(filepath.Join(p.config.LogDirectory, "hog", "0.log"))
		return string(b)
	}
	var st *runtimeapi.ContainerStatus
	for {
		resp, err := rs.ContainerStatus(ctx, hog, false)
		if err != nil {
			t.Fatalf("ContainerStatus hog: %v", err)
		}
		st = resp.GetStatus()
		if st.GetState() == runtimeapi.ContainerState_CONTAINER_EXITED {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("hog still %v; its log:\n%s", st.GetState(), hogLog())
		case <-time.After(200 * time.Millisecond):
		}
	}
	log := hogLog()
	if st.GetExitCode() != 0 || !strings.Contains(log, "held 700 MiB") {
		t.Errorf("hog exit %d (reason %q), want 0 after holding 700 MiB; its log:\n%s", st.GetExitCode(), st.GetReason(), log)
	}
	var memTotalKB int
	for _, line := range strings.Split(log, "\n") {
		if i := strings.Index(line, "MemTotal:"); i >= 0 {
			f := strings.Fields(line[i+len("MemTotal:"):])
			if len(f) > 0 {
				memTotalKB, _ = strconv.Atoi(f[0])
			}
		}
	}
	if memTotalKB*1024 < limit {
		t.Errorf("guest MemTotal %d kB, want at least the pod's limit (%d bytes); log:\n%s", memTotalKB, limit, log)
	}
}

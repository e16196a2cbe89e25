package agent

import (
	"fmt"
	"os"
	"strconv"

	"github.com/opencontainers/runc/libcontainer/configs"
)

// agentOOMScoreAdj is the guest OOM killer's adjustment for PID 1 and the
// agent service: never to be picked. A guest out of memory must lose a
// container, not the agent: without the service the guest powers off and
// the whole pod is gone.
const agentOOMScoreAdj = -1000

// defaultContainerOOMScoreAdj is what a container's processes get when
// the spec sets no process.oomScoreAdj. libcontainer writes
// oom_score_adj only when the config has one, and the value is
// inherited across fork and exec: left alone, containers would inherit
// the agent's -1000 and be as unkillable as the agent. runc on a host
// hands down its caller's value; the caller here is the shim on the host,
// whose value means nothing in the guest, so the kernel's default.
const defaultContainerOOMScoreAdj = 0

// protectFromOOM sets the calling process's oom_score_adj to
// agentOOMScoreAdj. It needs /proc, and CAP_SYS_RESOURCE to lower it.
func protectFromOOM() error {
	return setOOMScoreAdj("/proc/self/oom_score_adj", agentOOMScoreAdj)
}

func setOOMScoreAdj(path string, adj int) error {
	if err := os.WriteFile(path, []byte(strconv.Itoa(adj)), 0); err != nil {
		return fmt.Errorf("set oom_score_adj %d: %w", adj, err)
	}
	return nil
}

// setContainerOOMScoreAdj gives a container whose spec has no
// oomScoreAdj the default, so that neither its init nor its execs (which
// libcontainer starts with the container's value) inherit the agent's.
func setContainerOOMScoreAdj(config *configs.Config) {
	if config.OomScoreAdj == nil {
		adj := defaultContainerOOMScoreAdj
		config.OomScoreAdj = &adj
	}
}

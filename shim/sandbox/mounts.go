package sandbox

import (
	"fmt"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/storage"
)

// mountsDir holds a container's bind mount sources in its directory under
// the shared directory.
const mountsDir = "mounts"

// shareBinds binds the host source of each of the spec's bind mounts into
// the container's directory under the shared directory, read-only where
// the mount is, and returns the guest path of each by its index in
// spec.Mounts. Only what the spec names is shared: nothing else of the
// host is visible in the guest. On error the caller unmounts what was
// mounted (the container's whole directory).
func (s *Sandbox) shareBinds(spec *specs.Spec, containerID string) (map[int]string, error) {
	binds := make(map[int]string)
	for i, m := range spec.Mounts {
		if !isBind(m) {
			continue
		}
		if m.Destination == "/dev/shm" {
			binds[i] = agentproto.SandboxShm
			continue
		}
		name := strconv.Itoa(i) + strings.ReplaceAll(path.Clean(m.Destination), "/", "-")
		host := filepath.Join(s.dir, sharedDir, containerID, mountsDir, name)
		if err := storage.BindMount(m.Source, host, slices.Contains(m.Options, "rbind"), slices.Contains(m.Options, "ro")); err != nil {
			return nil, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("mount %s: %v", m.Destination, err))
		}
		binds[i] = path.Join(agentproto.SharedMountPoint, containerID, mountsDir, name)
	}
	return binds, nil
}

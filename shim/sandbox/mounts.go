package sandbox

import (
	"context"
	"errors"
	"fmt"
	"path"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/storage"
)

// mountsDir holds a container's bind mount sources in its directory under
// the share.
const mountsDir = "mounts"

// containerMounts is where a container's mounts are made, relative to the
// sandbox directory: in the host-only tree, which the guest sees read-only
// under agentproto.SharedMountPoint/<id>.
func containerMounts(containerID string) string {
	return path.Join(storage.ShareMounts, containerID)
}

// shareBinds binds the host source of each of the spec's bind mounts into
// the container's directory in the share, read-only (recursively with
// "rro") where the mount is, and returns the guest path of each by its
// index in spec.Mounts. Only what the spec names is shared: nothing else
// of the host is visible in the guest. On error the caller unmounts what
// was mounted (the container's whole directory).
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
		rel := path.Join(containerMounts(containerID), mountsDir, name)
		if err := s.recordMount(rel); err != nil {
			return nil, err
		}
		ro := storage.Writable
		switch {
		case slices.Contains(m.Options, "rro"):
			ro = storage.RecursiveReadOnly
		case slices.Contains(m.Options, "ro"):
			ro = storage.ReadOnly
		}
		if err := storage.BindMount(m.Source, s.dir, rel, slices.Contains(m.Options, "rbind"), ro); err != nil {
			return nil, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("mount %s: %v", m.Destination, err))
		}
		binds[i] = path.Join(agentproto.SharedMountPoint, containerID, mountsDir, name)
	}
	return binds, nil
}

// recordMount adds a mount to the state file before it is made, so that a
// crash leaves nothing mounted that `shim delete` does not know of.
func (s *Sandbox) recordMount(rel string) error {
	s.stateMu.Lock()
	defer s.stateMu.Unlock()
	if slices.Contains(s.state.Mounts, rel) {
		return nil
	}
	s.state.Mounts = append(s.state.Mounts, rel)
	return writeState(s.dir, s.state)
}

// unmountRecorded undoes the recorded mounts at or below prefix ("" for
// all), newest first, and drops them from the state file. Only recorded
// mounts are touched, each by a path resolved below the sandbox directory
// without following symlinks.
func (s *Sandbox) unmountRecorded(ctx context.Context, prefix string, lazy bool) error {
	s.stateMu.Lock()
	defer s.stateMu.Unlock()
	left, err := unmountRecorded(ctx, s.dir, s.state.Mounts, prefix, lazy)
	// All of them gone: the directory goes next, and a crashed shim's
	// cleanup may be removing it already.
	if slices.Equal(left, s.state.Mounts) || (prefix == "" && err == nil) {
		return err
	}
	s.state.Mounts = left
	if werr := writeState(s.dir, s.state); werr != nil && err == nil {
		err = werr
	}
	return err
}

// unmountRecorded unmounts those of mounts (relative to dir) at or below
// prefix, newest first, and returns what remains recorded: the others,
// and any it failed to unmount.
func unmountRecorded(ctx context.Context, dir string, mounts []string, prefix string, lazy bool) ([]string, error) {
	var errs []error
	left := slices.Clone(mounts)
	for i := len(mounts) - 1; i >= 0; i-- {
		rel := mounts[i]
		if prefix != "" && rel != prefix && !strings.HasPrefix(rel, prefix+"/") {
			continue
		}
		if err := storage.UnmountBeneath(dir, rel, lazy); err != nil {
			log.G(ctx).WithError(err).WithField("mount", rel).Warn("unmount")
			errs = append(errs, err)
			continue
		}
		left = slices.Delete(left, i, i+1)
	}
	if len(errs) > 0 {
		return left, fmt.Errorf("unmount: %w", errors.Join(errs...))
	}
	return left, nil
}

package agent

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/agentproto"
)

// sharedVolumeDir holds the guest's shared mount point of each volume
// that containers mount with a receiving propagation.
const sharedVolumeDir = "/run/colo/volumes"

// Mount propagation between a pod's containers. The shim shares each
// container's volume into the guest at a path of its own, a directory of
// the one 9p or virtio-fs mount of the share (private, as every guest
// mount the agent makes): a container's bind of it, made shared or slave
// by libcontainer ("rshared", "rslave"), is a peer or slave of nothing
// outside the container, so a mount another container makes below the
// volume cannot reach it. On the host, runc's binds of a volume are peers
// (or slaves) of its shared host mount. The agent gives the guest that
// mount: the first container mounting a volume with a receiving
// propagation binds its share path onto sharedVolumeDir/<key>, private
// then shared (a peer group of its own, so nothing propagates into the
// share's mount), and each such mount of the volume is bound from there
// instead; libcontainer then makes the container's bind a peer
// (rshared) or slave (rslave) of it. Containers without propagation keep
// binding their own share path, private as before.
type volumeShares struct {
	dir string
	// bind makes dst a shared mount point of its own showing src, and
	// unmount undoes it; mount(2) but in tests.
	bind    func(src, dst string) error
	unmount func(dst string) error

	mu   sync.Mutex
	vols map[string]*volumeShare // by key
}

// volumeShare is a volume's shared mount point in the guest.
type volumeShare struct {
	path string
	// readOnly: bound from a share path that is read-only on the host, so
	// it serves only read-only mounts of the volume.
	readOnly bool
	// users are the containers whose mounts are bound from it; the last
	// one removed unmounts it.
	users map[string]bool
}

// guestVolumes are the guest's volume mount points.
var guestVolumes = &volumeShares{dir: sharedVolumeDir, bind: bindShared, unmount: unmountDetached, vols: map[string]*volumeShare{}}

// bindShared binds src onto dst (created) recursively, private first so
// that it leaves the source's peer group, then shared: mounts made below
// it and its copies propagate among them and nowhere else.
func bindShared(src, dst string) error {
	if err := os.MkdirAll(dst, 0o700); err != nil {
		return fmt.Errorf("create volume mount point: %w", err)
	}
	if err := unix.Mount(src, dst, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind %s on %s: %w", src, dst, err)
	}
	for _, flag := range []uintptr{unix.MS_PRIVATE, unix.MS_SHARED} {
		if err := unix.Mount("", dst, "", flag, ""); err != nil {
			_ = unmountDetached(dst)
			return fmt.Errorf("set propagation of %s: %w", dst, err)
		}
	}
	return nil
}

// unmountDetached unmounts a volume's mount point and what is mounted
// below it (the containers' copies stay until they go), and removes it.
func unmountDetached(dst string) error {
	if err := unix.Unmount(dst, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount %s: %w", dst, err)
	}
	if err := os.Remove(dst); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove %s: %w", dst, err)
	}
	return nil
}

// volumeMount is a mount of a spec to bind from a volume's mount point.
type volumeMount struct {
	index int
	vol   agentproto.SharedVolume
}

// receivingPropagation: as shim/sandbox's. A mount the annotation names
// without one is left alone: with rprivate it would not receive anything
// anyway, and a spec's author cannot make a private mount take another's
// source.
var receivingPropagation = []string{"shared", "rshared", "slave", "rslave"}

// parseSharedVolumes reads the spec's shared volumes. Only bind mounts of
// the share with a receiving propagation qualify; the annotation is the
// shim's, but it comes with the spec, so each entry is checked.
func parseSharedVolumes(spec *specs.Spec) ([]volumeMount, error) {
	v, ok := spec.Annotations[agentproto.SharedVolumesAnnotation]
	if !ok {
		return nil, nil
	}
	var byIndex map[string]agentproto.SharedVolume
	if err := json.Unmarshal([]byte(v), &byIndex); err != nil {
		return nil, fmt.Errorf("annotation %s: %w: %w", agentproto.SharedVolumesAnnotation, err, errdefs.ErrInvalidArgument)
	}
	var vms []volumeMount
	for idx, vol := range byIndex {
		i, err := strconv.Atoi(idx)
		if err != nil || i < 0 || i >= len(spec.Mounts) {
			return nil, fmt.Errorf("annotation %s: no mount %q: %w", agentproto.SharedVolumesAnnotation, idx, errdefs.ErrInvalidArgument)
		}
		if b, err := hex.DecodeString(vol.Key); err != nil || len(b) == 0 || len(b) > 32 {
			return nil, fmt.Errorf("annotation %s: key %q of mount %d is not a hex hash: %w", agentproto.SharedVolumesAnnotation, vol.Key, i, errdefs.ErrInvalidArgument)
		}
		m := spec.Mounts[i]
		bind := m.Type == "bind" || slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "rbind")
		src := path.Clean(m.Source)
		if !bind || !strings.HasPrefix(src, agentproto.SharedMountPoint+"/") {
			return nil, fmt.Errorf("annotation %s: mount %d (%s) is not a bind of the share: %w", agentproto.SharedVolumesAnnotation, i, m.Destination, errdefs.ErrInvalidArgument)
		}
		if !slices.ContainsFunc(m.Options, func(o string) bool { return slices.Contains(receivingPropagation, o) }) {
			continue
		}
		vms = append(vms, volumeMount{index: i, vol: vol})
	}
	slices.SortFunc(vms, func(a, b volumeMount) int { return a.index - b.index })
	return vms, nil
}

// share rewrites the source of each of the spec's shared volume mounts to
// its volume's mount point, bound (from this mount's share path) by the
// first container to mount the volume, and records container id as a
// user. A writable mount of a volume whose mount point came from a
// read-only share path keeps its own source (and receives nothing): the
// point cannot serve writes, and it cannot be replaced under the
// containers bound from it. On error nothing is left for id.
func (s *volumeShares) share(ctx context.Context, id string, spec *specs.Spec) (retErr error) {
	vms, err := parseSharedVolumes(spec)
	if err != nil || len(vms) == 0 {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	defer func() {
		if retErr != nil {
			s.releaseLocked(ctx, id)
		}
	}()
	for _, vm := range vms {
		m := &spec.Mounts[vm.index]
		vs := s.vols[vm.vol.Key]
		if vs == nil {
			vs = &volumeShare{path: filepath.Join(s.dir, vm.vol.Key), readOnly: vm.vol.ReadOnly, users: map[string]bool{}}
			if err := s.bind(m.Source, vs.path); err != nil {
				return fmt.Errorf("share volume of mount %s: %w", m.Destination, err)
			}
			s.vols[vm.vol.Key] = vs
		}
		if vs.readOnly && !vm.vol.ReadOnly {
			log.G(ctx).WithField("container", id).WithField("mount", m.Destination).
				Warn("the volume's first mount with propagation was read-only: this writable mount receives no mounts from the pod's other containers")
			continue
		}
		vs.users[id] = true
		log.G(ctx).WithFields(log.Fields{"container": id, "mount": m.Destination, "share": m.Source, "volume": vs.path}).
			Debug("mount bound from the volume's shared mount point")
		m.Source = vs.path
	}
	return nil
}

// release drops container id from the volumes it used, unmounting those
// no container uses any more.
func (s *volumeShares) release(ctx context.Context, id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.releaseLocked(ctx, id)
}

func (s *volumeShares) releaseLocked(ctx context.Context, id string) {
	for key, vs := range s.vols {
		delete(vs.users, id)
		if len(vs.users) > 0 {
			continue
		}
		if err := s.unmount(vs.path); err != nil {
			// Kept: a later container of the volume still finds it.
			log.G(ctx).WithError(err).WithField("volume", vs.path).Warn("unmount a volume's shared mount point")
			continue
		}
		delete(s.vols, key)
	}
}

// shareVolumes points the spec's mounts with a receiving propagation at
// their volumes' shared mount points (volumeShares.share).
func shareVolumes(ctx context.Context, id string, spec *specs.Spec) error {
	return guestVolumes.share(ctx, id, spec)
}

// releaseVolumes drops a removed (or failed) container's volumes.
func releaseVolumes(ctx context.Context, id string) {
	guestVolumes.release(ctx, id)
}

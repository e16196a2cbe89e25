package sandbox

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/vfio"
)

// DisksAnnotation lists the disks a pod has in its VM, as JSON: a list of
// DiskRequest. Each is attached when the sandbox is made, mounted in the
// guest, and bound into every container of the pod that carries the
// annotation (CRI passes a pod's annotations to its containers). Unlike
// the other io.colo.* annotations, one the node does not allow
// (colocation.annotations) is an error: a pod silently without its data
// disk is worse than one that does not start.
const DisksAnnotation = "io.colo.disks"

// DiskRequest is one disk of DisksAnnotation.
type DiskRequest struct {
	// Source is an absolute host path to a block device or an image
	// file, attached as an emulated NVMe disk; or a host PCI address
	// ("0000:45:00.0") listed in devices.pci, passed through with VFIO.
	Source string `json:"source"`
	// Path is where the pod's containers see the disk's filesystem.
	Path string `json:"path"`
	// FSType is the filesystem on the disk ("ext4").
	FSType   string `json:"fstype"`
	ReadOnly bool   `json:"readonly,omitempty"`
	// resolved is Source with its symlinks resolved, as devices.disk_paths
	// allowed it: what is opened.
	resolved string
}

// podDisks are a sandbox's disks of DisksAnnotation.
type podDisks struct {
	// value is the annotation as the pod has it, which a container
	// carrying it must have too.
	value string
	disks []DiskRequest
}

// fstypePattern is a filesystem type the guest's mount(2) may know.
var fstypePattern = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]*$`)

// parsePodDisks reads and checks a pod's DisksAnnotation, before anything
// is made: every error names the disk and what is wrong with it.
func parsePodDisks(cfg config.Config, annotations map[string]string) (podDisks, error) {
	value, ok := annotations[DisksAnnotation]
	if !ok {
		return podDisks{}, nil
	}
	invalid := func(format string, args ...any) error {
		return errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("annotation %s: ", DisksAnnotation) + fmt.Sprintf(format, args...))
	}
	if !slices.Contains(cfg.Colocation.Annotations, DisksAnnotation) {
		return podDisks{}, invalid("not allowed on this node (colocation.annotations): the pod would run without its disks")
	}
	dec := json.NewDecoder(bytes.NewReader([]byte(value)))
	dec.DisallowUnknownFields()
	var disks []DiskRequest
	if err := dec.Decode(&disks); err != nil {
		return podDisks{}, invalid("want a JSON list of {\"source\", \"path\", \"fstype\", \"readonly\"}: %v", err)
	}
	if dec.More() {
		return podDisks{}, invalid("want one JSON list, found more after it")
	}
	if len(disks) > 0 && cfg.Hypervisor.Machine != "q35" {
		return podDisks{}, errdefs.ErrNotImplemented.WithMessage(fmt.Sprintf(
			"annotation %s: disks are hot-plugged, which hypervisor.machine %s cannot: use q35", DisksAnnotation, cfg.Hypervisor.Machine))
	}
	seenPath, seenSource := map[string]bool{}, map[string]bool{}
	for i, d := range disks {
		where := fmt.Sprintf("disk %d", i)
		switch {
		case d.Path == "":
			return podDisks{}, invalid("%s: no path", where)
		case !path.IsAbs(d.Path) || path.Clean(d.Path) != d.Path || d.Path == "/":
			return podDisks{}, invalid("%s: path %q: want an absolute, clean path other than /", where, clip(d.Path))
		case seenPath[d.Path]:
			return podDisks{}, invalid("%s: path %s: another disk has it", where, clip(d.Path))
		case d.FSType == "":
			return podDisks{}, invalid("%s: no fstype (the filesystem on the disk, such as ext4)", where)
		case !fstypePattern.MatchString(d.FSType):
			return podDisks{}, invalid("%s: fstype %q: want a filesystem type, such as ext4", where, clip(d.FSType))
		case d.Source == "":
			return podDisks{}, invalid("%s: no source (a host block device, image file or PCI address)", where)
		case seenSource[d.Source]:
			return podDisks{}, invalid("%s: source %s: another disk has it", where, clip(d.Source))
		}
		seenPath[d.Path], seenSource[d.Source] = true, true
		resolved, err := checkDiskSource(cfg, d.Source)
		if err != nil {
			return podDisks{}, invalid("%s: %v", where, err)
		}
		disks[i].resolved = resolved
	}
	return podDisks{value: value, disks: disks}, nil
}

// checkDiskSource checks a disk's source: a PCI address devices.pci
// allows, or an existing block device or regular file by absolute path at
// or below an entry of devices.disk_paths once its symlinks are resolved
// (a pod's author must not reach the node's own disks); it returns the
// resolved path.
func checkDiskSource(cfg config.Config, source string) (string, error) {
	if isPCIAddress(source) {
		if !slices.Contains(cfg.Devices.PCI, source) {
			return "", fmt.Errorf("source %s: PCI device not listed in devices.pci", source)
		}
		return source, nil
	}
	if !filepath.IsAbs(source) || filepath.Clean(source) != source {
		return "", fmt.Errorf("source %q: want an absolute, clean host path or a PCI address (0000:45:00.0)", clip(source))
	}
	// Resolved so that the allow-list judges the file itself. The path
	// is the pod author's and the directories the node administrator's:
	// no guest writes anywhere along it (a guest reaches the host only
	// through the share, below the sandbox directory).
	resolved, err := filepath.EvalSymlinks(source)
	if err != nil {
		return "", fmt.Errorf("source %s: %w", clip(source), err)
	}
	if !slices.ContainsFunc(cfg.Devices.DiskPaths, func(allowed string) bool {
		return resolved == allowed || strings.HasPrefix(resolved, allowed+"/")
	}) {
		return "", fmt.Errorf("source %s: not listed in devices.disk_paths (nor below an entry of it)", clip(resolved))
	}
	fi, err := os.Stat(resolved)
	if err != nil {
		return "", fmt.Errorf("source %s: %w", clip(source), err)
	}
	if !isDiskFile(fi.Mode()) {
		return "", fmt.Errorf("source %s: neither a block device nor a regular file", clip(source))
	}
	return resolved, nil
}

// isPCIAddress tells whether a disk's source is a PCI address rather
// than a path.
func isPCIAddress(source string) bool {
	return vfio.CheckAddress(source) == nil
}

// podDiskID names a pod's disk in the VM.
func podDiskID(n int) string { return "disk-" + strconv.Itoa(n) }

// attachPodDisks attaches the pod's disks and returns the storages the
// agent mounts them as, with the sandbox (CreateSandboxRequest).
func (s *Sandbox) attachPodDisks(ctx context.Context) ([]*agentproto.Storage, error) {
	var storages []*agentproto.Storage
	for i, d := range s.podDisks.disks {
		var dev hypervisor.GuestDevice
		var err error
		if isPCIAddress(d.Source) {
			dev, err = s.passthroughDisk(ctx, d.Source)
		} else {
			id := podDiskID(i)
			if err = s.openDisk(id, "", d.resolved, d.ReadOnly); err == nil {
				dev, err = s.attachDisk(ctx, id, hypervisor.DiskNVMe, d.ReadOnly)
			}
		}
		if err != nil {
			return nil, fmt.Errorf("annotation %s: disk %d (%s): %w", DisksAnnotation, i, d.Source, err)
		}
		var options []string
		if d.ReadOnly {
			options = []string{"ro"}
		}
		storages = append(storages, &agentproto.Storage{
			Driver:     agentproto.StorageNVMe,
			Source:     dev.PCIPath,
			Fstype:     d.FSType,
			Options:    options,
			MountPoint: agentproto.PodDiskPath(i),
		})
	}
	return storages, nil
}

// podDiskMounts are the binds of the pod's disks into a container that
// carries DisksAnnotation; the annotation must be the pod's, as CRI
// passes it: the disks are attached with the VM, and a container cannot
// ask for others.
func (s *Sandbox) podDiskMounts(spec *specs.Spec) ([]specs.Mount, error) {
	value, ok := spec.Annotations[DisksAnnotation]
	if !ok {
		return nil, nil
	}
	if value != s.podDisks.value {
		return nil, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf(
			"annotation %s: a container's must be its pod's (the disks are the pod's, attached with its VM): the pod has %q",
			DisksAnnotation, clip(s.podDisks.value)))
	}
	var mounts []specs.Mount
	for i, d := range s.podDisks.disks {
		if slices.ContainsFunc(spec.Mounts, func(m specs.Mount) bool { return path.Clean(m.Destination) == d.Path }) {
			return nil, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf(
				"annotation %s: disk %d: the container mounts something else at %s", DisksAnnotation, i, d.Path))
		}
		options := []string{"rbind", "rprivate"}
		if d.ReadOnly {
			options = append(options, "ro")
		}
		mounts = append(mounts, specs.Mount{Destination: d.Path, Type: "bind", Source: agentproto.PodDiskPath(i), Options: options})
	}
	return mounts, nil
}

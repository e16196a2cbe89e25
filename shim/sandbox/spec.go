package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/agentproto"
)

// ReadSpec reads the OCI spec (config.json) of a bundle.
func ReadSpec(bundle string) (*specs.Spec, error) {
	b, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("bundle %s has no config.json", bundle))
		}
		return nil, fmt.Errorf("read OCI spec: %w", err)
	}
	var s specs.Spec
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("bundle %s: config.json: %v", bundle, err))
	}
	return &s, nil
}

func invalidSpec(format string, args ...any) error {
	return errdefs.ErrInvalidArgument.WithMessage("invalid OCI spec: " + fmt.Sprintf(format, args...))
}

// ValidateSpec checks, on the host and before any VM starts, what the guest
// would otherwise reject late or what colo cannot do yet. Errors are
// errdefs.ErrInvalidArgument or, for what is valid but not supported yet,
// errdefs.ErrNotImplemented.
func ValidateSpec(s *specs.Spec) error {
	if s == nil {
		return invalidSpec("empty")
	}
	p := s.Process
	switch {
	case p == nil:
		return invalidSpec("no process")
	case len(p.Args) == 0:
		return invalidSpec("process.args is empty")
	case p.Args[0] == "":
		return invalidSpec("process.args[0] is empty")
	case p.Cwd == "":
		return invalidSpec("process.cwd is empty")
	case !path.IsAbs(p.Cwd):
		return invalidSpec("process.cwd %q is not absolute", p.Cwd)
	case s.Root == nil || s.Root.Path == "":
		return invalidSpec("no root.path")
	case s.Linux == nil:
		return invalidSpec("no linux section")
	}
	for i, m := range s.Mounts {
		if m.Destination == "" || !path.IsAbs(m.Destination) {
			return invalidSpec("mounts[%d].destination %q is not absolute", i, m.Destination)
		}
		if isBind(m) {
			return errdefs.ErrNotImplemented.WithMessage(fmt.Sprintf(
				"mount of host path %s at %s: bind mounts from the host are not supported yet", m.Source, m.Destination))
		}
	}
	return nil
}

func isBind(m specs.Mount) bool {
	return m.Type == "bind" || slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "rbind")
}

// RootfsPath is where a container's rootfs is in the guest.
func RootfsPath(containerID string) string {
	return path.Join(agentproto.SharedMountPoint, containerID, "rootfs")
}

// GuestSpec returns a copy of s for the guest: root.path points into the
// shared directory (root.readonly is kept), hooks are dropped (they name
// host binaries), and host namespace paths are removed. A network
// namespace to join (the pod's, on the host) becomes the VM's own network
// namespace; other namespaces to join become new ones.
func GuestSpec(ctx context.Context, s *specs.Spec, containerID string) (*specs.Spec, error) {
	b, err := json.Marshal(s)
	if err != nil {
		return nil, fmt.Errorf("copy OCI spec: %w", err)
	}
	var g specs.Spec
	if err := json.Unmarshal(b, &g); err != nil {
		return nil, fmt.Errorf("copy OCI spec: %w", err)
	}
	if g.Root == nil {
		g.Root = &specs.Root{}
	}
	g.Root.Path = RootfsPath(containerID)
	if g.Hooks != nil {
		log.G(ctx).WithField("hooks", g.Hooks).Debug("dropping OCI hooks: they would run in the guest")
		g.Hooks = nil
	}
	if g.Linux != nil {
		var nss []specs.LinuxNamespace
		for _, ns := range g.Linux.Namespaces {
			if ns.Path != "" {
				log.G(ctx).WithFields(log.Fields{"type": ns.Type, "path": ns.Path}).Debug("dropping host namespace path")
				if ns.Type == specs.NetworkNamespace {
					continue
				}
				ns.Path = ""
			}
			nss = append(nss, ns)
		}
		g.Linux.Namespaces = nss
	}
	return &g, nil
}

// PodAnnotation is the CRI annotation naming a container's pod sandbox;
// containers of one pod share one VM.
const PodAnnotation = "io.kubernetes.cri.sandbox-id"

// PodID is the pod a container belongs to, or "" outside a pod (ctr run).
func PodID(spec *specs.Spec) string {
	return spec.Annotations[PodAnnotation]
}

package agent

import (
	"fmt"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	"github.com/containerd/typeurl/v2"
	"github.com/opencontainers/runc/libcontainer/specconv"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/anypb"
)

// stats reads the container's cgroup as containerd's own metrics types
// (cgroup v2 in the guest, v1 where the agent runs on such a host), so the
// shim hands them to containerd unchanged, as the runc shim does.
func (c *container) stats() (*anypb.Any, error) {
	path := c.lc.Config().Cgroups.Path
	if cgroups.Mode() == cgroups.Unified {
		m, err := cgroup2.Load(path)
		if err != nil {
			return nil, fmt.Errorf("load cgroup %s: %w", path, err)
		}
		st, err := m.Stat()
		if err != nil {
			return nil, fmt.Errorf("stat cgroup %s: %w", path, err)
		}
		return typeurl.MarshalAnyToProto(st)
	}
	cg, err := cgroup1.Load(cgroup1.StaticPath(path))
	if err != nil {
		return nil, fmt.Errorf("load cgroup %s: %w", path, err)
	}
	st, err := cg.Stat(cgroup1.IgnoreNotExist)
	if err != nil {
		return nil, fmt.Errorf("stat cgroup %s: %w", path, err)
	}
	return typeurl.MarshalAnyToProto(st)
}

// update applies new resource limits to the container's cgroup, as `runc
// update` does: fields left zero keep their current value, and the device
// rules stay as they are.
func (c *container) update(r *specs.LinuxResources) error {
	config := c.lc.Config()
	cg, err := specconv.CreateCgroupConfig(&specconv.CreateOpts{
		CgroupName: c.id,
		Spec:       &specs.Spec{Linux: &specs.Linux{CgroupsPath: config.Cgroups.Path, Resources: r}},
	}, nil)
	if err != nil {
		return fmt.Errorf("convert resources: %w", err)
	}
	res := cg.Resources
	res.Devices = config.Cgroups.Resources.Devices
	res.SkipDevices = true
	config.Cgroups.Resources = res
	err = c.lc.Set(config)
	// libcontainer keeps the config it was given, and starts no process
	// (an exec) in a container whose config skips devices. runc never
	// sees it again: it does not write SkipDevices to its state.
	res.SkipDevices = false
	if err != nil {
		return fmt.Errorf("update container %s: %w", c.id, err)
	}
	return nil
}

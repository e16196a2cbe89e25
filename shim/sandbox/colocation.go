package sandbox

import (
	"fmt"
	"path"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/placement"
)

// Co-location annotations (docs/colocation.md).
const (
	// ClassAnnotation is a container's CPU class in the guest.
	ClassAnnotation = "io.colo.class"
	// VCPUsAnnotation is a pod's class per vCPU ("high,low").
	VCPUsAnnotation = "io.colo.vcpus"
	// PodWeightAnnotation is the CPU weight of a pod's host cgroup.
	PodWeightAnnotation = "io.colo.pod-weight"
	// OverheadIdleAnnotation ("true") runs a pod's hypervisor threads
	// other than its vCPUs under SCHED_IDLE.
	OverheadIdleAnnotation = "io.colo.overhead-idle"
)

// colocation is a sandbox's CPU priority set-up.
type colocation struct {
	// plan places the VM's threads on the host; no Parent without a
	// cgroupsPath in the spec.
	plan placement.Plan
	// classes are the guest's, highest first.
	classes []*agentproto.CPUClass
}

// newColocation reads the co-location set-up of a sandbox from the config
// and its first container's spec (cgroupsPath and pod annotations, where
// colocation.annotations allows them). Errors are invalid arguments that
// name what was wrong.
func newColocation(cfg config.Config, spec *specs.Spec) (colocation, error) {
	cc := cfg.Colocation
	vcpus := cfg.Hypervisor.VCPUs
	p := placement.Plan{
		ParentWeight:   cc.PodWeight,
		OverheadWeight: cc.OverheadWeight,
		OverheadIdle:   cc.OverheadIdle,
		VCPUClasses:    cc.VCPUs,
	}
	for _, c := range cc.Classes {
		p.Classes = append(p.Classes, placement.Class{Name: c.Name, Weight: c.Weight, CPUs: c.CPUs})
	}
	if len(p.VCPUClasses) == 0 && len(p.Classes) > 0 {
		for range vcpus {
			p.VCPUClasses = append(p.VCPUClasses, p.Classes[0].Name)
		}
	}
	invalid := func(format string, args ...any) error {
		return errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf(format, args...))
	}
	for key, value := range spec.Annotations {
		if !strings.HasPrefix(key, "io.colo.") || key == ClassAnnotation {
			continue
		}
		if !slices.Contains(cc.Annotations, key) {
			return colocation{}, invalid("annotation %s: not allowed (colocation.annotations: %q)", key, cc.Annotations)
		}
		switch key {
		case VCPUsAnnotation:
			p.VCPUClasses = strings.Split(value, ",")
		case PodWeightAnnotation:
			w, err := strconv.ParseUint(value, 10, 64)
			if err != nil {
				return colocation{}, invalid("annotation %s=%q: want a CPU weight (1 to 10000)", key, value)
			}
			p.ParentWeight = w
		case OverheadIdleAnnotation:
			idle, err := strconv.ParseBool(value)
			if err != nil {
				return colocation{}, invalid("annotation %s=%q: want true or false", key, value)
			}
			p.OverheadIdle = idle
		}
	}
	if spec.Linux != nil {
		// systemd-style paths (slice:prefix:name) need systemd, which
		// places nothing per thread: the VM then stays where it runs.
		if cg := spec.Linux.CgroupsPath; cg != "" && !strings.Contains(cg, ":") {
			p.Parent = path.Join("/", cg)
		}
	}
	if err := p.Validate(vcpus); err != nil {
		return colocation{}, invalid("co-location: %v", err)
	}
	c := colocation{plan: p}
	for _, cl := range cc.Classes {
		gc := &agentproto.CPUClass{Name: cl.Name, Weight: cl.GuestWeight, OomScoreAdj: int32(cl.OOMScoreAdj)}
		if gc.Weight == 0 {
			gc.Weight = cl.Weight
		}
		for i, name := range p.VCPUClasses {
			if name == cl.Name {
				gc.Cpus = append(gc.Cpus, uint32(i))
			}
		}
		if len(gc.Cpus) > 0 {
			c.classes = append(c.classes, gc)
		}
	}
	return c, nil
}

// class is the guest class a container's spec asks for (ClassAnnotation),
// or nil for none.
func (c colocation) class(spec *specs.Spec) (*agentproto.CPUClass, error) {
	name, ok := spec.Annotations[ClassAnnotation]
	if !ok {
		return nil, nil
	}
	for _, gc := range c.classes {
		if gc.GetName() == name {
			return gc, nil
		}
	}
	var have []string
	for _, gc := range c.classes {
		have = append(have, gc.GetName())
	}
	return nil, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf(
		"annotation %s=%q: no such class with vCPUs in this sandbox (classes with vCPUs: %q; colocation.vcpus, %s)", ClassAnnotation, name, have, VCPUsAnnotation))
}

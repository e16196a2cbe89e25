package sandbox

import (
	"context"
	"fmt"
	"maps"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
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
	// allowClass is whether colocation.annotations lets containers pick
	// their class (ClassAnnotation).
	allowClass bool
	// vcpuList is the class of each vCPU as configured (colocation.vcpus
	// or the pod's annotation); empty for every vCPU in the first class.
	vcpuList []string
	// classDefs are the configured classes, for the guest's.
	classDefs []config.Class
	// classIgnored logs that a container's class annotation is ignored:
	// once per sandbox, as every container of a pod may carry it and
	// each is looked at more than once on its way into the guest.
	classIgnored func(value string)
}

// coloAnnotationPrefix marks the annotations that are colo's to read.
const coloAnnotationPrefix = "io.colo."

// checkAnnotations fails on an io.colo.* annotation colo does not know:
// taken for a setting, a typo would otherwise leave the container at
// priorities its author never meant.
func checkAnnotations(spec *specs.Spec) error {
	known := config.ColocationAnnotations()
	for _, key := range slices.Sorted(maps.Keys(spec.Annotations)) {
		if strings.HasPrefix(key, coloAnnotationPrefix) && !slices.Contains(known, key) {
			return errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf(
				"annotation %s: colo knows no such annotation (it knows %s)", clip(key), strings.Join(known, ", ")))
		}
	}
	return nil
}

// annotationIgnored logs an annotation that colocation.annotations does
// not allow. It is not an error: the annotation is the pod author's, the
// allow-list the node's, and a pod moved to a node that does not allow
// it still runs, at the node's priorities.
func annotationIgnored(l *log.Entry, key, value string) {
	l.WithFields(log.Fields{"annotation": key, "value": clip(value)}).Warnf(
		"annotation %s ignored: the node's colo config does not allow it (add it to colocation.annotations)", key)
}

// newColocation reads the co-location set-up of a sandbox of vcpus vCPUs
// from the config and its first container's spec (cgroupsPath and pod
// annotations, where colocation.annotations allows them). Errors are
// invalid arguments that name what was wrong.
func newColocation(ctx context.Context, cfg config.Config, spec *specs.Spec, vcpus int) (colocation, error) {
	cc := cfg.Colocation
	p := placement.Plan{
		ParentWeight:   cc.PodWeight,
		OverheadWeight: cc.OverheadWeight,
		OverheadIdle:   cc.OverheadIdle,
	}
	for _, c := range cc.Classes {
		p.Classes = append(p.Classes, placement.Class{Name: c.Name, Weight: c.Weight, CPUs: c.CPUs})
	}
	vcpuList := cc.VCPUs
	invalid := func(format string, args ...any) error {
		return errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf(format, args...))
	}
	if err := checkAnnotations(spec); err != nil {
		return colocation{}, err
	}
	l := log.G(context.WithoutCancel(ctx))
	for _, key := range slices.Sorted(maps.Keys(spec.Annotations)) {
		value := spec.Annotations[key]
		// The class is a container's, checked at each container's
		// create (class); the disks are the sandbox's (parsePodDisks).
		if !strings.HasPrefix(key, coloAnnotationPrefix) || key == ClassAnnotation || key == DisksAnnotation {
			continue
		}
		if !slices.Contains(cc.Annotations, key) {
			annotationIgnored(l, key, value)
			continue
		}
		switch key {
		case VCPUsAnnotation:
			vcpuList = strings.Split(value, ",")
		case PodWeightAnnotation:
			w, err := strconv.ParseUint(value, 10, 64)
			if err != nil {
				return colocation{}, invalid("annotation %s=%q: want a CPU weight (1 to 10000)", key, clip(value))
			}
			p.ParentWeight = w
		case OverheadIdleAnnotation:
			idle, err := strconv.ParseBool(value)
			if err != nil {
				return colocation{}, invalid("annotation %s=%q: want true or false", key, clip(value))
			}
			p.OverheadIdle = idle
		}
	}
	if spec.Linux != nil {
		switch cg := spec.Linux.CgroupsPath; {
		case strings.Contains(cg, ":"):
			// systemd's cgroup driver (kubeadm's default) names a
			// scope to make in the pod's slice, as runc would.
			scope, parent, err := placement.SystemdScope(cg)
			if err != nil {
				return colocation{}, invalid("co-location: %v", err)
			}
			p.Parent, p.Scope = parent, &scope
		case cg != "":
			p.Parent = path.Join("/", cg)
		}
	}
	var once sync.Once
	c := colocation{
		plan:       p,
		vcpuList:   vcpuList,
		classDefs:  cc.Classes,
		allowClass: slices.Contains(cc.Annotations, ClassAnnotation),
		classIgnored: func(value string) {
			once.Do(func() { annotationIgnored(l, ClassAnnotation, value) })
		},
	}
	c, err := c.withVCPUs(vcpus)
	if err != nil {
		return colocation{}, invalid("co-location: %v", err)
	}
	return c, nil
}

// withVCPUs is the set-up for a VM of n vCPUs: each vCPU's class comes
// from vcpuList, and vCPUs beyond it, which a pod's size or a resize
// adds, take the last class listed (without a list, the first class),
// and a VM of fewer vCPUs than listed has the first n: a pod's vCPUs keep
// their classes as it grows and shrinks.
func (c colocation) withVCPUs(n int) (colocation, error) {
	p := c.plan
	p.VCPUClasses = nil
	if len(p.Classes) > 0 {
		list := c.vcpuList
		if len(list) == 0 {
			list = []string{p.Classes[0].Name}
		}
		for i := range n {
			p.VCPUClasses = append(p.VCPUClasses, list[min(i, len(list)-1)])
		}
	}
	if err := p.Validate(n); err != nil {
		return c, err
	}
	c.plan = p
	c.classes = nil
	for _, cl := range c.classDefs {
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
// or nil for none, and for one colocation.annotations does not allow.
func (c colocation) class(spec *specs.Spec) (*agentproto.CPUClass, error) {
	name, ok := spec.Annotations[ClassAnnotation]
	if !ok {
		return nil, nil
	}
	if !c.allowClass {
		if c.classIgnored != nil {
			c.classIgnored(name)
		}
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
		"annotation %s=%q: no such class with vCPUs in this sandbox (classes with vCPUs: %q; colocation.vcpus, %s)", ClassAnnotation, clip(name), have, VCPUsAnnotation))
}

package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/agentproto"
)

// Topology is the JSON of agentproto.TopologyFile: which vCPUs each CPU
// priority class has, for the workloads in the guest (a batch framework
// that places its latency-sensitive tasks on the fast vCPUs).
type Topology struct {
	// Classes, from the highest priority to the lowest.
	Classes []TopologyClass `json:"classes"`
	// CPUs maps each vCPU to its class.
	CPUs []TopologyCPU `json:"cpus"`
}

// TopologyClass is one class in the topology file.
type TopologyClass struct {
	Name        string   `json:"name"`
	CPUs        []uint32 `json:"cpus"`
	Weight      uint64   `json:"weight"`
	OOMScoreAdj int32    `json:"oom_score_adj"`
}

// TopologyCPU is one vCPU in the topology file.
type TopologyCPU struct {
	CPU   uint32 `json:"cpu"`
	Class string `json:"class"`
}

// validateClasses checks a sandbox's classes: a name that is a single
// path element, a weight of 1 to 10000, at least one CPU each, no name or
// CPU twice and, when nbCPUs is not 0, every CPU below nbCPUs.
func validateClasses(classes []*agentproto.CPUClass, nbCPUs uint32) error {
	names := make(map[string]bool)
	byCPU := make(map[uint32]string)
	for _, c := range classes {
		if c.GetName() == "" || strings.ContainsAny(c.GetName(), "/.") || len(c.GetCpus()) == 0 {
			return fmt.Errorf("class %q with CPUs %v: want a name and at least one CPU: %w", c.GetName(), c.GetCpus(), errdefs.ErrInvalidArgument)
		}
		if names[c.GetName()] {
			return fmt.Errorf("class %s given twice: %w", c.GetName(), errdefs.ErrInvalidArgument)
		}
		names[c.GetName()] = true
		if w := c.GetWeight(); w < 1 || w > 10000 {
			return fmt.Errorf("class %s: weight %d: want 1 to 10000: %w", c.GetName(), w, errdefs.ErrInvalidArgument)
		}
		for _, cpu := range c.GetCpus() {
			if other, ok := byCPU[cpu]; ok {
				return fmt.Errorf("CPU %d in classes %s and %s: %w", cpu, other, c.GetName(), errdefs.ErrInvalidArgument)
			}
			if nbCPUs > 0 && cpu >= nbCPUs {
				return fmt.Errorf("class %s: CPU %d: the guest is to have CPUs 0-%d: %w", c.GetName(), cpu, nbCPUs-1, errdefs.ErrInvalidArgument)
			}
			byCPU[cpu] = c.GetName()
		}
	}
	return nil
}

// setupClasses makes a guest cgroup per class (its vCPUs as cpuset, its
// weight) and writes the topology file. CreateSandbox calls it with the
// sandbox's classes, and OnlineCPUMem with the classes of a new vCPU set:
// the cgroups of classes kept are rewritten in place (their containers
// stay in them), and a class of the previous set that is left out is
// refused while its cgroup has processes, and removed otherwise. The
// caller holds s.mu.
func (s *Service) setupClasses(ctx context.Context, classes []*agentproto.CPUClass) error {
	if len(classes) == 0 {
		return nil
	}
	if err := validateClasses(classes, 0); err != nil {
		return err
	}
	dropped, err := s.droppedClasses(classes)
	if err != nil {
		return err
	}
	if err := s.writeClassCgroups(classes, nil); err != nil {
		return err
	}
	var topo Topology
	for _, c := range classes {
		topo.Classes = append(topo.Classes, TopologyClass{Name: c.GetName(), CPUs: c.GetCpus(), Weight: c.GetWeight(), OOMScoreAdj: c.GetOomScoreAdj()})
		for _, cpu := range c.GetCpus() {
			topo.CPUs = append(topo.CPUs, TopologyCPU{CPU: cpu, Class: c.GetName()})
		}
	}
	slices.SortFunc(topo.CPUs, func(a, b TopologyCPU) int { return int(a.CPU) - int(b.CPU) })
	b, err := json.MarshalIndent(topo, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(s.topologyFile), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(s.topologyFile, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("topology file: %w", err)
	}
	for _, name := range dropped {
		removeCgroup(ctx, filepath.Join(s.cgroupRoot, agentproto.ClassCgroup(name)))
	}
	s.classes = classes
	log.G(ctx).WithField("classes", len(classes)).Debug("CPU classes set up")
	return nil
}

// writeClassCgroups makes the classes' cgroups and writes their weights
// and cpusets. With keep, a class's cpuset is only its CPUs that keep
// accepts, and a class with none is left as it is (an empty cpuset.cpus
// would mean all of the parent's CPUs): OnlineCPUMem uses this to narrow
// the cpusets to the CPUs that stay online before the others go offline.
func (s *Service) writeClassCgroups(classes []*agentproto.CPUClass, keep func(cpu uint32) bool) error {
	root := filepath.Join(s.cgroupRoot, agentproto.ClassCgroup(""))
	if err := os.MkdirAll(root, 0o755); err != nil {
		return fmt.Errorf("class cgroups: %w", err)
	}
	if err := os.WriteFile(filepath.Join(root, "cgroup.subtree_control"), []byte("+cpu +cpuset"), 0); err != nil {
		return fmt.Errorf("class cgroups: enable cpu and cpuset in %s: %w", root, err)
	}
	for _, c := range classes {
		var cpus []string
		for _, cpu := range c.GetCpus() {
			if keep == nil || keep(cpu) {
				cpus = append(cpus, strconv.Itoa(int(cpu)))
			}
		}
		if len(cpus) == 0 {
			continue
		}
		dir := filepath.Join(s.cgroupRoot, agentproto.ClassCgroup(c.GetName()))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("class %s: %w", c.GetName(), err)
		}
		for _, f := range [][2]string{{"cpuset.cpus", strings.Join(cpus, ",")}, {"cpu.weight", strconv.FormatUint(c.GetWeight(), 10)}} {
			if err := os.WriteFile(filepath.Join(dir, f[0]), []byte(f[1]), 0); err != nil {
				return fmt.Errorf("class %s: %s = %s: %w", c.GetName(), f[0], f[1], err)
			}
		}
	}
	return nil
}

// droppedClasses lists the sandbox's classes (s.classes) that classes
// leaves out. One whose cgroup still has processes (cgroup.events says
// "populated 1") is refused: its containers would be left on CPUs no
// class has. The caller holds s.mu.
func (s *Service) droppedClasses(classes []*agentproto.CPUClass) ([]string, error) {
	var dropped []string
	for _, old := range s.classes {
		if slices.ContainsFunc(classes, func(c *agentproto.CPUClass) bool { return c.GetName() == old.GetName() }) {
			continue
		}
		b, err := os.ReadFile(filepath.Join(s.cgroupRoot, agentproto.ClassCgroup(old.GetName()), "cgroup.events"))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("class %s: %w", old.GetName(), err)
		}
		if slices.Contains(strings.Split(string(b), "\n"), "populated 1") {
			return nil, fmt.Errorf("class %s is left out of the new classes but still has processes: %w", old.GetName(), errdefs.ErrFailedPrecondition)
		}
		dropped = append(dropped, old.GetName())
	}
	return dropped, nil
}

// removeCgroup removes a cgroup without processes and the cgroups below
// it, deepest first (a cgroup directory goes with rmdir, its files with
// it). What cannot be removed is only logged: without processes it does
// no harm.
func removeCgroup(ctx context.Context, dir string) {
	var dirs []string
	_ = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, path)
		}
		return nil
	})
	for _, d := range slices.Backward(dirs) {
		if err := unix.Rmdir(d); err != nil && !errors.Is(err, unix.ENOENT) {
			log.G(ctx).WithError(err).WithField("cgroup", d).Warn("remove the cgroup of a class left out")
			return
		}
	}
}

// pinIRQs points the interrupts of a network interface's device at the
// highest class's vCPUs, so that the network of latency-sensitive work is
// not served by busy low-priority vCPUs. Interfaces without a device (a
// veth in tests), or sandboxes without classes, are left alone.
func (s *Service) pinIRQs(ctx context.Context, ifname string) error {
	s.mu.Lock()
	classes := s.classes
	s.mu.Unlock()
	if len(classes) == 0 {
		return nil
	}
	var cpus []string
	for _, c := range classes[0].GetCpus() {
		cpus = append(cpus, strconv.Itoa(int(c)))
	}
	list := strings.Join(cpus, ",")
	irqs, err := pinNICIRQs(s.sysRoot, "/proc", ifname, list)
	if len(irqs) > 0 {
		log.G(ctx).WithFields(log.Fields{"interface": ifname, "irqs": irqs, "cpus": list}).Debug("interrupts pinned")
	}
	return err
}

// pinNICIRQs writes cpus as the affinity (procRoot/irq/N/smp_affinity_list)
// of every interrupt of the interface's device (nicIRQs), and returns them.
func pinNICIRQs(sysRoot, procRoot, ifname, cpus string) ([]int, error) {
	irqs, err := nicIRQs(sysRoot, procRoot, ifname)
	if err != nil {
		return nil, fmt.Errorf("interrupts of %s: %w", ifname, err)
	}
	var errs []error
	for _, irq := range irqs {
		f := filepath.Join(procRoot, "irq", strconv.Itoa(irq), "smp_affinity_list")
		if err := os.WriteFile(f, []byte(cpus), 0); err != nil {
			errs = append(errs, fmt.Errorf("IRQ %d of %s: %w", irq, ifname, err))
		}
	}
	return irqs, errors.Join(errs...)
}

// nicIRQs lists the interrupts of a network interface's device. A virtio
// NIC's are found by the virtio device's name in procRoot/interrupts
// ("virtio2-config", "virtio2-input.0", ...: its PCI function's vectors on
// q35, its own line on virtio-mmio). A NIC that is a PCI function of its
// own (an emulated e1000e, a passed-through VF or ENI) has its MSI and
// MSI-X vectors in the device's msi_irqs directory, and otherwise its
// legacy INTx line in irq (0: none). An interface without a device has
// none.
func nicIRQs(sysRoot, procRoot, ifname string) ([]int, error) {
	dev := filepath.Join(sysRoot, "class/net", ifname, "device")
	target, err := os.Readlink(dev)
	if err != nil {
		return nil, nil // not a device
	}
	if name := filepath.Base(target); strings.HasPrefix(name, "virtio") {
		return deviceIRQs(filepath.Join(procRoot, "interrupts"), name+"-")
	}
	entries, err := os.ReadDir(filepath.Join(dev, "msi_irqs"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	var irqs []int
	for _, e := range entries {
		if irq, err := strconv.Atoi(e.Name()); err == nil {
			irqs = append(irqs, irq)
		}
	}
	if len(irqs) > 0 {
		slices.Sort(irqs)
		return irqs, nil
	}
	b, err := os.ReadFile(filepath.Join(dev, "irq"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil // not a PCI device
	}
	if err != nil {
		return nil, err
	}
	irq, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return nil, fmt.Errorf("%s: %q: %w", filepath.Join(dev, "irq"), b, err)
	}
	if irq <= 0 {
		return nil, nil
	}
	return []int{irq}, nil
}

// deviceIRQs lists the interrupts in the interrupts file whose name starts
// with prefix ("virtio2-": its config, input and output vectors).
func deviceIRQs(interrupts, prefix string) ([]int, error) {
	f, err := os.Open(interrupts)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var irqs []int
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || !strings.HasPrefix(fields[len(fields)-1], prefix) {
			continue
		}
		if irq, err := strconv.Atoi(strings.TrimSuffix(fields[0], ":")); err == nil {
			irqs = append(irqs, irq)
		}
	}
	return irqs, sc.Err()
}

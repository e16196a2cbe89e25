package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

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

// setupClasses makes a guest cgroup per class (its vCPUs as cpuset, its
// weight) and writes the topology file.
func (s *Service) setupClasses(ctx context.Context, classes []*agentproto.CPUClass) error {
	if len(classes) == 0 {
		return nil
	}
	root := filepath.Join(s.cgroupRoot, agentproto.ClassCgroup(""))
	if err := os.MkdirAll(root, 0o755); err != nil {
		return fmt.Errorf("class cgroups: %w", err)
	}
	if err := os.WriteFile(filepath.Join(root, "cgroup.subtree_control"), []byte("+cpu +cpuset"), 0); err != nil {
		return fmt.Errorf("class cgroups: enable cpu and cpuset in %s: %w", root, err)
	}
	var topo Topology
	byCPU := make(map[uint32]string)
	for _, c := range classes {
		if c.GetName() == "" || strings.ContainsAny(c.GetName(), "/.") || len(c.GetCpus()) == 0 {
			return fmt.Errorf("class %q with CPUs %v: want a name and at least one CPU: %w", c.GetName(), c.GetCpus(), errdefs.ErrInvalidArgument)
		}
		if w := c.GetWeight(); w < 1 || w > 10000 {
			return fmt.Errorf("class %s: weight %d: want 1 to 10000: %w", c.GetName(), w, errdefs.ErrInvalidArgument)
		}
		var cpus []string
		for _, cpu := range c.GetCpus() {
			if other, ok := byCPU[cpu]; ok {
				return fmt.Errorf("CPU %d in classes %s and %s: %w", cpu, other, c.GetName(), errdefs.ErrInvalidArgument)
			}
			byCPU[cpu] = c.GetName()
			cpus = append(cpus, strconv.Itoa(int(cpu)))
		}
		dir := filepath.Join(s.cgroupRoot, agentproto.ClassCgroup(c.GetName()))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("class %s: %w", c.GetName(), err)
		}
		for file, v := range map[string]string{"cpuset.cpus": strings.Join(cpus, ","), "cpu.weight": strconv.FormatUint(c.GetWeight(), 10)} {
			if err := os.WriteFile(filepath.Join(dir, file), []byte(v), 0); err != nil {
				return fmt.Errorf("class %s: %s = %s: %w", c.GetName(), file, v, err)
			}
		}
		topo.Classes = append(topo.Classes, TopologyClass{Name: c.GetName(), CPUs: c.GetCpus(), Weight: c.GetWeight(), OOMScoreAdj: c.GetOomScoreAdj()})
	}
	for cpu, class := range byCPU {
		topo.CPUs = append(topo.CPUs, TopologyCPU{CPU: cpu, Class: class})
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
	s.classes = classes
	log.G(ctx).WithField("classes", len(classes)).Debug("CPU classes set up")
	return nil
}

// pinIRQs points the interrupts of a network interface's virtio device at
// the highest class's vCPUs, so that the network of latency-sensitive
// work is not served by busy low-priority vCPUs. Interfaces without a
// virtio device, or sandboxes without classes, are left alone.
func (s *Service) pinIRQs(ctx context.Context, ifname string) error {
	s.mu.Lock()
	classes := s.classes
	s.mu.Unlock()
	if len(classes) == 0 {
		return nil
	}
	dev, err := os.Readlink(filepath.Join("/sys/class/net", ifname, "device"))
	if err != nil {
		return nil // not a device (a veth in tests)
	}
	virtio := filepath.Base(dev) // "virtio2"
	if !strings.HasPrefix(virtio, "virtio") {
		return nil
	}
	irqs, err := deviceIRQs(virtio + "-")
	if err != nil {
		return err
	}
	var cpus []string
	for _, c := range classes[0].GetCpus() {
		cpus = append(cpus, strconv.Itoa(int(c)))
	}
	list := strings.Join(cpus, ",")
	var errs []error
	for _, irq := range irqs {
		if err := os.WriteFile(fmt.Sprintf("/proc/irq/%d/smp_affinity_list", irq), []byte(list), 0); err != nil {
			errs = append(errs, fmt.Errorf("IRQ %d of %s: %w", irq, ifname, err))
		}
	}
	log.G(ctx).WithFields(log.Fields{"interface": ifname, "irqs": irqs, "cpus": list}).Debug("interrupts pinned")
	return errors.Join(errs...)
}

// deviceIRQs lists the interrupts in /proc/interrupts whose name starts
// with prefix ("virtio2-": its config, input and output vectors).
func deviceIRQs(prefix string) ([]int, error) {
	f, err := os.Open("/proc/interrupts")
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

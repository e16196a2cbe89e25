package hypervisor

import (
	"fmt"
	"os"
	"strings"
)

// Where a host's KVM device and CPU flags are.
const (
	KVMDevice = "/dev/kvm"
	CPUInfo   = "/proc/cpuinfo"
)

// OpenKVM tells whether the KVM device opens read-write, as a VMM opens
// it.
func OpenKVM(device string) error {
	f, err := os.OpenFile(device, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	return f.Close()
}

// CheckKVM tells whether KVM can run a guest here, and if not why: the
// device opens read-write and the CPU flags in cpuinfo include hardware
// virtualization (vmx or svm). A KVM without it (a nested, paravirtual
// one) runs an ordinary guest kernel so slowly it looks hung. QEMU falls
// back to TCG then; a VMM with only KVM (Cloud Hypervisor) cannot run.
func CheckKVM(device, cpuinfo string) error {
	if err := OpenKVM(device); err != nil {
		return err
	}
	b, err := os.ReadFile(cpuinfo)
	if err != nil {
		return err
	}
	for line := range strings.Lines(string(b)) {
		key, value, ok := strings.Cut(line, ":")
		if !ok || strings.TrimSpace(key) != "flags" {
			continue
		}
		for _, f := range strings.Fields(value) {
			if f == "vmx" || f == "svm" {
				return nil
			}
		}
		return fmt.Errorf("%s opens but %s has neither vmx nor svm", device, cpuinfo)
	}
	return fmt.Errorf("%s: no flags line", cpuinfo)
}

package clh

import (
	"fmt"
	"os/exec"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
)

// Check tells whether Cloud Hypervisor can run VMs here with cfg, and if
// not what is missing: its binary (hypervisor.path, or DefaultBinary in
// PATH), or a usable KVM, which CH needs (it has no emulation to fall
// back on, unlike QEMU's TCG). New makes no driver where Check fails, and
// `colo check` reports it.
func Check(cfg config.Hypervisor) error {
	_, err := check(cfg, hypervisor.KVMDevice, hypervisor.CPUInfo)
	return err
}

// check is Check with the KVM probe's files named; it returns the binary's
// path.
func check(cfg config.Hypervisor, kvmDevice, cpuinfo string) (string, error) {
	path, err := lookBinary(cfg)
	if err != nil {
		return "", err
	}
	if err := hypervisor.CheckKVM(kvmDevice, cpuinfo); err != nil {
		return "", fmt.Errorf("clh: Cloud Hypervisor needs KVM: %w", err)
	}
	return path, nil
}

// lookBinary finds CH's binary as cfg names it.
func lookBinary(cfg config.Hypervisor) (string, error) {
	name, where := cfg.Path, fmt.Sprintf("hypervisor.path = %q", cfg.Path)
	if name == "" {
		name, where = DefaultBinary, "in PATH"
	}
	path, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("clh: the cloud-hypervisor binary (%s): %w", where, err)
	}
	return path, nil
}

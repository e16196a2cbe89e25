package qemu

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/colo-runtime/colo/hypervisor"
)

// Accelerators as QEMU names them.
const (
	accelKVM = "kvm"
	accelTCG = "tcg"
)

// ChooseAccel resolves the configured accelerator ("auto", "kvm", "tcg" or
// empty for auto) on a host whose KVM device and /proc/cpuinfo are at
// kvmDevice and cpuinfo, and tells why: the driver logs it, colo check
// prints it.
func ChooseAccel(configured, kvmDevice, cpuinfo string) (accel, reason string, err error) {
	switch configured {
	case accelTCG:
		return accelTCG, "configured", nil
	case accelKVM:
		if err := hypervisor.OpenKVM(kvmDevice); err != nil {
			return "", "", fmt.Errorf("accel kvm: %w", err)
		}
		return accelKVM, "configured", nil
	case "", "auto":
	default:
		return "", "", fmt.Errorf("accel %q: want auto, kvm or tcg", configured)
	}
	if err := hypervisor.CheckKVM(kvmDevice, cpuinfo); err != nil {
		return accelTCG, fmt.Sprintf("auto: %v", err), nil
	}
	return accelKVM, fmt.Sprintf("auto: %s opens and the CPU has hardware virtualization", kvmDevice), nil
}

// hostKHz reads the first CPU's clock from cpuinfo ("cpu MHz : 2299.998").
// On microvm the guest has no HPET or PM timer to calibrate the TSC
// against, and under TCG its calibration hangs on some boots; the kernel
// parameter tsc_early_khz skips it.
func hostKHz(cpuinfo string) (int, error) {
	b, err := os.ReadFile(cpuinfo)
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		key, value, ok := strings.Cut(line, ":")
		if !ok || strings.TrimSpace(key) != "cpu MHz" {
			continue
		}
		mhz, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
		if err != nil || mhz <= 0 {
			return 0, fmt.Errorf("%s: bad cpu MHz %q", cpuinfo, strings.TrimSpace(value))
		}
		return int(mhz*1000 + 0.5), nil
	}
	return 0, fmt.Errorf("%s: no cpu MHz line", cpuinfo)
}

package clhtest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
)

// BuildFakeCH builds the fake cloud-hypervisor binary (clh's
// testdata/fakech, which serves this package's fake API) as
// dir/cloud-hypervisor and returns its path, for tests that run the clh
// driver for real on a host without CH: the driver's own, and the shim's.
func BuildFakeCH(dir string) (string, error) {
	_, self, _, ok := runtime.Caller(0)
	if !ok {
		return "", errors.New("clhtest: where this package's source is: unknown")
	}
	src := filepath.Join(filepath.Dir(self), "..", "testdata", "fakech")
	bin := filepath.Join(dir, "cloud-hypervisor")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	cmd.Dir = src
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("clhtest: building %s: %w\n%s", src, err, out)
	}
	return bin, nil
}

// FakeKVM writes, in dir, a KVM device and a cpuinfo that clh.Check finds
// usable (the device opens read-write, the CPU has vmx), for clh.WithKVM
// where a fake CH runs on a host without KVM.
func FakeKVM(dir string) (device, cpuinfo string, err error) {
	device, cpuinfo = filepath.Join(dir, "kvm"), filepath.Join(dir, "cpuinfo")
	if err := os.WriteFile(device, nil, 0o600); err != nil {
		return "", "", err
	}
	if err := os.WriteFile(cpuinfo, []byte("processor\t: 0\nflags\t\t: fpu vmx sse\n"), 0o644); err != nil {
		return "", "", err
	}
	return device, cpuinfo, nil
}

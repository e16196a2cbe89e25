package e2e

import (
	"context"
	"fmt"
	"os"
	osexec "os/exec"
	"strings"
	"testing"
	"time"

	"github.com/colo-runtime/colo/testbed"
)

// TestEmulatedNIC stands in for a pod's ENI passed through with VFIO (no
// IOMMU here): with hypervisor.nic_model = "e1000e" the pod's interface
// is an emulated physical NIC in the guest, driven by e1000e (loaded on
// demand by its modalias), found by MAC and given the pod's address; it
// answers ping from the node's side, and its MSI-X interrupts are on the
// high class's vCPU. Both the NIC a VM boots with and the one hot-plugged
// into a template's clone, and nothing is left after removal.
func TestEmulatedNIC(t *testing.T) {
	for i, tc := range []struct {
		name     string
		template bool
	}{
		{name: "boot", template: false},
		{name: "clone", template: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pod := "colo-eni-" + tc.name
			n := newPodNet(t, fmt.Sprintf("colo-e2e-eni%d-%d", i, os.Getpid()))
			podAddr, peerAddr := fmt.Sprintf("10.77.%d.2", 20+i), fmt.Sprintf("10.77.%d.1", 20+i)
			n.addVeth("eth0", podAddr+"/24", peerAddr+"/24", 1500)
			// Cleanups run last first: the task goes, then the namespace
			// is checked, then it goes.
			t.Cleanup(func() {
				if left := n.leftovers(); len(left) > 0 {
					t.Errorf("left in the pod's network namespace: %v", left)
				}
			})
			checkNoLeaks(t, pod)
			cfg := coloConfig(t, fmt.Sprintf("[hypervisor]\nnic_model = \"e1000e\"\ntemplate = %t\n\n[colocation]\nvcpus = [\"high\", \"low\"]\n", tc.template))
			startDetached(t, testbed.Runtime, pod, []string{"--null-io", "--runtime-config-path", cfg, "--with-ns=network:" + n.path(),
				"--annotation", "io.kubernetes.cri.container-type=sandbox",
				"--annotation", "io.kubernetes.cri.sandbox-id=" + pod}, "sleep", "1000")
			exec := func(cmdline string) string {
				t.Helper()
				r := ctr(t, "task", "exec", "--exec-id", "eni", pod, "sh", "-c", cmdline)
				if r.ExitCode != 0 {
					t.Fatalf("%s: %s", cmdline, r)
				}
				return strings.TrimSpace(r.Stdout)
			}

			// (a) The NIC with the pod interface's MAC is an e1000e.
			mac := macOf(t, n.podH, "eth0")
			if got := exec("cat /sys/class/net/eth0/address"); got != mac {
				t.Errorf("guest eth0 has MAC %s, want the pod interface's %s", got, mac)
			}
			if got := exec("basename $(readlink /sys/class/net/eth0/device/driver)"); got != "e1000e" {
				t.Errorf("guest eth0 is driven by %q, want e1000e", got)
			}
			// QEMU's e1000e is an Intel 82574L (8086:10d3).
			if got := exec("cat /sys/class/net/eth0/device/vendor /sys/class/net/eth0/device/device"); got != "0x8086\n0x10d3" {
				t.Errorf("guest eth0's PCI ids %q, want 0x8086 0x10d3", got)
			}
			// (b) It has the pod's address.
			if line := exec("ip -o -4 addr show dev eth0"); !strings.Contains(line, podAddr+"/24") {
				t.Errorf("guest eth0 addresses %q lack %s/24", line, podAddr)
			}
			// (c) It answers ping from the node's side, and reaches it.
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if out, err := osexec.CommandContext(ctx, "ip", "netns", "exec", n.peer, "busybox", "ping", "-c", "1", "-W", "10", podAddr).CombinedOutput(); err != nil {
				t.Errorf("ping %s from the peer namespace: %v: %s", podAddr, err, out)
			}
			exec("ping -c 1 -W 10 " + peerAddr)
			// (d) Its interrupts, the MSI-X vectors of its PCI function,
			// are on the high class's vCPU 0.
			irqs := strings.Fields(exec(`for irq in $(ls /sys/class/net/eth0/device/msi_irqs); do echo $irq=$(cat /proc/irq/$irq/smp_affinity_list); done`))
			if len(irqs) == 0 {
				t.Error("no MSI interrupts found for eth0")
			}
			for _, l := range irqs {
				if !strings.HasSuffix(l, "=0") {
					t.Errorf("eth0 interrupt affinity %s, want vCPU 0 (the high class)", l)
				}
			}

			ctr(t, "task", "kill", "-s", "SIGKILL", pod)
			waitStopped(t, pod)
			ctr(t, "task", "rm", pod)
			ctr(t, "container", "rm", pod)
		})
	}
}

// TestEmulatedNICBadModel: a NIC model the QEMU here lacks fails the
// create, naming the setting, and leaves nothing.
func TestEmulatedNICBadModel(t *testing.T) {
	const id = "colo-eni-igb"
	checkNoLeaks(t, id)
	cfg := coloConfig(t, "[hypervisor]\nnic_model = \"igb\"\n")
	r := runColo(t, []string{"--null-io", "--runtime-config-path", cfg}, id, "true")
	if r.ExitCode == 0 || !strings.Contains(r.Stderr, `hypervisor.nic_model = "igb"`) {
		t.Errorf("a create with nic_model igb: %s", r)
	}
}

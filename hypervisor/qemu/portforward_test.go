package qemu

import (
	"slices"
	"strings"
	"testing"

	"github.com/colo-runtime/colo/hypervisor"
)

// The port-forward devices are on the command line only with
// VMConfig.PortForward, on the agent's controller or one of their own, and
// so in the template key: a clone always has its template's devices.
func TestPortForwardArgs(t *testing.T) {
	for _, ch := range []hypervisor.AgentChannel{hypervisor.ChannelSerial, hypervisor.ChannelVsock} {
		l := launch{machine: "q35", accel: accelTCG, vm: hypervisor.VMConfig{ID: "p", Dir: "/run/vm", Channel: ch, AgentPort: testAgentPort, MemoryMB: 256, VCPUs: 1}}
		without := l.args()
		if slices.ContainsFunc(without, func(a string) bool { return strings.Contains(a, PortForwardSocket) }) {
			t.Errorf("%s: port-forward channel without PortForward: %q", ch, without)
		}
		l.vm.PortForward = testForwardPort
		with := strings.Join(l.args(), " ")
		want := "virtserialport,bus=vser0.0,chardev=fwd,name=" + testForwardPort.Serial
		if ch != hypervisor.ChannelSerial {
			want = "virtserialport,bus=" + forwardBus + ".0,chardev=fwd,name=" + testForwardPort.Serial
		}
		if !strings.Contains(with, want) || !strings.Contains(with, "path=/run/vm/"+PortForwardSocket+",server=on,wait=off") {
			t.Errorf("%s: want %q and the socket in %q", ch, want, with)
		}
	}
	if len(PortForwardSocket) > len(AgentSocket) {
		t.Errorf("%s is longer than %s", PortForwardSocket, AgentSocket)
	}
}

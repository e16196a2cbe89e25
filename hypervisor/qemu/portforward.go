package qemu

import (
	"context"
	"fmt"
	"net"
	"path/filepath"

	"github.com/colo-runtime/colo/hypervisor"
)

// The port-forward channel carries CRI PortForward connections from the
// shim to the guest's loopback (shim/sandbox/portforward.go, and
// agent/portforward.go in the guest): a virtio-serial port of its own,
// never the agent's (named by the caller, PortForward.Serial), so that
// forwarded bytes never share a queue with the agent's calls. Only VMs
// with VMConfig.PortForward (pods on the pod network) have it, whatever
// their agent channel; templateKey hashes the command line, which includes
// these devices, so such VMs have templates of their own and a clone
// always has the port its template had. QEMU's end is a unix socket QEMU
// listens on in the VM directory, like the debug console's.
const (
	// PortForwardSocket is the channel's socket in VMConfig.Dir; no
	// longer than AgentSocket, so that a directory Start accepts fits it
	// too.
	PortForwardSocket = "fwd.sock"
	// forwardPortID is the port's device id, forwardChardev its
	// chardev's; forwardBus the channel's own virtio-serial controller
	// when the agent has none (vsock).
	forwardPortID  = "fwdport"
	forwardChardev = "fwd"
	forwardBus     = "vserfwd"
)

// portForwardArgs are the channel's devices on QEMU's command line, after
// the agent channel's. server=on: QEMU makes the socket (removing a stale
// one) and removes it when it quits; wait=off: the guest runs without a
// client, and the shim connects only when a first forwarded connection
// comes.
func (l launch) portForwardArgs(dev func(string) string) []string {
	if l.vm.PortForward.IsZero() {
		return nil
	}
	var a []string
	bus := "vser0.0"
	if l.vm.Channel != hypervisor.ChannelSerial {
		a = append(a, "-device", dev("virtio-serial")+",id="+forwardBus)
		bus = forwardBus + ".0"
	}
	return append(a,
		"-chardev", fmt.Sprintf("socket,id=%s,path=%s,server=on,wait=off", forwardChardev, escape(filepath.Join(l.vm.Dir, PortForwardSocket))),
		"-device", fmt.Sprintf("virtserialport,bus=%s,chardev=%s,name=%s,id=%s", bus, forwardChardev, escape(l.vm.PortForward.Serial), forwardPortID),
	)
}

// DialPortForward connects to the guest's port-forward channel: a byte
// stream to and from the agent's multiplexer. QEMU's socket takes one
// client at a time (a second one waits unread in its backlog): the shim
// keeps a single connection and multiplexes on it.
func (vm *VM) DialPortForward(ctx context.Context) (net.Conn, error) {
	select {
	case <-vm.done:
		return nil, fmt.Errorf("qemu: vm %s: dial port-forward channel: %s", vm.id, vm.describeExit())
	default:
	}
	conn, err := (&net.Dialer{}).DialContext(ctx, "unix", filepath.Join(vm.dir, PortForwardSocket))
	if err != nil {
		return nil, fmt.Errorf("qemu: vm %s: dial port-forward channel: %w", vm.id, err)
	}
	return conn, nil
}

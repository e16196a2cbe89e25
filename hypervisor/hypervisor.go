// Package hypervisor is the one interface the rest of colo uses to run a VM.
// Drivers (qemu, and later clh) live in sub-packages; package driver picks
// one from the configuration. Nothing here knows about containers.
package hypervisor

import (
	"context"
	"net"
)

// ShareKind is how a host directory is exported to the guest.
type ShareKind string

const (
	// Share9P exports a host directory with QEMU's built-in 9p server.
	Share9P ShareKind = "9p"
	// ShareVirtioFS connects the guest to a running virtiofsd.
	ShareVirtioFS ShareKind = "virtio-fs"
)

// Share is a filesystem the guest mounts by Tag.
type Share struct {
	Tag  string
	Kind ShareKind
	// Path is the host directory for Share9P and the vhost-user socket of
	// virtiofsd for ShareVirtioFS.
	Path     string
	ReadOnly bool
}

// AgentChannel is the transport of the agent's ttrpc service.
type AgentChannel string

const (
	ChannelVsock  AgentChannel = "vsock"
	ChannelSerial AgentChannel = "serial"
)

// VMConfig describes one VM to start.
type VMConfig struct {
	// ID names the VM in process lists and logs.
	ID string
	// Dir is a private, existing directory for the driver's sockets, pid
	// file and logs. Keep it short: unix socket paths are limited to 107
	// bytes.
	Dir      string
	VCPUs    int
	MemoryMB int
	Kernel   string
	Initrd   string
	// KernelParams are appended to the driver's own kernel command line.
	KernelParams []string
	Shares       []Share
	Channel      AgentChannel
}

// VM is a running virtual machine.
type VM interface {
	// Pid is the hypervisor process.
	Pid() int
	// DialAgent opens a connection to the agent's channel. The guest may
	// not be listening yet: the caller retries its first request.
	DialAgent(ctx context.Context) (net.Conn, error)
	// Stop shuts the VM down, gracefully first and by SIGKILL after the
	// context's deadline, and returns once the process has exited.
	Stop(ctx context.Context) error
	// Done is closed when the hypervisor process has exited.
	Done() <-chan struct{}
	// Err tells why the process exited once Done is closed.
	Err() error
}

// Driver starts VMs of one hypervisor.
type Driver interface {
	// Start launches a VM and returns once the hypervisor is running and
	// controllable; the guest may still be booting. On error nothing it
	// started is left running.
	Start(ctx context.Context, cfg VMConfig) (VM, error)
	// Cleanup kills a VM whose controller died, from what Start left in
	// dir, and removes the driver's files there. It is a no-op when
	// nothing is left.
	Cleanup(ctx context.Context, dir string) error
}

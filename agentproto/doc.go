// Package agentproto is the host-to-guest protocol between the colo shim and
// colo-agent: the ttrpc service generated from agent.proto, and the few
// constants both ends must agree on.
package agentproto

//go:generate protoc -I . -I /usr/include --go_out=paths=source_relative:. --go-ttrpc_out=paths=source_relative:. agent.proto

const (
	// ProtocolVersion is bumped on incompatible changes to the service.
	ProtocolVersion = 1

	// VsockPort is the AF_VSOCK port the agent listens on.
	VsockPort = 1024

	// SerialPortName is the name of the virtio-serial port that carries the
	// agent's ttrpc service when vsock is not available. The guest finds
	// the port by this name under /sys/class/virtio-ports.
	SerialPortName = "agent.0"

	// SharedMountPoint is where the agent mounts the sandbox's shared
	// directory (the rootfs share) in the guest; a container's rootfs is
	// SharedMountPoint/<container-id>/rootfs.
	SharedMountPoint = "/run/colo/shared"

	// SharedTag is the 9p / virtio-fs mount tag of the sandbox's shared
	// directory.
	SharedTag = "colo-shared"

	// SandboxShm is the guest tmpfs the containers of a sandbox share as
	// /dev/shm where the spec binds the pod's shm from the host (CRI): a
	// host tmpfs shared over 9p or virtio-fs would not be shared memory.
	SandboxShm = "/run/colo/shm"

	// TopologyFile is the JSON file, in the guest and in every container,
	// that says which vCPUs each CPU priority class has
	// (docs/colocation.md).
	TopologyFile = "/run/colo/topology.json"
)

// ClassCgroup is the guest cgroup of a CPU priority class; its containers'
// cgroups are below it.
func ClassCgroup(class string) string { return "/colo-classes/" + class }

// Package agentproto is the host-to-guest protocol between the colo shim and
// colo-agent: the ttrpc service generated from agent.proto, and the few
// constants both ends must agree on.
package agentproto

import (
	"strconv"
	"strings"
)

//go:generate protoc -I . -I /usr/include --go_out=paths=source_relative:. --go-ttrpc_out=paths=source_relative:. agent.proto

const (
	// ProtocolVersion is bumped on incompatible changes to the service.
	// 3: OnlineCPUMem is implemented and answers OnlineCPUMemResponse
	// (it answered Empty), and nb_cpus is the total of vCPUs to have
	// online, not a number to add.
	// 4: GetMetrics is implemented and answers typed figures
	// (GetMetricsResponse's fields replace its Prometheus text, which
	// the host must not re-publish from an untrusted guest).
	ProtocolVersion = 4

	// VsockPort is the AF_VSOCK port the agent listens on.
	VsockPort = 1024

	// SerialPortName is the name of the virtio-serial port that carries the
	// agent's ttrpc service when vsock is not available. The guest finds
	// the port by this name under /sys/class/virtio-ports.
	SerialPortName = "agent.0"

	// ConsolePortName is the name of the virtio-serial port of the debug
	// console (agent.debug_console), a port of its own: the agent serves
	// a shell on it.
	ConsolePortName = "console.0"

	// ConsoleKernelParam is on the guest's kernel command line when the
	// host gave the VM a debug console: the agent then waits for the
	// port, which may show up a little after its own. Without it the
	// agent looks once, and a guest without a console pays nothing.
	ConsoleKernelParam = "colo.debug_console=on"

	// PortForwardPortName is the name of the virtio-serial port of the
	// port-forward channel (pods on the pod network), a port of its own
	// that carries CRI PortForward connections to the guest's loopback.
	PortForwardPortName = "portforward.0"

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

	// PodNamespaceDir holds the namespaces a pod without a pause container
	// shares (CreateSandboxRequest.pod_namespaces), bind-mounted as files.
	PodNamespaceDir = "/run/colo/pod-ns"
)

// PodNamespaces are the kinds of namespace (as under /proc/PID/ns) the
// agent holds for a pod without a pause container.
var PodNamespaces = []string{"ipc", "uts", "pid"}

// PodNamespace is the file of a pod's namespace of a kind ("ipc", "uts",
// "pid"), for a spec's linux.namespaces[].path.
func PodNamespace(kind string) string { return PodNamespaceDir + "/" + kind }

// ClassCgroup is the guest cgroup of a CPU priority class; its containers'
// cgroups are below it.
func ClassCgroup(class string) string { return "/colo-classes/" + class }

// ipcSysctls are the IPC namespace's sysctls other than fs.mqueue.*.
var ipcSysctls = map[string]bool{
	"kernel.msgmax": true, "kernel.msgmnb": true, "kernel.msgmni": true, "kernel.sem": true,
	"kernel.shmall": true, "kernel.shmmax": true, "kernel.shmmni": true, "kernel.shm_rmid_forced": true,
}

// PodSysctl tells whether a pod may set the sysctl key
// (CreateSandboxRequest.pod_sysctls): one of a namespace the pod has of its
// own (network, IPC, UTS), as runc allows for a container. The others are
// the whole guest kernel's. A key with "/" or ".." could name another file
// under /proc/sys, and is refused too.
func PodSysctl(key string) bool {
	if strings.Contains(key, "/") || strings.Contains(key, "..") || strings.HasSuffix(key, ".") {
		return false
	}
	switch {
	case strings.HasPrefix(key, "net."), strings.HasPrefix(key, "fs.mqueue."):
		return true
	}
	return ipcSysctls[key] || key == "kernel.domainname"
}

// SharedVolumesAnnotation, in a guest spec, maps the index (in mounts) of
// each bind mount whose propagation receives mounts (rshared, rslave) to
// its SharedVolume. Each container's volume is shared into the guest at a
// path of its own, so a mount one container makes below its volume could
// not reach another container's: the agent binds the mounts of one volume
// from a single shared mount point in the guest instead, as runc's binds
// of one host directory are peers of its host mount.
const SharedVolumesAnnotation = "io.colo.shared-volumes"

// SharedVolume is a volume as SharedVolumesAnnotation names it.
type SharedVolume struct {
	// Key is the same for the pod's mounts of one host source; it tells
	// the guest nothing of the host's paths.
	Key string `json:"key"`
	// ReadOnly: the mount's share path is read-only on the host, so the
	// agent must not serve a writable mount of the volume from it.
	ReadOnly bool `json:"readOnly,omitempty"`
}

// Storage drivers of disks (Storage.driver): the source is the guest PCI
// path of the disk's device (for virtio-scsi, of its controller, with
// Storage.scsi_address naming the disk).
const (
	StorageVirtioBlk  = "virtio-blk"
	StorageVirtioSCSI = "virtio-scsi"
	StorageNVMe       = "nvme"
)

// Guest mount points of disks the shim attaches.
const (
	// BlockRootfsDir holds the mount points of containers' rootfs that
	// are disks of their own (a block rootfs): BlockRootfsPath.
	BlockRootfsDir = "/run/colo/block"
	// PodDisksDir holds the mount points of a pod's disks (annotation
	// io.colo.disks), which its containers bind where they asked:
	// PodDiskPath.
	PodDisksDir = "/run/colo/disks"
)

// BlockRootfsPath is where the guest mounts a container's block rootfs.
func BlockRootfsPath(containerID string) string {
	return BlockRootfsDir + "/" + containerID + "/rootfs"
}

// PodDiskPath is where the guest mounts the pod's n-th disk (from 0).
func PodDiskPath(n int) string { return PodDisksDir + "/" + strconv.Itoa(n) }

// Package agent is colo-agent, the guest side of colo.
//
// Init is the guest's PID 1: it mounts the system filesystems (proc, sys,
// devtmpfs, devpts, shm, run, tmp, cgroup2), loads the kernel modules
// listed in /etc/colo/modules, reads colo.channel and colo.log from the
// kernel command line, runs the service as its child
// ("colo-agent serve") and reaps every orphan. When the service exits the
// guest powers off.
//
// Serve runs the agentproto ttrpc service on the virtio-serial port
// agentproto.SerialPortName, on vsock port agentproto.VsockPort, or on a
// unix socket (development and tests). The service runs containers with
// runc's libcontainer: CreateContainer starts the container's init, which
// waits in "colo-agent init" until StartContainer, as runc create and
// runc start do. From the initramfs, where pivot_root is impossible,
// containers use MS_MOVE and chroot.
//
// Each process's stdio are pipes; the host pulls output with ReadStdout
// and ReadStderr, which block until there is data or the stream ends.
// The service reaps only the processes libcontainer started (they are its
// children: nsexec clones with CLONE_PARENT); it is deliberately not a
// child subreaper, so orphans of containers without their own PID
// namespace go to PID 1 rather than pile up as zombies.
//
// OnlineCPUMem brings the vCPUs and memory the host hot-plugs online, takes
// vCPUs offline before the host unplugs them, and moves the CPU classes'
// cgroups to the new vCPU set (hotplug.go says in which order).
package agent

// Package storage is the host side of the filesystems a sandbox's guest
// sees: the shared directory exported to the guest, the containers' rootfs
// mounts inside it, and the virtio-fs daemon that serves it.
//
// Everything here is plain host work (mount(2), processes); nothing knows
// about VMs or containers beyond paths.
package storage

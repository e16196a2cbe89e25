package sandbox

import (
	"context"
	"fmt"
	"maps"
	"path"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/storage"
)

// PodConfig describes a pod made through containerd's sandbox API
// (sandboxer "shim"): a VM with no container of its own, where CRI's
// podsandbox controller would run a pause container.
type PodConfig struct {
	// Bundle is the sandbox's bundle, made by containerd: the bundle file
	// goes there, so that `shim delete` of the sandbox finds what a crash
	// left.
	Bundle string
	// Hostname is the pod's: the guest's, and so its UTS namespace's.
	Hostname string
	// NetNS is the pod's network namespace (CNI's), mirrored into the
	// VM; "" for none (host network).
	NetNS string
	// CgroupParent is the pod's host cgroup (kubelet's): the VM's threads
	// go into <CgroupParent>/<id> below it, as the pause container would
	// (co-location, docs/colocation.md).
	CgroupParent string
	// Annotations are the pod's; its io.colo.* ones count as a first
	// container's do (docs/colocation.md).
	Annotations map[string]string
	// Sysctls are the pod's namespaced sysctls, applied in the pod's
	// namespaces in the guest (agentproto.PodSysctl).
	Sysctls map[string]string
	// HostNamespaces are the node's namespaces ("network", "pid", "ipc")
	// the pod asks for (hostNetwork, hostPID, hostIPC): refused, or where
	// the node allows it and the pod opts in, the guest's own
	// (hostns.go).
	HostNamespaces []string
	// Hosts and ResolvConf, if not nil, are the pod's /etc/hosts and
	// /etc/resolv.conf, which every container gets unless its spec mounts
	// its own, as CRI gives them with a pause container.
	Hosts, ResolvConf []byte
}

// podFilesName is the directory, in the share, of the files a pod's
// containers get (PodConfig). Container ids cannot begin with a dot, so it
// is no container's directory.
const podFilesName = ".pod"

// pod is what a sandbox made by CreatePod has beyond the others.
type pod struct {
	sysctls map[string]string
	// files maps a container path (/etc/hosts) to the guest path of the
	// pod's file.
	files map[string]string
	// guestNamespaces are the PID and IPC namespaces of PodConfig's
	// HostNamespaces: the guest's own.
	guestNamespaces []string
	// stopRequested tells a stop asked for (exit status 0) from a VM
	// that failed or died (VMExitStatus).
	stopRequested atomic.Bool
	exited        chan struct{}
	exitedAt      time.Time // set before exited is closed
}

// spec is the pod as a spec, for what the sandbox reads from its first
// container's otherwise: the network namespace and hostname (boot), the
// cgroup and the co-location annotations (newColocation).
func (p PodConfig) spec(id string) *specs.Spec {
	s := &specs.Spec{Hostname: p.Hostname, Linux: &specs.Linux{}, Annotations: map[string]string{}}
	for k, v := range p.Annotations {
		switch k {
		case SandboxCPUQuotaAnnotation, SandboxCPUPeriodAnnotation, SandboxMemoryAnnotation,
			SandboxNameAnnotation, SandboxNamespaceAnnotation, SandboxUIDAnnotation:
			// The pod's size (sizeFor) and name (State.Pod).
			s.Annotations[k] = v
		}
		if strings.HasPrefix(k, coloAnnotationPrefix) {
			s.Annotations[k] = v
		}
	}
	if p.NetNS != "" {
		s.Linux.Namespaces = append(s.Linux.Namespaces, specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: p.NetNS})
	}
	if p.CgroupParent != "" {
		s.Linux.CgroupsPath = podCgroupsPath(p.CgroupParent, id)
	}
	return s
}

// podCgroupsPath is the cgroups path CRI gives a pause container: below
// the pod's cgroup, or systemd's "slice:prefix:name" under a slice (a
// scope in it: newColocation).
func podCgroupsPath(parent, id string) string {
	if base := path.Base(parent); strings.HasSuffix(base, ".slice") {
		return strings.Join([]string{base, "cri-containerd", id}, ":")
	}
	return path.Join(parent, id)
}

// CreatePod makes the sandbox of a pod for containerd's sandbox API: the
// sandbox directory, record and bundle file, the share with the pod's
// files, the VM with the pod's network, and in the guest the pod's IPC,
// UTS and PID namespaces, held by the agent (agentproto.PodNamespace) in
// place of a pause container's. There is no container: they come with
// AddContainer and join those namespaces (GuestSpec). Deleting the last
// one leaves the sandbox up; Stop or Shutdown ends it. Any failure undoes
// all of it.
func CreatePod(ctx context.Context, opts Options, p PodConfig) (_ *Sandbox, retErr error) {
	for k := range p.Sysctls {
		if !agentproto.PodSysctl(k) {
			return nil, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf(
				"pod sysctl %q: not one of a namespace the pod has of its own (net.*, kernel.shm*, kernel.msg*, kernel.sem, fs.mqueue.*, kernel.domainname)", clip(k)))
		}
	}
	if err := checkHostNamespaces(opts.Config, p.Annotations, p.HostNamespaces); err != nil {
		return nil, err
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("sandbox", opts.ID))
	spec := p.spec(opts.ID)
	s, err := newSandbox(ctx, opts, spec)
	if err != nil {
		return nil, err
	}
	s.pod = &pod{sysctls: maps.Clone(p.Sysctls), files: make(map[string]string), guestNamespaces: slices.DeleteFunc(slices.Clone(p.HostNamespaces), func(ns string) bool { return ns == "network" }), exited: make(chan struct{})}
	if err := s.makeDir(ctx, p.Bundle); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			if err := s.teardown(context.WithoutCancel(ctx)); err != nil {
				log.G(ctx).WithError(err).Error("clean up after a failed create")
			}
		}
	}()
	if err := s.writePodFiles(p); err != nil {
		return nil, err
	}
	release, err := startSlot(ctx, opts.Config.Runtime.StateDir, opts.Config.Runtime.MaxParallelStarts)
	if err != nil {
		return nil, err
	}
	defer release()
	if err := s.boot(ctx, spec); err != nil {
		return nil, err
	}
	s.watch()
	go s.watchPodExit()
	stage(ctx, "pod-up", s.created, nil)
	return s, nil
}

// writePodFiles writes the pod's /etc/hostname, /etc/hosts and
// /etc/resolv.conf into the share, where the guest sees them read-only,
// before the guest can write anywhere in it.
func (s *Sandbox) writePodFiles(p PodConfig) error {
	files := map[string][]byte{}
	if p.Hostname != "" {
		files["hostname"] = []byte(p.Hostname + "\n")
	}
	if p.Hosts != nil {
		files["hosts"] = p.Hosts
	}
	if p.ResolvConf != nil {
		files["resolv.conf"] = p.ResolvConf
	}
	if len(files) == 0 {
		return nil
	}
	dir := path.Join(storage.ShareMounts, podFilesName, "etc")
	d, err := storage.MkdirAllBeneath(s.dir, dir, 0o755)
	if err != nil {
		return fmt.Errorf("pod files: %w", err)
	}
	d.Close()
	for name, content := range files {
		rel := path.Join(dir, name)
		f, err := storage.CreateBeneath(s.dir, rel, 0o644)
		if err != nil {
			return fmt.Errorf("pod file %s: %w", name, err)
		}
		f.Close()
		w, err := storage.OpenBeneath(s.dir, rel, unix.O_WRONLY)
		if err != nil {
			return fmt.Errorf("pod file %s: %w", name, err)
		}
		_, err = w.Write(content)
		if cerr := w.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("pod file %s: %w", name, err)
		}
		s.pod.files["/etc/"+name] = path.Join(agentproto.SharedMountPoint, podFilesName, "etc", name)
	}
	return nil
}

// podSysctls are the sysctls of a pod's namespaces, for the agent.
func (s *Sandbox) podSysctls() map[string]string {
	if s.pod == nil {
		return nil
	}
	return s.pod.sysctls
}

// watchPodExit records when the pod's VM ended, for Wait.
func (s *Sandbox) watchPodExit() {
	<-s.vm.Done()
	s.pod.exitedAt = time.Now()
	close(s.pod.exited)
}

// Created is when the sandbox was made.
func (s *Sandbox) Created() time.Time { return s.created }

// Running tells whether the sandbox's VM runs and it is not stopping:
// containerd's SANDBOX_READY.
func (s *Sandbox) Running() bool { return s.alive() }

// Stop ends a pod's sandbox, as StopSandbox asks: the guest is told, the
// VM stopped (gracefully until ctx's deadline or
// hypervisor.shutdown_timeout, whichever comes first, then killed) and
// everything else torn down. Its containers stay, stopped, for their
// deletes. It can be called again, and after the VM died.
func (s *Sandbox) Stop(ctx context.Context) error {
	if s.pod != nil && s.alive() {
		s.pod.stopRequested.Store(true)
	}
	err := s.Shutdown(ctx)
	s.endUnwaited()
	return err
}

// Wait blocks until a pod's VM has ended, or ctx is done, and says how: 0
// for a stop that was asked for, VMExitStatus for a VM that failed or
// died.
func (s *Sandbox) Wait(ctx context.Context) (uint32, time.Time, error) {
	if s.pod == nil {
		return 0, time.Time{}, errdefs.ErrNotImplemented.WithMessage("only a pod's sandbox can be waited for")
	}
	select {
	case <-s.pod.exited:
	case <-ctx.Done():
		return 0, time.Time{}, ctx.Err()
	}
	if s.pod.stopRequested.Load() {
		return 0, s.pod.exitedAt, nil
	}
	return VMExitStatus, s.pod.exitedAt, nil
}

// Exited is when a pod's VM ended, zero while it runs.
func (s *Sandbox) Exited() time.Time {
	if s.pod == nil {
		return time.Time{}
	}
	select {
	case <-s.pod.exited:
		return s.pod.exitedAt
	default:
		return time.Time{}
	}
}

// Ping asks the agent whether it answers, within agent.call_timeout.
func (s *Sandbox) Ping(ctx context.Context) error {
	if !s.alive() {
		return errdefs.ErrUnavailable.WithMessage(fmt.Sprintf("sandbox %s is not running", s.id))
	}
	ctx, cancel := context.WithTimeout(ctx, s.timeouts().call)
	defer cancel()
	if _, err := s.agent.Check(ctx, &agentproto.CheckRequest{}); err != nil {
		return agentError("Check", err)
	}
	return nil
}

// ContainerIDs are the ids of the sandbox's containers.
func (s *Sandbox) ContainerIDs() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	ids := make([]string, 0, len(s.containers))
	for id := range s.containers {
		ids = append(ids, id)
	}
	return ids
}

// isTorn tells whether teardown has removed everything.
func (s *Sandbox) isTorn() bool {
	s.teardownMu.Lock()
	defer s.teardownMu.Unlock()
	return s.torn
}

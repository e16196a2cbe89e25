package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/agentproto"
)

// PodNSCommand is the argument that runs colo-agent as the holder of a
// pod's namespaces (HoldPodNamespaces). PodNSEnv in its environment marks
// the real holder, as libcontainer's init pipe marks "colo-agent init", so
// that a stray argument cannot turn the guest's PID 1 into one; it carries
// the pod's sysctls as JSON.
const (
	PodNSCommand = "pod-ns"
	PodNSEnv     = "_COLO_POD_NS"
)

// podNSTimeout bounds the holder's start (its sysctls included) and its
// end once killed.
const podNSTimeout = 10 * time.Second

// podNamespaces are the IPC, UTS and PID namespaces of a pod that has no
// pause container (containerd's sandbox API), held by a process of the
// agent's: the first process of the new PID namespace, as the pause
// container's is in a pod that has one. It is not a container: no rootfs,
// no cgroup of its own, nothing for the shim to manage. Its namespaces are
// bind-mounted at agentproto.PodNamespace(kind), a path the shim's specs
// name without knowing the holder's pid.
//
// The PID namespace lives as long as the holder does (when its first
// process exits the kernel kills every process in it), so the holder
// ignores every signal it can, the kernel does not deliver SIGKILL to it
// from inside the namespace, and it reaps the orphans of the pod's
// containers, which become its children.
type podNamespaces struct {
	cmd     *exec.Cmd
	exited  chan struct{}
	closing atomic.Bool
	mounts  []string
}

// startPodNamespaces starts the holder in new IPC, UTS (a copy of the
// guest's, whose hostname is the pod's) and PID namespaces, waits until it
// has applied the pod's sysctls, and bind-mounts its namespaces.
func startPodNamespaces(ctx context.Context, sysctls map[string]string) (_ *podNamespaces, retErr error) {
	for k := range sysctls {
		if !agentproto.PodSysctl(k) {
			return nil, fmt.Errorf("pod sysctl %q: not one of a namespace the pod has of its own: %w", k, errdefs.ErrInvalidArgument)
		}
	}
	b, err := json.Marshal(sysctls)
	if err != nil {
		return nil, fmt.Errorf("encode pod sysctls: %w", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	cmd := exec.Command("/proc/self/exe", PodNSCommand)
	// What ps shows in the pod, where /pause would be.
	cmd.Args[0] = "colo-agent"
	// A small Go runtime: it only waits.
	cmd.Env = []string{PodNSEnv + "=" + string(b), "GOMAXPROCS=1"}
	cmd.Dir = "/"
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.ExtraFiles = []*os.File{w} // fd 3: "ok", or why not
	// No Pdeathsig: it follows the thread that started the holder, and
	// the Go runtime ends a thread whose goroutine exits locked to it,
	// which libcontainer does on purpose (its mount source thread, for a
	// container with bind mounts): that would kill the pod's PID
	// namespace. Should the service die, PID 1 powers the guest off.
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: unix.CLONE_NEWIPC | unix.CLONE_NEWUTS | unix.CLONE_NEWPID,
	}
	err = cmd.Start()
	w.Close()
	if err != nil {
		return nil, fmt.Errorf("start the holder of the pod's namespaces: %w", err)
	}
	p := &podNamespaces{cmd: cmd, exited: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		if !p.closing.Load() {
			// Nothing in the pod can kill it: say so loudly.
			log.G(ctx).WithError(err).Error("the holder of the pod's namespaces exited: the pod's PID namespace is gone")
		}
		close(p.exited)
	}()
	defer func() {
		if retErr != nil {
			if err := p.close(ctx); err != nil {
				log.G(ctx).WithError(err).Warn("stop the holder of a pod's namespaces after a failed start")
			}
		}
	}()

	ready := make(chan string, 1)
	go func() {
		b, _ := io.ReadAll(io.LimitReader(r, 4096))
		ready <- string(b)
	}()
	select {
	case msg := <-ready:
		if msg != "ok" {
			if msg == "" {
				msg = "exited before it was ready"
			}
			return nil, fmt.Errorf("holder of the pod's namespaces: %s", msg)
		}
	case <-time.After(podNSTimeout):
		return nil, fmt.Errorf("holder of the pod's namespaces not ready within %s: %w", podNSTimeout, errdefs.ErrUnavailable)
	}

	if err := os.MkdirAll(agentproto.PodNamespaceDir, 0o700); err != nil {
		return nil, err
	}
	for _, kind := range agentproto.PodNamespaces {
		target := agentproto.PodNamespace(kind)
		f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o400)
		if err != nil {
			return nil, err
		}
		f.Close()
		p.mounts = append(p.mounts, target)
		src := fmt.Sprintf("/proc/%d/ns/%s", cmd.Process.Pid, kind)
		if err := unix.Mount(src, target, "", unix.MS_BIND, ""); err != nil {
			return nil, fmt.Errorf("bind %s to %s: %w", src, target, err)
		}
	}
	log.G(ctx).WithField("pid", cmd.Process.Pid).Info("pod namespaces held")
	return p, nil
}

// close unmounts the namespaces and ends the holder, which ends the
// processes still in the PID namespace.
func (p *podNamespaces) close(ctx context.Context) error {
	err := unmountAll(ctx, p.mounts)
	for _, m := range p.mounts {
		if rerr := os.Remove(m); rerr != nil && !errors.Is(rerr, os.ErrNotExist) && err == nil {
			err = rerr
		}
	}
	p.mounts = nil
	p.closing.Store(true)
	_ = p.cmd.Process.Kill()
	select {
	case <-p.exited:
	case <-time.After(podNSTimeout):
		err = errors.Join(err, fmt.Errorf("holder of the pod's namespaces (pid %d) did not exit within %s of SIGKILL", p.cmd.Process.Pid, podNSTimeout))
	}
	return err
}

// HoldPodNamespaces is colo-agent as the holder of a pod's namespaces,
// started by startPodNamespaces: it applies the pod's sysctls in its new
// namespaces, says "ok" on fd 3, then reaps orphans and ignores every
// signal it can until it is killed. It never returns.
func HoldPodNamespaces() {
	// Go would exit on these; a first process of a PID namespace with no
	// handler would ignore them, and so does the holder.
	sigs := make(chan os.Signal, 64)
	signal.Notify(sigs, unix.SIGCHLD, unix.SIGTERM, unix.SIGINT, unix.SIGHUP, unix.SIGQUIT,
		unix.SIGUSR1, unix.SIGUSR2, unix.SIGPWR, unix.SIGPIPE, unix.SIGALRM)
	status := os.NewFile(3, "status")
	if err := applySysctls(os.Getenv(PodNSEnv)); err != nil {
		fmt.Fprint(status, err.Error())
		os.Exit(1)
	}
	if _, err := status.WriteString("ok"); err != nil {
		os.Exit(1)
	}
	status.Close()
	debug.FreeOSMemory()
	for sig := range sigs {
		if sig != unix.SIGCHLD {
			continue
		}
		for {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}

// applySysctls writes the sysctls, given as a JSON object, in the calling
// process's namespaces: /proc/sys acts on the namespaces of whoever writes.
func applySysctls(encoded string) error {
	var sysctls map[string]string
	if encoded != "" {
		if err := json.Unmarshal([]byte(encoded), &sysctls); err != nil {
			return fmt.Errorf("pod sysctls: %w", err)
		}
	}
	for k, v := range sysctls {
		if !agentproto.PodSysctl(k) {
			return fmt.Errorf("pod sysctl %q: not one of a namespace the pod has of its own", k)
		}
		p := "/proc/sys/" + strings.ReplaceAll(k, ".", "/")
		if err := os.WriteFile(p, []byte(v), 0); err != nil {
			return fmt.Errorf("pod sysctl %s=%s: %w", k, v, err)
		}
	}
	return nil
}

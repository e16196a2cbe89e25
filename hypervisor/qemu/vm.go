package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/mdlayher/vsock"

	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/internal/vmoutput"
)

// drainGrace bounds reading QEMU's output after it exited, in case a
// descendant inherited the pipe and keeps it open.
const drainGrace = time.Second

// errExited ends what waits on QEMU when the process is gone.
var errExited = errors.New("qemu exited")

// VM is one running QEMU process.
type VM struct {
	// console is the debug console's one client (console.go).
	console consoleClient

	id      string
	dir     string
	channel hypervisor.AgentChannel
	// agentPort is where the guest's agent listens (VMConfig.AgentPort).
	agentPort hypervisor.GuestPort
	cid       uint32
	cmd       *exec.Cmd
	logger    *log.Entry
	output    vmoutput.Output
	qmp       *QMP // set by connect before Start returns

	done     chan struct{}
	quitting atomic.Bool // Stop asked QEMU to quit

	mu       sync.Mutex
	waitErr  error
	expected bool   // the exit followed Stop
	shutdown string // reason of the last SHUTDOWN event

	stopOnce sync.Once
	stopErr  error

	// agentOpen is closed when the guest opens the agent's serial port.
	agentOpen     chan struct{}
	agentOpenOnce sync.Once

	// ports[i] is the device on hotplug port i ("" when free).
	hotplugMu sync.Mutex
	ports     []string
	vhost     bool // NICs use vhost-net
	// disks are the disks AddDisk added (disk.go), under hotplugMu.
	disks diskSet
	// unplugs are the waits for DEVICE_DELETED (unplugLocked).
	unplugs deviceWaits

	// resizeMu serializes SetVCPUs and SetMemory; resizeEvent wakes
	// their waits on QMP events.
	resizeMu    sync.Mutex
	resizeEvent chan struct{}
	size        sizing // as launched
	machine     string
	tcg         bool
	// cpuUnplugged: a vCPU was unplugged (see SetVCPUs).
	cpuUnplugged bool

	// panicked is closed on GUEST_PANICKED (panic.go); dumping holds
	// the one dump QEMU runs at a time.
	panicked     chan struct{}
	panickedOnce sync.Once
	dumping      chan struct{}
}

var _ hypervisor.VM = (*VM)(nil)

// startVM starts cmd with its output logged and kept, and a goroutine that
// waits for it.
func startVM(ctx context.Context, cmd *exec.Cmd, l launch) (*VM, error) {
	cfg := l.vm
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = outW, errW
	err = cmd.Start()
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		return nil, err
	}

	vm := &VM{
		id:        cfg.ID,
		dir:       cfg.Dir,
		channel:   cfg.Channel,
		agentPort: cfg.AgentPort,
		cid:       l.cid,
		cmd:       cmd,
		logger:    log.G(context.WithoutCancel(ctx)).WithField("vm", cfg.ID),
		done:      make(chan struct{}),
		ports:     l.ports(), // vfio.go
		agentOpen: make(chan struct{}),
		vhost:     l.vhostNet,

		resizeEvent: make(chan struct{}, 1),
		panicked:    make(chan struct{}),
		dumping:     make(chan struct{}, 1),
		size:        l.sizing(),
		machine:     l.machine,
		tcg:         l.accel != accelKVM,
	}
	var readers sync.WaitGroup
	readers.Go(func() { vm.copyLines(outR, false) })
	readers.Go(func() { vm.copyLines(errR, true) })
	go func() {
		err := cmd.Wait()
		deadline := time.Now().Add(drainGrace)
		outR.SetReadDeadline(deadline)
		errR.SetReadDeadline(deadline)
		readers.Wait()
		outR.Close()
		errR.Close()

		vm.mu.Lock()
		vm.waitErr = err
		vm.expected = vm.quitting.Load()
		vm.mu.Unlock()
		if vm.expected {
			vm.logger.Debugf("qemu: exited: %v", describeWait(err))
		} else {
			vm.logger.Warnf("qemu: exited unexpectedly: %v", describeWait(err))
		}
		close(vm.done)
	}()
	return vm, nil
}

// copyLines logs QEMU's stdout (the guest console) at debug level and its
// stderr (QEMU's own messages) as warnings, and keeps the last lines.
func (vm *VM) copyLines(r io.Reader, stderr bool) {
	src := "console"
	if stderr {
		src = "qemu"
	}
	vm.output.Copy(r, func(line string, held int) {
		entry := vm.logger.WithField("src", src)
		if held > 0 {
			entry = entry.WithField("held_back", held)
		}
		if stderr {
			entry.Warn(line)
		} else {
			entry.Debug(line)
		}
	})
}

// connect waits for QMP's greeting and a first answer to query-status.
func (vm *VM) connect(ctx context.Context, path string) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	go func() {
		select {
		case <-vm.done:
			cancel(errExited)
		case <-ctx.Done():
		}
	}()

	conn, err := (&net.Dialer{}).DialContext(ctx, "unix", path)
	if err != nil {
		return fmt.Errorf("qmp: %w", err)
	}
	q, err := NewQMP(ctx, conn, vm.event)
	if err != nil {
		return err
	}
	st, err := q.QueryStatus(ctx)
	if err != nil {
		q.Close()
		return err
	}
	vm.logger.WithField("status", st.Status).Debug("qemu: qmp connected")
	vm.qmp = q
	go func() {
		<-vm.done
		q.Close()
	}()
	return nil
}

func (vm *VM) event(e Event) {
	vm.logger.WithField("data", string(e.Data)).Debugf("qemu: event %s", e.Name)
	vm.notifyResize(e.Name)
	if e.Name == "DEVICE_DELETED" {
		vm.unplugs.deleted(e.Data)
	}
	if e.Name == "GUEST_PANICKED" {
		vm.guestPanicked(e.Data)
	}
	if e.Name == "VSERPORT_CHANGE" {
		var data struct {
			ID   string `json:"id"`
			Open bool   `json:"open"`
		}
		if json.Unmarshal(e.Data, &data) == nil && data.ID == agentPortID && data.Open {
			vm.agentOpenOnce.Do(func() { close(vm.agentOpen) })
		}
	}
	if e.Name == "SHUTDOWN" {
		var data struct {
			Reason string `json:"reason"`
		}
		json.Unmarshal(e.Data, &data)
		vm.mu.Lock()
		vm.shutdown = data.Reason
		vm.mu.Unlock()
	}
}

// Pid is QEMU's process id.
func (vm *VM) Pid() int { return vm.cmd.Process.Pid }

// DialAgent connects to the agent's channel: the serial port's socket or
// the guest's vsock port. Over serial the connection succeeds while the
// guest is still booting; QEMU serves one connection at a time.
func (vm *VM) DialAgent(ctx context.Context) (net.Conn, error) {
	select {
	case <-vm.done:
		return nil, fmt.Errorf("qemu: vm %s: dial agent: %s", vm.id, vm.describeExit())
	default:
	}
	var (
		conn net.Conn
		err  error
	)
	switch vm.channel {
	case hypervisor.ChannelVsock:
		conn, err = vsock.DialContext(ctx, vm.cid, vm.agentPort.Vsock, nil)
	default:
		conn, err = (&net.Dialer{}).DialContext(ctx, "unix", filepath.Join(vm.dir, AgentSocket))
	}
	if err != nil {
		return nil, fmt.Errorf("qemu: vm %s: dial agent over %s: %w", vm.id, vm.channel, err)
	}
	return conn, nil
}

// AddNIC hot-plugs a NIC of nic.Model (virtio-net or an emulated
// physical NIC) on the TAP nic.TAP into a free PCIe root port: QMP getfd
// hands QEMU the TAP, netdev_add and device_add make the backend and the
// device. A failure undoes what was done.
func (vm *VM) AddNIC(ctx context.Context, nic hypervisor.NIC) (retErr error) {
	if err := checkNIC(nic, vm.machine); err != nil {
		return fmt.Errorf("qemu: vm %s: %w", vm.id, err)
	}
	vm.hotplugMu.Lock()
	defer vm.hotplugMu.Unlock()
	if !slices.Contains(vm.ports, "") {
		return fmt.Errorf("qemu: vm %s: nic %s: no free hotplug port (hypervisor.hotplug_ports = %d on q35; microvm has none)", vm.id, nic.ID, len(vm.ports))
	}
	fdName := "fd-" + nic.ID
	if _, err := vm.qmp.ExecuteWithFile(ctx, "getfd", map[string]any{"fdname": fdName}, nic.TAP); err != nil {
		return fmt.Errorf("qemu: vm %s: nic %s: %w", vm.id, nic.ID, err)
	}
	netdev := false
	defer func() {
		if retErr == nil {
			return
		}
		// The undo runs even when ctx ran out, with a bound of its own.
		undo, cancel := context.WithTimeout(context.WithoutCancel(ctx), undoTimeout)
		defer cancel()
		if netdev {
			if _, err := vm.qmp.Execute(undo, "netdev_del", map[string]any{"id": nic.ID}); err != nil {
				vm.logger.WithError(err).Warn("qemu: undo netdev_add")
			}
		}
		// netdev_add consumed the fd; otherwise it is still named.
		if _, err := vm.qmp.Execute(undo, "closefd", map[string]any{"fdname": fdName}); err != nil && !netdev {
			vm.logger.WithError(err).Warn("qemu: undo getfd")
		}
	}()
	if _, err := vm.qmp.Execute(ctx, "netdev_add", map[string]any{
		"type": "tap", "id": nic.ID, "fd": fdName, "vhost": vm.vhost && isVirtioNIC(nic),
	}); err != nil {
		return fmt.Errorf("qemu: vm %s: nic %s: %w", vm.id, nic.ID, err)
	}
	netdev = true
	dev := map[string]any{
		"driver": nicDriver(nic, "pci"),
		"id":     nicDeviceID(nic.ID),
		"netdev": nic.ID,
		"mac":    nic.MAC.String(),
	}
	if nic.MTU > 0 && isVirtioNIC(nic) {
		dev["host_mtu"] = nic.MTU
	}
	return vm.plugLocked(ctx, dev)
}

// VCPUThreads asks QMP which host thread runs each vCPU.
func (vm *VM) VCPUThreads(ctx context.Context) ([]int, error) {
	raw, err := vm.qmp.Execute(ctx, "query-cpus-fast", nil)
	if err != nil {
		return nil, fmt.Errorf("qemu: vm %s: %w", vm.id, err)
	}
	var cpus []struct {
		Index  int `json:"cpu-index"`
		Thread int `json:"thread-id"`
	}
	if err := json.Unmarshal(raw, &cpus); err != nil {
		return nil, fmt.Errorf("qemu: vm %s: query-cpus-fast: %w", vm.id, err)
	}
	// Indexes are dense: vCPUs are plugged into the lowest free slots
	// and unplugged from the highest.
	slices.SortFunc(cpus, func(a, b struct {
		Index  int `json:"cpu-index"`
		Thread int `json:"thread-id"`
	}) int {
		return a.Index - b.Index
	})
	tids := make([]int, len(cpus))
	for i, c := range cpus {
		if c.Index != i {
			return nil, fmt.Errorf("qemu: vm %s: query-cpus-fast: vCPU index %d where %d was expected (indexes %v)", vm.id, c.Index, i, cpus)
		}
		tids[i] = c.Thread
	}
	return tids, nil
}

// Stop asks QEMU to quit, kills it when ctx ends first, waits for it and
// removes the driver's files. A VM that already exited is only cleaned up.
func (vm *VM) Stop(ctx context.Context) error {
	vm.stopOnce.Do(func() { vm.stopErr = vm.stop(ctx) })
	<-vm.done
	return vm.stopErr
}

func (vm *VM) stop(ctx context.Context) error {
	vm.quitting.Store(true)
	select {
	case <-vm.done:
	default:
		if err := vm.qmp.Quit(ctx); err != nil && ctx.Err() == nil {
			vm.logger.WithError(err).Warn("qemu: quit failed, killing")
			vm.kill()
		}
		select {
		case <-vm.done:
		case <-ctx.Done():
			vm.logger.Warn("qemu: did not quit in time, killing")
			vm.kill()
			<-vm.done
		}
	}
	return removeFiles(ctx, driverFiles(vm.dir))
}

func (vm *VM) kill() {
	// Signal goes through a pidfd: no risk of hitting a reused pid.
	vm.cmd.Process.Signal(syscall.SIGKILL)
}

// undoTimeout bounds the QMP commands that undo a failed hot-plug.
const undoTimeout = 5 * time.Second

// Console is QEMU's last lines of output: the guest console and QEMU's
// own messages.
func (vm *VM) Console() []string { return vm.output.Lines() }

// Done is closed when QEMU has exited.
func (vm *VM) Done() <-chan struct{} { return vm.done }

// Err is nil while QEMU runs and after Stop; otherwise it tells how QEMU
// exited and quotes its last output (the guest console).
func (vm *VM) Err() error {
	select {
	case <-vm.done:
	default:
		return nil
	}
	vm.mu.Lock()
	expected := vm.expected
	vm.mu.Unlock()
	if expected {
		return nil
	}
	return fmt.Errorf("qemu: vm %s: %s", vm.id, vm.describeExit())
}

// describeExit tells how QEMU exited, with its last output.
func (vm *VM) describeExit() string {
	vm.mu.Lock()
	waitErr, shutdown := vm.waitErr, vm.shutdown
	vm.mu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "%v: %s", errExited, describeWait(waitErr))
	if shutdown != "" {
		fmt.Fprintf(&b, " (shutdown: %s)", shutdown)
	}
	lines := vm.output.Lines()
	if len(lines) == 0 {
		b.WriteString("; no output")
	} else {
		b.WriteString("; last output:\n" + strings.Join(lines, "\n"))
	}
	return b.String()
}

func describeWait(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

func driverFiles(dir string) []string {
	return []string{
		filepath.Join(dir, QMPSocket),
		filepath.Join(dir, AgentSocket),
		filepath.Join(dir, ConsoleSocket),
		filepath.Join(dir, PortForwardSocket),
		filepath.Join(dir, PidFile),
	}
}

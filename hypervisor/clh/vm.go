package clh

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/log"

	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/internal/vmoutput"
)

// drainGrace bounds reading CH's output and the console after it exited.
const drainGrace = time.Second

// pingInterval is how often Start asks whether CH's API is up.
const pingInterval = 10 * time.Millisecond

// errExited ends what waits on CH when the process is gone.
var errExited = errors.New("cloud-hypervisor exited")

// VM is one running Cloud Hypervisor process.
type VM struct {
	id     string
	dir    string
	cmd    *exec.Cmd
	api    api
	logger *log.Entry
	output vmoutput.Output
	size   hypervisor.VMConfig // the sizes as launched (complete)
	// The guest's vsock ports: the agent's, the debug console's and the
	// port-forward channel's (0: none).
	agentPort, consolePort, forwardPort uint32

	done     chan struct{}
	quitting atomic.Bool

	mu      sync.Mutex
	waitErr error
	expect  bool

	stopOnce sync.Once
	stopErr  error

	// hotplugMu serializes adding and removing devices; devices are the
	// ones added, by id, with CH's answer.
	hotplugMu sync.Mutex
	devices   map[string]pciDeviceInfo

	resizeMu sync.Mutex

	panicked     chan struct{}
	panickedOnce sync.Once
	dumping      chan struct{}
}

var _ hypervisor.VM = (*VM)(nil)

// startVM starts cmd with its output, the console and the events read.
func startVM(ctx context.Context, cmd *exec.Cmd, cfg hypervisor.VMConfig, console, events *os.File) (*VM, error) {
	outR, outW, err := os.Pipe()
	if err != nil {
		console.Close()
		events.Close()
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = outW, outW
	err = cmd.Start()
	outW.Close()
	if err != nil {
		outR.Close()
		console.Close()
		events.Close()
		return nil, err
	}
	vm := &VM{
		id:          cfg.ID,
		dir:         cfg.Dir,
		cmd:         cmd,
		api:         api{path: filepath.Join(cfg.Dir, APISocket)},
		logger:      log.G(context.WithoutCancel(ctx)).WithField("vm", cfg.ID),
		size:        cfg,
		agentPort:   cfg.AgentPort.Vsock,
		consolePort: cfg.DebugConsole.Vsock,
		forwardPort: cfg.PortForward.Vsock,
		done:        make(chan struct{}),
		devices:     make(map[string]pciDeviceInfo),
		panicked:    make(chan struct{}),
		dumping:     make(chan struct{}, 1),
	}
	var readers sync.WaitGroup
	readers.Go(func() { vm.copyLines(outR, "clh") })
	readers.Go(func() { vm.copyLines(console, "console") })
	readers.Go(func() { vm.readEvents(events) })
	go func() {
		err := cmd.Wait()
		deadline := time.Now().Add(drainGrace)
		outR.SetReadDeadline(deadline)
		// The driver holds the FIFO's write end too: no EOF, the
		// deadline ends the read once what CH wrote is read.
		console.SetReadDeadline(deadline)
		events.SetReadDeadline(deadline)
		readers.Wait()
		outR.Close()
		console.Close()
		events.Close()
		vm.mu.Lock()
		vm.waitErr = err
		vm.expect = vm.quitting.Load()
		vm.mu.Unlock()
		if vm.expect {
			vm.logger.Debugf("clh: exited: %v", describeWait(err))
		} else {
			vm.logger.Warnf("clh: exited unexpectedly: %v", describeWait(err))
		}
		close(vm.done)
	}()
	return vm, nil
}

// boot waits for CH's API, creates the VM, adds the NICs and boots it,
// within bootTimeout.
func (vm *VM) boot(ctx context.Context, timeout time.Duration, c vmConfig, nics []hypervisor.NIC) error {
	ctx, cancel := context.WithTimeoutCause(ctx, timeout, fmt.Errorf("not booted within %v", timeout))
	defer cancel()
	ctx, cancelExit := context.WithCancelCause(ctx)
	defer cancelExit(nil)
	go func() {
		select {
		case <-vm.done:
			cancelExit(errExited)
		case <-ctx.Done():
		}
	}()
	if err := vm.waitAPI(ctx); err != nil {
		return err
	}
	if err := vm.api.call(ctx, http.MethodPut, "vm.create", c, nil); err != nil {
		return err
	}
	for _, n := range nics {
		if _, err := vm.addNet(ctx, n); err != nil {
			return fmt.Errorf("nic %s: %w", n.ID, err)
		}
	}
	if err := vm.api.callNoTimeout(ctx, http.MethodPut, "vm.boot", nil, nil); err != nil {
		return err
	}
	info, err := vm.info(ctx)
	if err != nil {
		return err
	}
	if info.State != "Running" {
		return fmt.Errorf("vm.info: state %q after vm.boot, want Running", info.State)
	}
	return nil
}

// waitAPI polls vmm.ping until CH answers, it exits or ctx ends.
func (vm *VM) waitAPI(ctx context.Context) error {
	t := time.NewTicker(pingInterval)
	defer t.Stop()
	for {
		var ping struct {
			Version string `json:"version"`
		}
		err := vm.api.call(ctx, http.MethodGet, "vmm.ping", nil, &ping)
		if err == nil {
			vm.logger.WithField("version", ping.Version).Debug("clh: api up")
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the API: %w (last: %w)", context.Cause(ctx), err)
		case <-t.C:
		}
	}
}

func (vm *VM) info(ctx context.Context) (vmInfo, error) {
	var info vmInfo
	err := vm.api.call(ctx, http.MethodGet, "vm.info", nil, &info)
	return info, err
}

// fail wraps err as the VM's error.
func (vm *VM) fail(err error) error {
	select {
	case <-vm.done:
		return fmt.Errorf("clh: vm %s: %w; %s", vm.id, err, vm.describeExit())
	default:
	}
	return fmt.Errorf("clh: vm %s: %w", vm.id, err)
}

// Pid is CH's process id.
func (vm *VM) Pid() int { return vm.cmd.Process.Pid }

// DialAgent connects to the agent's vsock port (VMConfig.AgentPort)
// through CH's hybrid vsock socket. While the guest boots, CH resets the
// connection (no listener in the guest yet): the error says so and the
// caller redials.
func (vm *VM) DialAgent(ctx context.Context) (net.Conn, error) {
	return vm.dialGuest(ctx, "agent", vm.agentPort)
}

// DialConsole connects to the debug console's vsock port
// (VMConfig.DebugConsole.Vsock). CH has no virtio-serial: a console the
// guest serves only there (DebugConsole.Serial) is none here.
func (vm *VM) DialConsole(ctx context.Context) (net.Conn, error) {
	if vm.consolePort == 0 {
		return nil, fmt.Errorf("clh: vm %s: %w on vsock (Cloud Hypervisor has no virtio-serial port to reach one on)", vm.id, hypervisor.ErrNoConsole)
	}
	return vm.dialGuest(ctx, "debug console", vm.consolePort)
}

// DialPortForward connects to the port-forward channel's vsock port
// (VMConfig.PortForward.Vsock); as for DialConsole, a channel on a
// virtio-serial port only is none here.
func (vm *VM) DialPortForward(ctx context.Context) (net.Conn, error) {
	if vm.forwardPort == 0 {
		return nil, fmt.Errorf("clh: vm %s: no port-forward channel on vsock (PortForward.Vsock): Cloud Hypervisor has no virtio-serial port to reach one on", vm.id)
	}
	return vm.dialGuest(ctx, "port-forward channel", vm.forwardPort)
}

// dialGuest connects to the guest's vsock port through CH's hybrid vsock
// socket.
func (vm *VM) dialGuest(ctx context.Context, what string, port uint32) (net.Conn, error) {
	select {
	case <-vm.done:
		return nil, fmt.Errorf("clh: vm %s: dial %s: %s", vm.id, what, vm.describeExit())
	default:
	}
	conn, err := dialHybrid(ctx, filepath.Join(vm.dir, VsockSocket), port)
	if err != nil {
		return nil, fmt.Errorf("clh: vm %s: dial %s: %w", vm.id, what, err)
	}
	return conn, nil
}

// AddNIC hot-plugs a virtio-net device on nic.TAP: vm.add-net with the
// TAP's descriptor passed along the request.
func (vm *VM) AddNIC(ctx context.Context, nic hypervisor.NIC) error {
	if err := checkNIC(nic); err != nil {
		return vm.fail(err)
	}
	vm.hotplugMu.Lock()
	defer vm.hotplugMu.Unlock()
	if _, ok := vm.devices[nic.ID]; ok {
		return vm.fail(fmt.Errorf("nic %s: duplicate id", nic.ID))
	}
	info, err := vm.addNet(ctx, nic)
	if err != nil {
		return vm.fail(fmt.Errorf("nic %s: %w", nic.ID, err))
	}
	vm.devices[nic.ID] = info
	return nil
}

// addNet is vm.add-net with the TAP's descriptor as SCM_RIGHTS. CH keeps
// its own copy (the kernel's dup at receipt): the caller's stays theirs.
func (vm *VM) addNet(ctx context.Context, nic hypervisor.NIC) (pciDeviceInfo, error) {
	var info pciDeviceInfo
	err := vm.api.call(ctx, http.MethodPut, "vm.add-net", netConfig{
		MAC: nic.MAC.String(), MTU: nic.MTU, ID: nic.ID, NumQueues: 2,
	}, &info, nic.TAP)
	return info, err
}

// AddDisk hot-plugs a virtio-blk disk. CH opens disks by path and takes no
// descriptor for them, so it gets the path of the caller's open file under
// /proc/<shim>/fd: the very file the caller opened, whatever became of
// its name, reopened by CH (root) while the caller keeps it open.
func (vm *VM) AddDisk(ctx context.Context, disk hypervisor.Disk) (hypervisor.GuestDevice, error) {
	switch {
	case disk.Bus != "" && disk.Bus != hypervisor.DiskVirtioBlk:
		return hypervisor.GuestDevice{}, vm.fail(fmt.Errorf("disk %s: bus %q: Cloud Hypervisor has only %s", disk.ID, disk.Bus, hypervisor.DiskVirtioBlk))
	case !validID(disk.ID):
		return hypervisor.GuestDevice{}, vm.fail(fmt.Errorf("disk %q: want an id of letters, digits, '-', '_' and '.' (not starting with '_')", disk.ID))
	case disk.File == nil:
		return hypervisor.GuestDevice{}, vm.fail(fmt.Errorf("disk %s: no file", disk.ID))
	}
	vm.hotplugMu.Lock()
	defer vm.hotplugMu.Unlock()
	if _, ok := vm.devices[disk.ID]; ok {
		return hypervisor.GuestDevice{}, vm.fail(fmt.Errorf("disk %s: duplicate id", disk.ID))
	}
	var info pciDeviceInfo
	err := vm.api.call(ctx, http.MethodPut, "vm.add-disk", diskConfig{
		Path:     fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), disk.File.Fd()),
		ReadOnly: disk.ReadOnly,
		ID:       disk.ID,
	}, &info)
	if err != nil {
		return hypervisor.GuestDevice{}, vm.fail(fmt.Errorf("disk %s: %w", disk.ID, err))
	}
	dev, err := guestDevice(info.BDF)
	if err != nil {
		// CH added it but the guest's address is unusable: undo.
		vm.undoAdd(ctx, disk.ID)
		return hypervisor.GuestDevice{}, vm.fail(fmt.Errorf("disk %s: %w", disk.ID, err))
	}
	vm.devices[disk.ID] = info
	return dev, nil
}

// undoTimeout bounds undoing a failed hot-plug.
const undoTimeout = 5 * time.Second

func (vm *VM) undoAdd(ctx context.Context, id string) {
	undo, cancel := context.WithTimeout(context.WithoutCancel(ctx), undoTimeout)
	defer cancel()
	if err := vm.api.call(undo, http.MethodPut, "vm.remove-device", map[string]string{"id": id}, nil); err != nil {
		vm.logger.WithError(err).Warnf("clh: undo adding %s", id)
	}
}

// RemoveDisk unplugs a disk AddDisk added.
func (vm *VM) RemoveDisk(ctx context.Context, id string) error {
	return vm.remove(ctx, "disk", id)
}

// AddPCIDevice hot-plugs a host PCI device bound to vfio-pci.
func (vm *VM) AddPCIDevice(ctx context.Context, dev hypervisor.PCIDevice) (hypervisor.GuestDevice, error) {
	if err := checkPCIDevice(dev); err != nil {
		return hypervisor.GuestDevice{}, vm.fail(err)
	}
	vm.hotplugMu.Lock()
	defer vm.hotplugMu.Unlock()
	if _, ok := vm.devices[dev.ID]; ok {
		return hypervisor.GuestDevice{}, vm.fail(fmt.Errorf("pci device %s: duplicate id", dev.ID))
	}
	var info pciDeviceInfo
	if err := vm.api.call(ctx, http.MethodPut, "vm.add-device", deviceConf{Path: sysfsPCI(dev.Address), ID: dev.ID}, &info); err != nil {
		return hypervisor.GuestDevice{}, vm.fail(fmt.Errorf("pci device %s: %w", dev.ID, err))
	}
	gd, err := guestDevice(info.BDF)
	if err != nil {
		vm.undoAdd(ctx, dev.ID)
		return hypervisor.GuestDevice{}, vm.fail(fmt.Errorf("pci device %s: %w", dev.ID, err))
	}
	vm.devices[dev.ID] = info
	return gd, nil
}

// RemovePCIDevice unplugs a device AddPCIDevice or VMConfig.PCIDevices
// added.
func (vm *VM) RemovePCIDevice(ctx context.Context, id string) error {
	return vm.remove(ctx, "pci device", id)
}

// removePoll is how often remove asks whether the guest let go.
const removePoll = 50 * time.Millisecond

// remove asks CH to unplug id and waits until the device is gone from
// CH's device tree: CH only asks the guest to eject it (ACPI), and lets go
// of the device's file or host device when the guest has.
func (vm *VM) remove(ctx context.Context, what, id string) error {
	vm.hotplugMu.Lock()
	defer vm.hotplugMu.Unlock()
	if err := vm.api.call(ctx, http.MethodPut, "vm.remove-device", map[string]string{"id": id}, nil); err != nil {
		return vm.fail(fmt.Errorf("%s %s: %w", what, id, err))
	}
	t := time.NewTicker(removePoll)
	defer t.Stop()
	for {
		info, err := vm.info(ctx)
		if err != nil {
			return vm.fail(fmt.Errorf("%s %s: waiting for the guest to let go: %w", what, id, err))
		}
		if _, ok := info.DeviceTree[id]; !ok {
			delete(vm.devices, id)
			return nil
		}
		select {
		case <-ctx.Done():
			return vm.fail(fmt.Errorf("%s %s: the guest did not let go of it: %w", what, id, context.Cause(ctx)))
		case <-vm.done:
			return vm.fail(fmt.Errorf("%s %s: %w", what, id, errExited))
		case <-t.C:
		}
	}
}

// GuestDevice says where the guest finds a device by its id: CH's answer
// when it was hot-plugged, else (devices added before the boot) CH's
// device tree.
func (vm *VM) GuestDevice(ctx context.Context, id string) (hypervisor.GuestDevice, error) {
	vm.hotplugMu.Lock()
	info, ok := vm.devices[id]
	vm.hotplugMu.Unlock()
	if ok && info.BDF != "" {
		dev, err := guestDevice(info.BDF)
		if err != nil {
			return dev, vm.fail(fmt.Errorf("device %s: %w", id, err))
		}
		return dev, nil
	}
	vi, err := vm.info(ctx)
	if err != nil {
		return hypervisor.GuestDevice{}, vm.fail(err)
	}
	bdf := treeBDF(vi.DeviceTree, id)
	if bdf == "" {
		return hypervisor.GuestDevice{}, vm.fail(fmt.Errorf("device %s: not a PCI device of the VM", id))
	}
	dev, err := guestDevice(bdf)
	if err != nil {
		return dev, vm.fail(fmt.Errorf("device %s: %w", id, err))
	}
	return dev, nil
}

// treeBDF is the PCI address of device id in CH's device tree: its own
// node's, or (virtio devices) that of its PCI transport, a child node.
func treeBDF(tree map[string]deviceNode, id string) string {
	n, ok := tree[id]
	if !ok {
		return ""
	}
	if n.PCIBDF != "" {
		return n.PCIBDF
	}
	for _, c := range n.Children {
		if b := tree[c].PCIBDF; b != "" {
			return b
		}
	}
	return ""
}

var bdfRE = regexp.MustCompile(`^([0-9a-fA-F]{4}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$`)

// guestDevice turns CH's "0000:00:05.0" into the guest's PCI path "05.0".
// CH puts every device on bus 0 of its segment (no bridges); only segment
// 0 is used, and a path from the root bus cannot name another.
func guestDevice(bdf string) (hypervisor.GuestDevice, error) {
	m := bdfRE.FindStringSubmatch(bdf)
	if m == nil {
		return hypervisor.GuestDevice{}, fmt.Errorf("PCI address %q from Cloud Hypervisor: want segment:bus:slot.function", bdf)
	}
	if m[1] != "0000" || m[2] != "00" {
		return hypervisor.GuestDevice{}, fmt.Errorf("PCI address %q from Cloud Hypervisor: not on segment 0, bus 0, which a guest PCI path cannot name", bdf)
	}
	if slot, _ := strconv.ParseUint(m[3], 16, 8); slot > 31 {
		return hypervisor.GuestDevice{}, fmt.Errorf("PCI address %q from Cloud Hypervisor: slot above 31", bdf)
	}
	return hypervisor.GuestDevice{PCIPath: strings.ToLower(m[3]) + "." + m[4]}, nil
}

// vcpuComm is the name CH gives each vCPU's thread.
var vcpuComm = regexp.MustCompile(`^vcpu([0-9]+)$`)

// VCPUThreads reads CH's threads named vcpuN, by N. CH has no API for them.
func (vm *VM) VCPUThreads(ctx context.Context) ([]int, error) {
	tids, err := vcpuThreads(vm.Pid())
	if err != nil {
		return nil, vm.fail(err)
	}
	return tids, nil
}

func vcpuThreads(pid int) ([]int, error) {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	byIndex := map[int]int{}
	for _, e := range ents {
		tid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name(), "comm"))
		if err != nil {
			continue // the thread exited meanwhile
		}
		m := vcpuComm.FindStringSubmatch(strings.TrimSpace(string(b)))
		if m == nil {
			continue
		}
		i, _ := strconv.Atoi(m[1])
		byIndex[i] = tid
	}
	tids := make([]int, len(byIndex))
	for i := range tids {
		tid, ok := byIndex[i]
		if !ok {
			return nil, fmt.Errorf("%s: vCPU threads %v: vcpu%d missing", dir, byIndex, i)
		}
		tids[i] = tid
	}
	return tids, nil
}

// Console is the last lines of the guest's serial console and of CH's own
// messages.
func (vm *VM) Console() []string { return vm.output.Lines() }

// Done is closed when CH has exited.
func (vm *VM) Done() <-chan struct{} { return vm.done }

// Err is nil while CH runs and after Stop; otherwise it tells how CH
// exited, with the last output.
func (vm *VM) Err() error {
	select {
	case <-vm.done:
	default:
		return nil
	}
	vm.mu.Lock()
	expected := vm.expect
	vm.mu.Unlock()
	if expected {
		return nil
	}
	return fmt.Errorf("clh: vm %s: %s", vm.id, vm.describeExit())
}

// Stop shuts the VM down (vm.shutdown), then CH (vmm.shutdown), kills CH
// when ctx ends first, waits for it and removes the driver's files.
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
		err := vm.api.call(ctx, http.MethodPut, "vm.shutdown", nil, nil)
		if err != nil {
			// A VM that never booted, or one shut down already: CH
			// itself can still quit.
			vm.logger.WithError(err).Debug("clh: vm.shutdown")
		}
		if err := vm.api.call(ctx, http.MethodPut, "vmm.shutdown", nil, nil); err != nil && ctx.Err() == nil {
			vm.logger.WithError(err).Warn("clh: vmm.shutdown failed, killing")
			vm.kill()
		}
		select {
		case <-vm.done:
		case <-ctx.Done():
			vm.logger.Warn("clh: did not quit in time, killing")
			vm.kill()
			<-vm.done
		}
	}
	return removeFiles(ctx, driverFiles(vm.dir))
}

func (vm *VM) kill() {
	// os.Process signals through a pidfd: no risk of a reused pid.
	vm.cmd.Process.Signal(syscall.SIGKILL)
}

// describeExit tells how CH exited, with its last output.
func (vm *VM) describeExit() string {
	vm.mu.Lock()
	waitErr := vm.waitErr
	vm.mu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "%v: %s", errExited, describeWait(waitErr))
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

// copyLines keeps the last lines of r and logs them at debug level (the
// console) or as warnings (CH's own messages).
func (vm *VM) copyLines(r io.Reader, src string) {
	vm.output.Copy(r, func(line string, held int) {
		entry := vm.logger.WithField("src", src)
		if held > 0 {
			entry = entry.WithField("held_back", held)
		}
		if src == "console" {
			entry.Debug(line)
		} else {
			entry.Warn(line)
		}
	})
}

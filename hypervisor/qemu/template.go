package qemu

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/hypervisor"
)

// Templates: a VM is booted once per configuration and guest image, paused
// as soon as its agent listens, and saved (QMP migrate to a file); every VM
// of that configuration then starts from the saved state (-incoming)
// instead of booting, which under TCG saves seconds. A template directory
// holds
//
//	state   the migration stream (device state; guest memory too with virtio-fs)
//	memory  guest memory, for VMs without virtio-fs: clones map it
//	        copy-on-write, so the pages no clone changes are shared by all
//
// What differs between VMs is added after the restore: NICs and virtio-fs
// devices are hot-plugged (vhost-user devices cannot be migrated); 9p
// devices are in the template, each clone giving its own directory (the
// guest mounts nothing before it is saved). vmgenid gives each clone a new
// generation id, and with it fresh kernel randomness.
const (
	templateState  = "state"
	templateMemory = "memory"
	// templateInputs records the files a template was made from, so that
	// a template whose guest image was rebuilt can be told stale.
	templateInputs = "inputs.json"
)

// input is a file a template depends on, as it was.
type input struct {
	Path  string `json:"path"`
	Size  int64  `json:"size"`
	MTime int64  `json:"mtime_ns"`
}

// inputs are the files a VM's template depends on: the QEMU binary, the
// kernel and the initrd.
func (d *Driver) inputs(cfg hypervisor.VMConfig) ([]input, error) {
	var in []input
	for _, p := range []string{d.path, cfg.Kernel, cfg.Initrd} {
		st, err := os.Stat(p)
		if err != nil {
			return nil, err
		}
		in = append(in, input{Path: p, Size: st.Size(), MTime: st.ModTime().UnixNano()})
	}
	return in, nil
}

// stale tells whether a file a template was made from changed or went.
func stale(in []input) bool {
	for _, i := range in {
		st, err := os.Stat(i.Path)
		if err != nil || st.Size() != i.Size || st.ModTime().UnixNano() != i.MTime {
			return true
		}
	}
	return false
}

// errTemplateUnusable means the VM cannot come from a template for a reason
// that booting it does not share (a failed save or restore); Start boots it.
var errTemplateUnusable = errors.New("template unusable")

func (m snapshotMode) String() string {
	return [...]string{"none", "template", "clone"}[m]
}

// clonable tells whether cfg can be restored from a template: it names a
// template directory, the machine is q35 (vmgenid needs its ACPI), and it
// has no host PCI device (VFIO devices cannot be migrated). Either agent
// channel will do: a vsock clone gets a guest CID of its own (see
// startClone).
func (d *Driver) clonable(cfg hypervisor.VMConfig) bool {
	return cfg.TemplateDir != "" && d.machine == "q35" && len(cfg.PCIDevices) == 0
}

// sharesMemory tells whether clones of the launch can map the template's
// memory copy-on-write: not with virtio-fs, whose daemon maps guest memory
// and so needs it shared.
func sharesMemory(l launch) bool {
	for _, s := range l.vm.Shares {
		if s.Kind == hypervisor.ShareVirtioFS {
			return false
		}
	}
	return true
}

// templateLaunch is the launch that boots cfg's template in dir: no NICs,
// empty stand-ins for its 9p directories, and nothing of the VM's own.
func (d *Driver) templateLaunch(cfg hypervisor.VMConfig, dir string) launch {
	t := cfg
	// One template serves every size: it is taken at the template size,
	// with the same headroom.
	t.VCPUs, t.MemoryMB = templateSize(cfg)
	t.ID = "template"
	t.Dir = dir
	t.NICs = nil
	t.TemplateDir = ""
	t.Shares = nil
	for i, s := range cfg.Shares {
		s.Path = filepath.Join(dir, "share"+strconv.Itoa(i))
		t.Shares = append(t.Shares, s)
	}
	l := d.launch(t)
	l.snapshot = snapshotTemplate
	if sharesMemory(l) {
		l.memPath = filepath.Join(dir, templateMemory)
	}
	return l
}

// templateSize is the size cfg's template is taken at.
func templateSize(cfg hypervisor.VMConfig) (vcpus, memoryMB int) {
	vcpus, memoryMB = cfg.VCPUs, cfg.MemoryMB
	if cfg.TemplateVCPUs > 0 {
		vcpus = cfg.TemplateVCPUs
	}
	if cfg.TemplateMemoryMB > 0 {
		memoryMB = cfg.TemplateMemoryMB
	}
	return vcpus, memoryMB
}

// templateKey names the template of cfg: a hash of the template's command
// line (with its own paths made neutral) and of what the binaries and the
// guest image are, so that a rebuilt guest gets a new template. The agent
// channel's device is on that command line, so serial and vsock VMs never
// share a template; a vsock device's guest CID and file descriptor are not
// (zero here: no CID is reserved), as every VM, the template too, reserves
// a CID of its own.
func (d *Driver) templateKey(cfg hypervisor.VMConfig) (string, error) {
	h := sha256.New()
	for _, a := range d.templateLaunch(cfg, "/template").args() {
		fmt.Fprintf(h, "%s\x00", a)
	}
	in, err := d.inputs(cfg)
	if err != nil {
		return "", err
	}
	for _, i := range in {
		fmt.Fprintf(h, "%s %d %d\x00", i.Path, i.Size, i.MTime)
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// PrepareTemplate makes cfg's template unless it is there. A cfg that
// cannot come from a template needs none.
func (d *Driver) PrepareTemplate(ctx context.Context, cfg hypervisor.VMConfig) error {
	cfg, err := d.complete(cfg)
	if err != nil {
		return fmt.Errorf("qemu: vm %s: %w", cfg.ID, err)
	}
	if !d.clonable(cfg) {
		return nil
	}
	key, err := d.templateKey(cfg)
	if err != nil {
		return fmt.Errorf("qemu: template: %w", err)
	}
	if err := d.ensureTemplate(ctx, cfg, filepath.Join(cfg.TemplateDir, key)); err != nil {
		return fmt.Errorf("qemu: template of vm %s: %w", cfg.ID, err)
	}
	return nil
}

// startClone starts the VM from its template, making the template first if
// there is none yet, then hot-plugs its virtio-fs shares and NICs.
func (d *Driver) startClone(ctx context.Context, l launch) (_ *VM, retErr error) {
	key, err := d.templateKey(l.vm)
	if err != nil {
		return nil, fmt.Errorf("template: %w: %w", errTemplateUnusable, err)
	}
	dir := filepath.Join(l.vm.TemplateDir, key)
	if err := d.ensureTemplate(ctx, l.vm, dir); err != nil {
		return nil, err
	}
	begin := time.Now()
	// The clone starts with its template's command line, at the
	// template's size, and is resized once restored.
	//
	// On vsock, start reserves the clone a guest CID of its own, and its
	// command line names that one (guest-cid, with the vhostfd it is set
	// on), not the template's: the migration stream does not carry the
	// CID. In QEMU (hw/virtio/vhost-vsock.c, vhost-vsock-common.c) the
	// device's migrated state is the generic virtio state, the config
	// space the guest reads its CID from is filled from the guest-cid
	// property on every read (vhost_vsock_get_config), and
	// vhost_vsock_common_post_load arms a timer that, once the VM runs,
	// sends the guest VIRTIO_VSOCK_EVENT_TRANSPORT_RESET. Linux's driver
	// (net/vmw_vsock/virtio_transport.c, virtio_vsock_event_handle) then
	// re-reads guest_cid from config space (virtio_vsock_update_guest_cid)
	// and resets every connected socket. Until it has, the guest answers
	// from the template's CID, which vhost drops (vhost_vsock_handle_tx_kick
	// takes only packets from the CID the device was given), so a dial
	// before then does not connect (it times out, or the guest resets it),
	// and the caller dials again. The agent must listen on VMADDR_CID_ANY
	// for connections to the new CID to find it (agent/channel.go).
	vcpus, memoryMB := l.vm.VCPUs, l.vm.MemoryMB
	l.vm.VCPUs, l.vm.MemoryMB = templateSize(l.vm)
	l.snapshot = snapshotClone
	if sharesMemory(l) {
		l.memPath = filepath.Join(dir, templateMemory)
	}
	vm, err := d.start(ctx, l)
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			vm.kill()
			<-vm.done
			removeFiles(ctx, driverFiles(l.vm.Dir))
		}
	}()
	if err := vm.restore(ctx, filepath.Join(dir, templateState), sharesMemory(l)); err != nil {
		return nil, fmt.Errorf("%w: restore from %s: %w", errTemplateUnusable, dir, err)
	}
	restored := time.Since(begin)
	if err := vm.resizeClone(ctx, vcpus, memoryMB); err != nil {
		return nil, fmt.Errorf("resize the clone from its template's %d vCPUs and %d MiB: %w", l.vm.VCPUs, l.vm.MemoryMB, err)
	}
	for i, s := range l.vm.Shares {
		if !l.hotplugged(s) {
			continue
		}
		dev := map[string]any{"driver": "vhost-user-fs-pci", "chardev": "fs" + strconv.Itoa(i), "tag": s.Tag, "id": "fs" + strconv.Itoa(i) + "-dev"}
		if err := vm.plug(ctx, dev); err != nil {
			return nil, fmt.Errorf("share %s: %w", s.Tag, err)
		}
	}
	for _, n := range l.vm.NICs {
		if err := vm.AddNIC(ctx, n); err != nil {
			return nil, err
		}
	}
	log.G(ctx).WithFields(log.Fields{"vm": l.vm.ID, "template": key, "restored": restored, "ready": time.Since(begin)}).Info("qemu: started from a template")
	return vm, nil
}

// ensureTemplate makes the template in dir unless it is there. One maker
// at a time (a lock file beside dir); the others wait for it.
func (d *Driver) ensureTemplate(ctx context.Context, cfg hypervisor.VMConfig, dir string) error {
	if _, err := os.Stat(filepath.Join(dir, templateState)); err == nil {
		return nil
	}
	if err := os.MkdirAll(cfg.TemplateDir, 0o700); err != nil {
		return fmt.Errorf("%w: %w", errTemplateUnusable, err)
	}
	if err := ensureRAMFS(ctx, cfg.TemplateDir); err != nil {
		// Templates still work; their clones have no balloon.
		log.G(ctx).WithError(err).Warn("qemu: templates stay where they are: clones get no balloon, and what their guests free stays on the host")
	}
	unlock, err := lockFile(ctx, dir+".lock")
	if err != nil {
		return fmt.Errorf("%w: %w", errTemplateUnusable, err)
	}
	defer unlock()
	if _, err := os.Stat(filepath.Join(dir, templateState)); err == nil {
		return nil // made while we waited
	}
	// What a maker that died left; the directory is renamed into place
	// only once it is complete.
	tmp := dir + ".tmp"
	if err := os.RemoveAll(tmp); err != nil {
		return fmt.Errorf("%w: %w", errTemplateUnusable, err)
	}
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return fmt.Errorf("%w: %w", errTemplateUnusable, err)
	}
	defer os.RemoveAll(tmp)
	begin := time.Now()
	if err := d.makeTemplate(ctx, cfg, tmp); err != nil {
		return err
	}
	in, err := d.inputs(cfg)
	if err == nil {
		var b []byte
		if b, err = json.Marshal(in); err == nil {
			err = os.WriteFile(filepath.Join(tmp, templateInputs), b, 0o600)
		}
	}
	if err != nil {
		return fmt.Errorf("%w: %w", errTemplateUnusable, err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return fmt.Errorf("%w: %w", errTemplateUnusable, err)
	}
	log.G(ctx).WithFields(log.Fields{"template": dir, "took": time.Since(begin)}).Info("qemu: template made")
	removeStale(ctx, cfg.TemplateDir)
	return nil
}

// removeStale removes the templates whose guest image or QEMU changed
// since they were made: no VM can come from them any more, and their
// memory sits in a tmpfs. Clones still running keep their own mappings.
func removeStale(ctx context.Context, templateDir string) {
	entries, _ := os.ReadDir(templateDir)
	for _, e := range entries {
		dir := filepath.Join(templateDir, e.Name())
		b, err := os.ReadFile(filepath.Join(dir, templateInputs))
		if !e.IsDir() || err != nil {
			continue
		}
		var in []input
		if json.Unmarshal(b, &in) != nil || !stale(in) {
			continue
		}
		// Not while another shim makes or checks it.
		nowait, cancel := context.WithCancel(ctx)
		cancel()
		unlock, err := lockFile(nowait, dir+".lock")
		if err != nil {
			continue
		}
		if err := os.RemoveAll(dir); err != nil {
			log.G(ctx).WithError(err).Warn("qemu: remove a stale template")
		} else {
			os.Remove(dir + ".lock")
			log.G(ctx).WithField("template", dir).Info("qemu: stale template removed")
		}
		unlock()
	}
}

// makeTemplate boots cfg's template in dir, waits for its agent to open
// its port, and saves it. A guest that does not get there is the error a
// boot would give; a failed save is errTemplateUnusable.
func (d *Driver) makeTemplate(ctx context.Context, cfg hypervisor.VMConfig, dir string) error {
	l := d.templateLaunch(cfg, dir)
	for _, s := range l.vm.Shares {
		if s.Kind == hypervisor.Share9P {
			if err := os.Mkdir(s.Path, 0o700); err != nil {
				return fmt.Errorf("%w: %w", errTemplateUnusable, err)
			}
		}
	}
	vm, err := d.start(ctx, l)
	if err != nil {
		return err
	}
	defer func() {
		vm.kill()
		<-vm.done
	}()
	timer := time.NewTimer(d.bootTimeout)
	defer timer.Stop()
	listening, stopProbe := vm.agentListening(ctx)
	defer stopProbe()
	select {
	case <-listening:
	case <-vm.done:
		return fmt.Errorf("template VM: %s", vm.describeExit())
	case <-timer.C:
		return fmt.Errorf("template VM: the guest agent did not answer (open its port) within %s", d.bootTimeout)
	case <-ctx.Done():
		// The caller's deadline (the whole start's) came first: say
		// what was still awaited, and why it ended.
		return fmt.Errorf("template VM: the guest agent did not answer (open its port): %w", context.Cause(ctx))
	}
	if err := vm.save(ctx, filepath.Join(dir, templateState), l.memPath != ""); err != nil {
		return fmt.Errorf("%w: save template: %w", errTemplateUnusable, err)
	}
	// Killed once saved (the deferred kill): on vsock that also frees the
	// template's guest CID, which only QEMU's vhostfd held, and which no
	// clone uses.
	return nil
}

// agentListening returns a channel closed once the guest's agent listens,
// and the stop of what watches for it. Over serial the guest opening its
// port says so (VSERPORT_CHANGE). Over vsock nothing does, so the agent's
// port is dialed until a connection is accepted; it is closed at once (the
// agent serves the connections that follow). Before the guest's driver is
// up a dial waits for vhost to deliver it, after it the guest refuses
// until the agent listens.
func (vm *VM) agentListening(ctx context.Context) (<-chan struct{}, func()) {
	if vm.channel != hypervisor.ChannelVsock {
		return vm.agentOpen, func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	listening := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			dialCtx, dialCancel := context.WithTimeout(ctx, agentProbeTimeout)
			conn, err := vm.DialAgent(dialCtx)
			dialCancel()
			if err == nil {
				conn.Close()
				close(listening)
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-vm.done:
				return
			case <-time.After(agentProbeRetry):
			}
		}
	}()
	return listening, func() {
		cancel()
		<-done
	}
}

const (
	// agentProbeTimeout bounds one dial of a template's agent over vsock.
	agentProbeTimeout = 2 * time.Second
	// agentProbeRetry is the pause between the dials.
	agentProbeRetry = 20 * time.Millisecond
)

// save pauses the VM and writes its migration stream to path; with
// ignoreShared guest memory stays in its file instead.
func (vm *VM) save(ctx context.Context, path string, ignoreShared bool) error {
	q := vm.qmp
	if _, err := q.Execute(ctx, "stop", nil); err != nil {
		return err
	}
	if err := setIgnoreShared(ctx, q, ignoreShared); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := q.ExecuteWithFile(ctx, "getfd", map[string]any{"fdname": "template"}, f); err != nil {
		return err
	}
	if _, err := q.Execute(ctx, "migrate", map[string]any{"uri": "fd:template"}); err != nil {
		return err
	}
	return waitMigration(ctx, q)
}

// restore loads the migration stream at path into a VM started with
// -incoming defer, and resumes it.
func (vm *VM) restore(ctx context.Context, path string, ignoreShared bool) error {
	q := vm.qmp
	if err := setIgnoreShared(ctx, q, ignoreShared); err != nil {
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := q.ExecuteWithFile(ctx, "getfd", map[string]any{"fdname": "template"}, f); err != nil {
		return err
	}
	if _, err := q.Execute(ctx, "migrate-incoming", map[string]any{"uri": "fd:template"}); err != nil {
		return err
	}
	if err := waitMigration(ctx, q); err != nil {
		return err
	}
	_, err = q.Execute(ctx, "cont", nil)
	return err
}

func setIgnoreShared(ctx context.Context, q *QMP, on bool) error {
	if !on {
		return nil
	}
	_, err := q.Execute(ctx, "migrate-set-capabilities", map[string]any{
		"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}},
	})
	return err
}

// waitMigration polls query-migrate until the migration completed or
// failed.
func waitMigration(ctx context.Context, q *QMP) error {
	for {
		raw, err := q.Execute(ctx, "query-migrate", nil)
		if err != nil {
			return err
		}
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := json.Unmarshal(raw, &st); err != nil {
			return fmt.Errorf("query-migrate: %w", err)
		}
		switch st.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("migration %s: %s", st.Status, st.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// lockFile takes an exclusive lock on path (created if missing), waiting
// for it as long as ctx lasts, and returns its release.
func lockFile(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// plug hot-plugs a device into a free PCIe root port.
func (vm *VM) plug(ctx context.Context, dev map[string]any) error {
	vm.hotplugMu.Lock()
	defer vm.hotplugMu.Unlock()
	return vm.plugLocked(ctx, dev)
}

func (vm *VM) plugLocked(ctx context.Context, dev map[string]any) error {
	port := -1
	for i, p := range vm.ports {
		if p == "" {
			port = i
			break
		}
	}
	id, _ := dev["id"].(string)
	if port < 0 {
		return fmt.Errorf("qemu: vm %s: %s: no free hotplug port (hypervisor.hotplug_ports = %d on q35; microvm has none)", vm.id, id, len(vm.ports))
	}
	dev["bus"] = hotplugPort(port)
	if _, err := vm.qmp.Execute(ctx, "device_add", dev); err != nil {
		return fmt.Errorf("qemu: vm %s: %s: %w", vm.id, id, err)
	}
	vm.ports[port] = id
	vm.logger.WithFields(log.Fields{"device": id, "port": hotplugPort(port)}).Debug("qemu: device hot-plugged")
	return nil
}

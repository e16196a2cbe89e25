package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
)

// newImage is a raw image file of 4 MiB, open with flag.
func newImage(t *testing.T, name string, flag int) *os.File {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 4<<20); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, flag, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// guestPCI asks the test guest what it finds at the PCI path. The guest
// may still be serving the last connection (it sees the host leave only
// on its next read), or start anew with its report: the question is
// asked again until the answer comes.
func guestPCI(t *testing.T, ctx context.Context, vm hypervisor.VM, path string) string {
	t.Helper()
	conn, err := vm.DialAgent(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := bufio.NewReader(conn)
	for ctx.Err() == nil {
		if _, err := fmt.Fprintf(conn, "pci %s\n", path); err != nil {
			t.Fatal(err)
		}
		conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		for {
			line, err := r.ReadString('\n')
			if errors.Is(err, os.ErrDeadlineExceeded) {
				break
			}
			if err != nil {
				t.Fatalf("reading the agent channel: %v", err)
			}
			if got, ok := strings.CutPrefix(strings.TrimSpace(line), "pci "+path+" "); ok {
				return got
			}
		}
	}
	t.Fatalf("the guest did not answer pci %s: %v", path, ctx.Err())
	return ""
}

// guestSees waits until the guest finds want at the PCI path.
func guestSees(t *testing.T, ctx context.Context, vm hypervisor.VM, path, want string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	var got string
	for {
		if got = guestPCI(t, ctx, vm, path); got == want {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("guest: pci %s is %q, want %q", path, got, want)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// pciDevice is an entry of query-pci.
type pciDevice struct {
	Slot     int    `json:"slot"`
	Function int    `json:"function"`
	QdevID   string `json:"qdev_id"`
	ID       struct {
		Vendor int `json:"vendor"`
		Device int `json:"device"`
	} `json:"id"`
	Bridge *struct {
		Devices []pciDevice `json:"devices"`
	} `json:"pci_bridge"`
}

// queryPCI finds the device id in query-pci: on bus 0, or (with below)
// anywhere, behind bridges the guest numbered.
func queryPCI(t *testing.T, ctx context.Context, vm *VM, id string, below bool) (pciDevice, bool) {
	t.Helper()
	raw, err := vm.qmp.Execute(ctx, "query-pci", nil)
	if err != nil {
		t.Fatal(err)
	}
	var buses []struct {
		Bus     int         `json:"bus"`
		Devices []pciDevice `json:"devices"`
	}
	if err := json.Unmarshal(raw, &buses); err != nil {
		t.Fatal(err)
	}
	var find func([]pciDevice) (pciDevice, bool)
	find = func(devs []pciDevice) (pciDevice, bool) {
		for _, d := range devs {
			if d.QdevID == id {
				return d, true
			}
			if below && d.Bridge != nil {
				if f, ok := find(d.Bridge.Devices); ok {
					return f, true
				}
			}
		}
		return pciDevice{}, false
	}
	for _, b := range buses {
		if b.Bus == 0 {
			return find(b.Devices)
		}
	}
	return pciDevice{}, false
}

// portOf is the hot-plug port the device id is on.
func portOf(t *testing.T, vm *VM, id string) string {
	t.Helper()
	vm.hotplugMu.Lock()
	defer vm.hotplugMu.Unlock()
	i := slices.Index(vm.ports, id)
	if i < 0 {
		t.Fatalf("device %s on no hot-plug port (ports %q)", id, vm.ports)
	}
	return hotplugPort(i)
}

// checkPCIPath checks a device's path against QEMU's query-pci: its
// first hop is its port's slot on bus 0, and once the guest enumerated
// the port, the guest finds at the path the device query-pci shows.
func checkPCIPath(t *testing.T, ctx context.Context, vm *VM, dev, path string) {
	t.Helper()
	if !regexp.MustCompile(`^[0-9a-f]{2}\.[0-7]/00\.0$`).MatchString(path) {
		t.Fatalf("device %s: PCI path %q, want a root port's slot.function and 00.0", dev, path)
	}
	port, ok := queryPCI(t, ctx, vm, portOf(t, vm, dev), false)
	if !ok {
		t.Fatalf("query-pci: no port of %s on bus 0", dev)
	}
	if hop := fmt.Sprintf("%02x.%x", port.Slot, port.Function); !strings.HasPrefix(path, hop+"/") {
		t.Errorf("device %s: PCI path %s, but its port is at %s on bus 0", dev, path, hop)
	}
	var d pciDevice
	if err := vm.waitUntil(ctx, time.Minute, func(ctx context.Context) (bool, error) {
		d, ok = queryPCI(t, ctx, vm, dev, true)
		return ok, nil
	}); err != nil {
		t.Fatalf("query-pci: device %s not behind its port: %v", dev, err)
	}
	if hop := fmt.Sprintf("%02x.%x", d.Slot, d.Function); !strings.HasSuffix(path, "/"+hop) {
		t.Errorf("device %s: PCI path %s, but query-pci has it at %s behind its port", dev, path, hop)
	}
	guestSees(t, ctx, vm, path, fmt.Sprintf("%04x:%04x", d.ID.Vendor, d.ID.Device))
}

// checkDisks checks that QEMU has exactly the disks of want, each as it
// was added and where AddDisk said, and QEMU holds no other file of a
// disk.
func checkDisks(t *testing.T, ctx context.Context, vm *VM, want map[string]hypervisor.Disk, added map[string]hypervisor.GuestDevice, images []*os.File) {
	t.Helper()
	raw, err := vm.qmp.Execute(ctx, "query-fdsets", nil)
	if err != nil {
		t.Fatal(err)
	}
	var fdsets []struct {
		FDs []struct {
			Opaque string `json:"opaque"`
		} `json:"fds"`
	}
	if err := json.Unmarshal(raw, &fdsets); err != nil {
		t.Fatal(err)
	}
	var opaques, wantOpaques []string
	for _, s := range fdsets {
		for _, fd := range s.FDs {
			opaques = append(opaques, fd.Opaque)
		}
	}
	for id := range want {
		wantOpaques = append(wantOpaques, "disk "+id)
	}
	slices.Sort(opaques)
	slices.Sort(wantOpaques)
	if !slices.Equal(opaques, wantOpaques) {
		t.Errorf("query-fdsets: %q, want %q", opaques, wantOpaques)
	}

	raw, err = vm.qmp.Execute(ctx, "query-named-block-nodes", map[string]any{"flat": true})
	if err != nil {
		t.Fatal(err)
	}
	var nodes []struct {
		NodeName string `json:"node-name"`
		RO       bool   `json:"ro"`
		File     string `json:"file"`
	}
	if err := json.Unmarshal(raw, &nodes); err != nil {
		t.Fatal(err)
	}
	if len(nodes) != 2*len(want) {
		t.Errorf("query-named-block-nodes: %+v, want a format and a protocol node for each of %d disks", nodes, len(want))
	}

	raw, err = vm.qmp.Execute(ctx, "query-block", nil)
	if err != nil {
		t.Fatal(err)
	}
	var blocks []struct {
		Qdev     string `json:"qdev"`
		Inserted struct {
			RO   bool   `json:"ro"`
			File string `json:"file"`
		} `json:"inserted"`
	}
	if err := json.Unmarshal(raw, &blocks); err != nil {
		t.Fatal(err)
	}
	if len(blocks) != len(want) {
		t.Errorf("query-block: %+v, want %d disks", blocks, len(want))
	}
	for id, d := range want {
		dev := diskDeviceID(id)
		i := slices.IndexFunc(blocks, func(b struct {
			Qdev     string `json:"qdev"`
			Inserted struct {
				RO   bool   `json:"ro"`
				File string `json:"file"`
			} `json:"inserted"`
		}) bool {
			return b.Qdev == dev || strings.HasPrefix(b.Qdev, peripheral+dev+"/")
		})
		if i < 0 {
			t.Errorf("query-block: no disk on device %s: %+v", dev, blocks)
			continue
		}
		if b := blocks[i]; b.Inserted.RO != d.ReadOnly || !strings.HasPrefix(b.Inserted.File, "/dev/fdset/") {
			t.Errorf("query-block: disk %s is %+v, want read-only %v on /dev/fdset/N", id, b.Inserted, d.ReadOnly)
		}
		got, err := vm.GuestDevice(ctx, id)
		if err != nil || got != added[id] {
			t.Errorf("GuestDevice(%s) = %+v, %v; AddDisk said %+v", id, got, err, added[id])
		}
		if d.Bus == hypervisor.DiskVirtioSCSI {
			checkPCIPath(t, ctx, vm, scsiControllerID, got.PCIPath)
			if !regexp.MustCompile(`^[0-9]+:0$`).MatchString(got.SCSIAddress) {
				t.Errorf("disk %s: SCSI address %q", id, got.SCSIAddress)
			}
			var target int
			if err := vm.qomGet(ctx, peripheral+dev, "scsi-id", &target); err != nil || fmt.Sprintf("%d:0", target) != got.SCSIAddress {
				t.Errorf("disk %s: scsi-id %d, %v; SCSI address %s", id, target, err, got.SCSIAddress)
			}
		} else {
			checkPCIPath(t, ctx, vm, dev, got.PCIPath)
			if got.SCSIAddress != "" {
				t.Errorf("disk %s on %s has SCSI address %q", id, d.Bus, got.SCSIAddress)
			}
		}
	}
	for id := range added {
		if _, ok := want[id]; ok {
			continue
		}
		if gd, err := vm.GuestDevice(ctx, id); !errdefs.IsNotFound(err) {
			t.Errorf("GuestDevice(%s) of a removed disk = %+v, %v; want not found", id, gd, err)
		}
	}

	// QEMU holds an image file only while its disk is there.
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", vm.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	held := make(map[string]bool)
	for _, fd := range fds {
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", vm.Pid(), fd.Name())); err == nil {
			held[l] = true
		}
	}
	for _, img := range images {
		inUse := false
		for _, d := range want {
			inUse = inUse || d.File.Name() == img.Name()
		}
		if held[img.Name()] != inUse {
			t.Errorf("QEMU holds %s: %v, want %v", img.Name(), held[img.Name()], inUse)
		}
	}
}

// TestDisks hot-plugs disks on each bus into a booted guest, removes them
// (the guest lets go of them), reuses the freed ports, and checks that
// failures leave nothing behind. After every step QEMU has exactly the
// disks that should be there, and the guest finds each at its PCI path.
func TestDisks(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a TAP device")
	}
	ctx, _ := testContext(t)
	cfg := config.Default().Hypervisor
	cfg.Kernel, cfg.Initrd, cfg.HotplugPorts = guest.kernel, guest.initrd, 3
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dir := vmDir(t)
	hv, err := d.Start(ctx, hypervisor.VMConfig{ID: "disks", Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort})
	if err != nil {
		t.Fatal(err)
	}
	defer stopped(t, hv, dir)
	vm := hv.(*VM)
	bootCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	readAgent(t, bootCtx, vm) // the guest's PCIe hot-plug driver is up

	// A NIC on a port: GuestDevice finds it by its id.
	nic := hypervisor.NIC{ID: "eth1", MAC: net.HardwareAddr{2, 0xc0, 0, 0, 0, 9}, TAP: newTAP(t, fmt.Sprintf("cd%d", os.Getpid()%100000))}
	if err := vm.AddNIC(ctx, nic); err != nil {
		t.Fatal(err)
	}
	gd, err := vm.GuestDevice(ctx, nic.ID)
	if err != nil || gd.SCSIAddress != "" {
		t.Fatalf("GuestDevice(%s) = %+v, %v", nic.ID, gd, err)
	}
	checkPCIPath(t, ctx, vm, nicDeviceID(nic.ID), gd.PCIPath)

	blk := newImage(t, "blk.img", os.O_RDWR)
	scsiRO := newImage(t, "scsi-ro.img", os.O_RDWR) // reopened read-only
	scsiRW := newImage(t, "scsi-rw.img", os.O_RDWR)
	nvme := newImage(t, "nvme.img", os.O_RDONLY)
	images := []*os.File{blk, scsiRO, scsiRW, nvme}
	closed := newImage(t, "closed.img", os.O_RDWR)
	closed.Close()
	dirFile, err := os.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer dirFile.Close()

	want := make(map[string]hypervisor.Disk)
	added := make(map[string]hypervisor.GuestDevice)
	for _, step := range []struct {
		name   string
		add    hypervisor.Disk
		remove string
		// wantErr is what the step fails with: an errdefs check, or
		// (errIs nil) a part of the message.
		errIs   func(error) bool
		wantErr string
	}{
		{name: "virtio-blk", add: hypervisor.Disk{ID: "vda", File: blk, Bus: hypervisor.DiskVirtioBlk}},
		{name: "virtio-scsi read-only, with the controller", add: hypervisor.Disk{ID: "sda", File: scsiRO, Bus: hypervisor.DiskVirtioSCSI, ReadOnly: true}},
		{name: "nvme without a free port", add: hypervisor.Disk{ID: "nvme0", File: nvme, Bus: hypervisor.DiskNVMe, ReadOnly: true}, errIs: errdefs.IsResourceExhausted, wantErr: "no free hotplug port"},
		{name: "virtio-scsi needs no port", add: hypervisor.Disk{ID: "sdb", File: scsiRW, Bus: hypervisor.DiskVirtioSCSI}},
		{name: "duplicate id", add: hypervisor.Disk{ID: "sdb", File: blk, Bus: hypervisor.DiskVirtioBlk}, errIs: errdefs.IsAlreadyExists},
		{name: "remove virtio-blk", remove: "vda"},
		{name: "remove again", remove: "vda", errIs: errdefs.IsNotFound},
		// QEMU refuses a read-only disk on an image another disk writes
		// (image locking): the device fails after the file and the
		// block nodes were made, and the undo removes them. (Not with
		// NVMe: QEMU 7.2's nvme keeps its drive when it fails.)
		{name: "disk on a locked image", add: hypervisor.Disk{ID: "locked", File: scsiRW, Bus: hypervisor.DiskVirtioBlk, ReadOnly: true}, wantErr: "lock"},
		{name: "nvme into the freed port", add: hypervisor.Disk{ID: "nvme0", File: nvme, Bus: hypervisor.DiskNVMe, ReadOnly: true}},
		{name: "remove virtio-scsi", remove: "sda"},
		{name: "virtio-scsi on the freed target", add: hypervisor.Disk{ID: "sdc", File: scsiRO, Bus: hypervisor.DiskVirtioSCSI}},
		{name: "bad id", add: hypervisor.Disk{ID: "1st", File: blk, Bus: hypervisor.DiskVirtioBlk}, errIs: errdefs.IsInvalidArgument},
		{name: "comma in id", add: hypervisor.Disk{ID: "a,b", File: blk, Bus: hypervisor.DiskVirtioBlk}, errIs: errdefs.IsInvalidArgument},
		{name: "no id", add: hypervisor.Disk{File: blk, Bus: hypervisor.DiskVirtioBlk}, errIs: errdefs.IsInvalidArgument},
		{name: "unknown bus", add: hypervisor.Disk{ID: "hda", File: blk, Bus: "ide"}, errIs: errdefs.IsInvalidArgument},
		{name: "no file", add: hypervisor.Disk{ID: "vdb", Bus: hypervisor.DiskVirtioBlk}, errIs: errdefs.IsInvalidArgument},
		{name: "closed file", add: hypervisor.Disk{ID: "vdb", File: closed, Bus: hypervisor.DiskVirtioBlk}, errIs: errdefs.IsInvalidArgument},
		{name: "directory", add: hypervisor.Disk{ID: "vdb", File: dirFile, Bus: hypervisor.DiskVirtioBlk}, errIs: errdefs.IsInvalidArgument},
		{name: "writable on a read-only file", add: hypervisor.Disk{ID: "vdb", File: nvme, Bus: hypervisor.DiskVirtioBlk}, errIs: errdefs.IsInvalidArgument},
		{name: "remove nvme", remove: "nvme0"},
		{name: "remove virtio-scsi read-write", remove: "sdb"},
		{name: "remove the last virtio-scsi", remove: "sdc"},
	} {
		t.Run(step.name, func(t *testing.T) {
			var err error
			begin := time.Now()
			if step.remove != "" {
				err = vm.RemoveDisk(ctx, step.remove)
			} else {
				var gd hypervisor.GuestDevice
				gd, err = vm.AddDisk(ctx, step.add)
				if err == nil {
					want[step.add.ID] = step.add
					added[step.add.ID] = gd
				}
			}
			t.Logf("took %v: %v", time.Since(begin), err)
			switch {
			case step.errIs == nil && step.wantErr == "":
				if err != nil {
					t.Fatal(err)
				}
				if step.remove != "" {
					delete(want, step.remove)
				}
			case err == nil:
				t.Fatalf("no error, want one")
			case step.errIs != nil && !step.errIs(err), !strings.Contains(err.Error(), step.wantErr):
				t.Fatalf("error %v, want %s", err, step.wantErr)
			}
			checkDisks(t, ctx, vm, want, added, images)
		})
	}
	// Every disk is gone, and with it the ports of the virtio-blk and
	// NVMe disks; the SCSI controller keeps its own.
	if got := slices.Sorted(slices.Values(vm.ports)); !slices.Equal(got, []string{"", nicDeviceID(nic.ID), scsiControllerID}) {
		t.Errorf("ports %q, want the NIC, the SCSI controller and a free one", vm.ports)
	}
}

// TestDisksMicrovm: microvm has no hot-plug port: AddDisk fails clearly
// and hands QEMU nothing.
func TestDisksMicrovm(t *testing.T) {
	ctx, _ := testContext(t)
	dir := vmDir(t)
	hv, err := newDriver(t, "microvm").Start(ctx, hypervisor.VMConfig{ID: "disks-microvm", Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort})
	if err != nil {
		t.Fatal(err)
	}
	defer stopped(t, hv, dir)
	vm := hv.(*VM)
	_, err = vm.AddDisk(ctx, hypervisor.Disk{ID: "vda", File: newImage(t, "vda.img", os.O_RDWR), Bus: hypervisor.DiskVirtioBlk})
	if !errdefs.IsNotImplemented(err) || !strings.Contains(err.Error(), "microvm") {
		t.Errorf("AddDisk on microvm: %v", err)
	}
	checkDisks(t, ctx, vm, nil, nil, nil)
}

// qmpSchema runs QEMU without a machine and returns its QMP schema, by
// entity name.
func qmpSchema(t *testing.T, ctx context.Context) map[string]map[string]any {
	t.Helper()
	sock := filepath.Join(vmDir(t), QMPSocket)
	l, err := listenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(DefaultBinary, "-machine", "none", "-nodefaults", "-display", "none",
		"-chardev", "socket,id=qmp,fd=3,server=on,wait=off", "-mon", "chardev=qmp,mode=control")
	cmd.ExtraFiles = []*os.File{l}
	err = cmd.Start()
	l.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
	}()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	q, err := NewQMP(ctx, conn, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	raw, err := q.Execute(ctx, "query-qmp-schema", nil)
	if err != nil {
		t.Fatal(err)
	}
	var list []map[string]any
	if err := json.Unmarshal(raw, &list); err != nil {
		t.Fatal(err)
	}
	schema := make(map[string]map[string]any)
	for _, e := range list {
		schema[e["name"].(string)] = e
	}
	return schema
}

// checkSchema checks that QEMU's schema type typ has a member for each of
// args, following a union's variant by its tag and objects nested in
// members (also through alternates).
func checkSchema(t *testing.T, schema map[string]map[string]any, typ string, args map[string]any, where string) {
	t.Helper()
	e := schema[typ]
	if e["meta-type"] == "alternate" {
		for _, m := range e["members"].([]any) {
			if alt := schema[m.(map[string]any)["type"].(string)]; alt["meta-type"] == "object" {
				checkSchema(t, schema, alt["name"].(string), args, where)
				return
			}
		}
		t.Fatalf("%s: %s has no object alternative", where, typ)
	}
	members := make(map[string]string)
	var add func(e map[string]any)
	add = func(e map[string]any) {
		ms, _ := e["members"].([]any)
		for _, m := range ms {
			m := m.(map[string]any)
			members[m["name"].(string)] = m["type"].(string)
		}
		tag, _ := e["tag"].(string)
		vs, _ := e["variants"].([]any)
		for _, v := range vs {
			v := v.(map[string]any)
			if v["case"] == args[tag] {
				add(schema[v["type"].(string)])
			}
		}
	}
	add(e)
	for k, v := range args {
		mt, ok := members[k]
		if !ok {
			t.Errorf("%s: QEMU's schema has no %q (members %v)", where, k, members)
			continue
		}
		if nested, ok := v.(map[string]any); ok {
			checkSchema(t, schema, mt, nested, where+"."+k)
		}
	}
}

// TestDiskArgsQEMU: the arguments AddDisk and RemoveDisk send are ones
// QEMU knows: commands and their arguments in query-qmp-schema, device
// properties in -device DRIVER,help.
func TestDiskArgsQEMU(t *testing.T) {
	ctx, _ := testContext(t)
	schema := qmpSchema(t, ctx)
	argType := func(cmd string) string {
		for _, e := range schema {
			if e["meta-type"] == "command" && e["name"] == cmd {
				return e["arg-type"].(string)
			}
		}
		t.Fatalf("QEMU has no command %s", cmd)
		return ""
	}
	for _, c := range []struct {
		cmd  string
		args map[string]any
	}{
		{"add-fd", map[string]any{"opaque": "disk x"}},
		{"blockdev-add", blockdevArgs(&diskState{node: "disk0", fdset: 1}, "file", true)},
		{"blockdev-add", blockdevArgs(&diskState{node: "disk0", fdset: 1}, "host_device", false)},
		{"device_add", map[string]any{"driver": "virtio-scsi-pci", "id": scsiControllerID, "bus": "hp0"}},
		{"device_del", map[string]any{"id": "x-dev"}},
		{"blockdev-del", map[string]any{"node-name": "disk0"}},
		{"remove-fd", map[string]any{"fdset-id": 1}},
		{"qom-list", map[string]any{"path": peripheral + "x-dev"}},
		{"qom-get", map[string]any{"path": peripheral + "x-dev", "property": "addr"}},
	} {
		checkSchema(t, schema, argType(c.cmd), c.args, c.cmd)
	}

	for _, bus := range []hypervisor.DiskBus{hypervisor.DiskVirtioBlk, hypervisor.DiskNVMe, hypervisor.DiskVirtioSCSI} {
		dev := deviceArgs(&diskState{id: "a-disk-id-longer-than-twenty-bytes", bus: bus, dev: "x-dev", node: "disk0", target: 3})
		driver := dev["driver"].(string)
		// device_add's own arguments are in the schema; the rest are the
		// device's properties.
		checkSchema(t, schema, argType("device_add"), map[string]any{"driver": driver, "id": dev["id"], "bus": "hp0"}, "device_add "+driver)
		out, err := exec.Command(DefaultBinary, "-device", driver+",help").CombinedOutput()
		if err != nil {
			t.Fatalf("-device %s,help: %v\n%s", driver, err, out)
		}
		props := make(map[string]bool)
		for _, l := range strings.Split(string(out), "\n") {
			if name, _, ok := strings.Cut(strings.TrimSpace(l), "="); ok {
				props[name] = true
			}
		}
		for k := range dev {
			if k != "driver" && k != "id" && k != "bus" && !props[k] {
				t.Errorf("-device %s,help has no property %q", driver, k)
			}
		}
		if s := dev["serial"].(string); len(s) > serialBytes {
			t.Errorf("%s: serial %q is longer than %d bytes", driver, s, serialBytes)
		}
	}
}

// TestWellFormed: ids as QEMU's id_wellformed takes them.
func TestWellFormed(t *testing.T) {
	for _, tc := range []struct {
		id string
		ok bool
	}{
		{"vda", true}, {"a-b.c_d9", true}, {"Z", true},
		{"", false}, {"1a", false}, {"-a", false}, {"a,b", false}, {"a b", false}, {"a=b", false}, {"a/b", false}, {"ä", false},
	} {
		if got := wellFormed(tc.id); got != tc.ok {
			t.Errorf("wellFormed(%q) = %v, want %v", tc.id, got, tc.ok)
		}
	}
}

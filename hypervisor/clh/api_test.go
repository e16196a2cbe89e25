package clh

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/hypervisor/clh/clhtest"
)

// fakeAPI serves a fake CH API in the test process and returns a VM that
// talks to it (no process behind it: for the API's calls only).
func fakeAPI(t *testing.T, srv *clhtest.Server) *VM {
	t.Helper()
	srv.Spec = clhtest.NewSpec()
	dir := t.TempDir()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(dir, APISocket), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(func() {
		l.Close()
		if v := srv.Violations(); len(v) > 0 {
			t.Errorf("requests against the spec: %q", v)
		}
	})
	vm := &VM{
		id: "test", dir: dir, api: api{path: filepath.Join(dir, APISocket)},
		done: make(chan struct{}), devices: map[string]pciDeviceInfo{},
		size: hypervisor.VMConfig{VCPUs: 1, MaxVCPUs: 4, MemoryMB: 256, BaseMemoryMB: 256, MaxMemoryMB: 1024},
	}
	vm.logger = testLogger()
	return vm
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// createAndBoot makes the fake VM running, as Start does.
func createAndBoot(t *testing.T, vm *VM, nics ...hypervisor.NIC) {
	t.Helper()
	d := &Driver{}
	cfg := hypervisor.VMConfig{Dir: vm.dir, Kernel: "/k", Initrd: "/i", VCPUs: 1, MaxVCPUs: 4, MemoryMB: 256, BaseMemoryMB: 256, MaxMemoryMB: 1024}
	if err := vm.boot(ctxT(t), 10*time.Second, d.vmConfig(cfg), nics); err != nil {
		t.Fatal(err)
	}
}

func TestSpecChecks(t *testing.T) {
	spec := clhtest.NewSpec()
	for _, tc := range []struct {
		name, method, endpoint, body, wantErr string
	}{
		{name: "ok", method: "PUT", endpoint: "vm.resize", body: `{"desired_vcpus":2}`},
		{name: "unknown path", method: "PUT", endpoint: "vm.frobnicate", wantErr: "no path /vm.frobnicate"},
		{name: "wrong method", method: "GET", endpoint: "vm.boot", wantErr: "no GET /vm.boot"},
		{name: "unknown field", method: "PUT", endpoint: "vm.resize", body: `{"vcpus":2}`, wantErr: `unknown field "vcpus"`},
		{name: "required missing", method: "PUT", endpoint: "vm.create", body: `{"cpus":{"boot_vcpus":1,"max_vcpus":1}}`, wantErr: `required field "payload" missing`},
		{name: "nested required", method: "PUT", endpoint: "vm.create", body: `{"payload":{},"cpus":{"boot_vcpus":1}}`, wantErr: `body.cpus: required field "max_vcpus" missing`},
		{name: "type", method: "PUT", endpoint: "vm.add-disk", body: `{"path":"/x","readonly":"yes"}`, wantErr: "body.readonly: want a boolean"},
		{name: "minimum", method: "PUT", endpoint: "vm.resize", body: `{"desired_vcpus":0}`, wantErr: "below the minimum"},
		{name: "enum", method: "PUT", endpoint: "vm.create", body: `{"payload":{},"serial":{"mode":"Bogus"}}`, wantErr: "is not one of"},
		{name: "body required", method: "PUT", endpoint: "vm.add-net", wantErr: "the body is required"},
		{name: "no body expected", method: "PUT", endpoint: "vm.boot", body: `{}`, wantErr: "takes no body"},
		{name: "not JSON", method: "PUT", endpoint: "vm.resize", body: `{`, wantErr: "body: unexpected end"},
		{name: "vsock cid minimum", method: "PUT", endpoint: "vm.create", body: `{"payload":{},"vsock":{"cid":2,"socket":"/s"}}`, wantErr: "body.vsock.cid: 2 is below the minimum 3"},
		{name: "hotplug method", method: "PUT", endpoint: "vm.create", body: `{"payload":{},"memory":{"size":1,"hotplug_method":"virtio-mem"}}`, wantErr: "body.memory.hotplug_method: virtio-mem is not one of"},
		{name: "not an integer", method: "PUT", endpoint: "vm.resize", body: `{"desired_ram":1.5}`, wantErr: "body.desired_ram: want an integer"},
		{name: "array of objects", method: "PUT", endpoint: "vm.create", body: `{"payload":{},"fs":[{"tag":"a","socket":"/s","num_queues":1}]}`, wantErr: `body.fs[0]: required field "queue_size" missing`},
		{name: "nested unknown", method: "PUT", endpoint: "vm.create", body: `{"payload":{"kernel":"/k","firmware":"/f"}}`, wantErr: `body.payload: unknown field "firmware"`},
		{name: "not an object", method: "PUT", endpoint: "vm.add-disk", body: `[]`, wantErr: "body: want an object"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := spec.CheckRequest(tc.method, tc.endpoint, []byte(tc.body))
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("got %v, want an error with %q", err, tc.wantErr)
			}
		})
	}
	for _, tc := range []struct {
		name, method, endpoint string
		code                   int
		body, wantErr          string
	}{
		{name: "ok", method: "PUT", endpoint: "vm.add-net", code: 200, body: `{"id":"eth0","bdf":"0000:00:05.0"}`},
		{name: "no body", method: "PUT", endpoint: "vm.add-net", code: 204},
		{name: "status not listed", method: "PUT", endpoint: "vm.resize", code: 200, wantErr: "status 200 is not in the contract"},
		{name: "body where none", method: "PUT", endpoint: "vm.boot", code: 204, body: `{}`, wantErr: "has no body"},
		{name: "answer required", method: "PUT", endpoint: "vm.add-disk", code: 200, body: `{"id":"d"}`, wantErr: `required field "bdf" missing`},
		{name: "state enum", method: "GET", endpoint: "vm.info", code: 200, body: `{"config":{"payload":{}},"state":"Booting"}`, wantErr: "answer.state: Booting is not one of"},
		{name: "device tree", method: "GET", endpoint: "vm.info", code: 200, body: `{"config":{"payload":{}},"state":"Running","device_tree":{"_disk0":{"id":"_disk0","pci_bdf":5}}}`, wantErr: "answer.device_tree._disk0.pci_bdf: want a string"},
	} {
		t.Run("answer "+tc.name, func(t *testing.T) {
			err := spec.CheckResponse(tc.method, tc.endpoint, tc.code, []byte(tc.body))
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("got %v, want an error with %q", err, tc.wantErr)
			}
		})
	}
}

// The TAP descriptor travels with vm.add-net and is the caller's file.
func TestAddNetPassesTAP(t *testing.T) {
	srv := &clhtest.Server{}
	vm := fakeAPI(t, srv)
	r1, w1, _ := os.Pipe()
	r2, w2, _ := os.Pipe()
	defer func() { r1.Close(); w1.Close(); r2.Close(); w2.Close() }()
	mac, _ := net.ParseMAC("52:54:00:12:34:56")
	createAndBoot(t, vm, hypervisor.NIC{ID: "eth0", MAC: mac, TAP: r1})
	if err := vm.AddNIC(ctxT(t), hypervisor.NIC{ID: "eth1", MAC: mac, TAP: r2, MTU: 1400}); err != nil {
		t.Fatal(err)
	}
	want := map[string]*os.File{"eth0": r1, "eth1": r2}
	got := 0
	for _, rec := range srv.Records() {
		if rec.Endpoint != "vm.add-net" {
			continue
		}
		got++
		var id string
		for name := range want {
			if strings.Contains(string(rec.Body), `"id":"`+name+`"`) {
				id = name
			}
		}
		fd, err := clhtest.FDOf(want[id])
		if err != nil || id == "" {
			t.Fatalf("add-net %s: %v", rec.Body, err)
		}
		if len(rec.FDs) != 1 || rec.FDs[0] != fd {
			t.Errorf("add-net %s: the server got fds %v, want the TAP's %v", id, rec.FDs, fd)
		}
	}
	if got != 2 {
		t.Errorf("%d vm.add-net requests, want 2", got)
	}
	// The hot-plugged one has its guest address from CH's answer, the
	// cold-plugged one from the device tree.
	for _, id := range []string{"eth0", "eth1"} {
		if dev, err := vm.GuestDevice(ctxT(t), id); err != nil || !strings.HasSuffix(dev.PCIPath, ".0") {
			t.Errorf("GuestDevice(%s) = %+v, %v", id, dev, err)
		}
	}
	// Emulated NICs do not exist on CH.
	if err := vm.AddNIC(ctxT(t), hypervisor.NIC{ID: "eth2", MAC: mac, TAP: r2, Model: hypervisor.NICE1000E}); err == nil || !strings.Contains(err.Error(), "only virtio-net") {
		t.Errorf("AddNIC e1000e: %v", err)
	}
}

func TestResize(t *testing.T) {
	for _, tc := range []struct {
		name    string
		srv     *clhtest.Server
		wantErr string
	}{
		{name: "429 then ok", srv: &clhtest.Server{Resize429: 3}},
		{name: "429 for ever", srv: &clhtest.Server{Resize429: resizeRetries + 10}, wantErr: "429 Too Many Requests: cpu removal pending (still after"},
		{name: "CH's error", srv: &clhtest.Server{Errors: map[string]clhtest.Error{"vm.resize": {Status: 500, Message: "Error resizing VM: CpuManager(VcpuPendingRemovedVcpu)"}}},
			wantErr: "clh: vm test: vm.resize: 500 Internal Server Error: Error resizing VM: CpuManager(VcpuPendingRemovedVcpu)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vm := fakeAPI(t, tc.srv)
			createAndBoot(t, vm)
			err := vm.SetMemory(ctxT(t), 512)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			size, err := vm.Size(ctxT(t))
			if err != nil {
				t.Fatal(err)
			}
			if size.MemoryMB != 512 || size.PluggedMB != 256 || size.VCPUs != 1 {
				t.Errorf("Size = %+v, want 512 MiB, 256 plugged, 1 vCPU", size)
			}
		})
	}
}

func TestSetMemoryBounds(t *testing.T) {
	vm := fakeAPI(t, &clhtest.Server{})
	createAndBoot(t, vm)
	for _, tc := range []struct {
		mb      int
		wantErr string
	}{
		{mb: 128, wantErr: "want 256 to 1024"},
		{mb: 2048, wantErr: "want 256 to 1024"},
		{mb: 257, wantErr: "multiple of 2 MiB"},
		{mb: 256},
	} {
		err := vm.SetMemory(ctxT(t), tc.mb)
		if (tc.wantErr == "") != (err == nil) || err != nil && !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("SetMemory(%d) = %v, want %q", tc.mb, err, tc.wantErr)
		}
	}
	vm.size.MaxMemoryMB = 256
	if err := vm.SetMemory(ctxT(t), 512); !errors.Is(err, hypervisor.ErrNotResizable) {
		t.Errorf("SetMemory without headroom = %v, want ErrNotResizable", err)
	}
}

func TestDisksAndPCIDevices(t *testing.T) {
	srv := &clhtest.Server{}
	vm := fakeAPI(t, srv)
	createAndBoot(t, vm)
	ctx := ctxT(t)
	img, err := os.Create(filepath.Join(t.TempDir(), "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	// Its name goes away: CH still gets the very file.
	os.Remove(img.Name())
	dev, err := vm.AddDisk(ctx, hypervisor.Disk{ID: "vol1", File: img, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if dev.PCIPath == "" {
		t.Error("AddDisk: no PCI path")
	}
	want, _ := clhtest.FDOf(img)
	for _, rec := range srv.Records() {
		if rec.Endpoint == "vm.add-disk" {
			if len(rec.FDs) != 1 || rec.FDs[0] != want {
				t.Errorf("CH opened %v, want the caller's file %v", rec.FDs, want)
			}
			if !strings.Contains(string(rec.Body), `"readonly":true`) {
				t.Errorf("add-disk %s: not read-only", rec.Body)
			}
		}
	}
	if _, err := vm.AddDisk(ctx, hypervisor.Disk{ID: "vol2", File: img, Bus: hypervisor.DiskVirtioSCSI}); err == nil || !strings.Contains(err.Error(), "only virtio-blk") {
		t.Errorf("AddDisk virtio-scsi: %v", err)
	}
	if err := vm.RemoveDisk(ctx, "vol1"); err != nil {
		t.Fatal(err)
	}
	if err := vm.RemoveDisk(ctx, "vol1"); err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("RemoveDisk twice: %v", err)
	}
	pdev, err := vm.AddPCIDevice(ctx, hypervisor.PCIDevice{ID: "nvme0", Address: "0000:45:00.0"})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := vm.GuestDevice(ctx, "nvme0"); err != nil || got != pdev {
		t.Errorf("GuestDevice = %+v, %v, want %+v", got, err, pdev)
	}
	if err := vm.RemovePCIDevice(ctx, "nvme0"); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.GuestDevice(ctx, "nvme0"); err == nil {
		t.Error("GuestDevice of a removed device succeeded")
	}
}

func TestGuestDevice(t *testing.T) {
	for _, tc := range []struct {
		bdf, want, wantErr string
	}{
		{bdf: "0000:00:05.0", want: "05.0"},
		{bdf: "0000:00:1F.3", want: "1f.3"},
		{bdf: "0001:00:05.0", wantErr: "not on segment 0, bus 0"},
		{bdf: "0000:01:05.0", wantErr: "not on segment 0, bus 0"},
		{bdf: "0000:00:20.0", wantErr: "slot above 31"},
		{bdf: "00:05.0", wantErr: "want segment:bus:slot.function"},
		{bdf: "", wantErr: "want segment:bus:slot.function"},
	} {
		dev, err := guestDevice(tc.bdf)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("guestDevice(%q) = %+v, %v, want %q", tc.bdf, dev, err, tc.wantErr)
			}
			continue
		}
		if err != nil || dev.PCIPath != tc.want {
			t.Errorf("guestDevice(%q) = %+v, %v, want %s", tc.bdf, dev, err, tc.want)
		}
	}
}

// hybridEndpoint is CH's side of a hybrid vsock socket: answer says what
// each connection gets after CONNECT.
func hybridEndpoint(t *testing.T, answer func(i int, c net.Conn)) string {
	path := filepath.Join(t.TempDir(), VsockSocket)
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for i := 0; ; i++ {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				b := make([]byte, len("CONNECT 1024\n"))
				if _, err := io.ReadFull(c, b); err != nil || string(b) != "CONNECT 1024\n" {
					c.Close()
					return
				}
				answer(i, c)
			}()
		}
	}()
	return path
}

func TestDialHybrid(t *testing.T) {
	ok := func(c net.Conn) { c.Write([]byte("OK 1073741824\nhello")); io.Copy(c, c) }
	for _, tc := range []struct {
		name    string
		answer  func(i int, c net.Conn)
		tries   int
		timeout time.Duration
		wantErr string
	}{
		{name: "ok", answer: func(_ int, c net.Conn) { ok(c) }, tries: 1},
		{name: "reset, then ok", answer: func(i int, c net.Conn) {
			if i == 0 {
				c.Close()
				return
			}
			ok(c)
		}, tries: 2},
		{name: "reset", answer: func(_ int, c net.Conn) { c.Close() }, tries: 1, wantErr: "nothing listens on the guest's port"},
		{name: "no answer", answer: func(_ int, c net.Conn) { t.Cleanup(func() { c.Close() }) }, tries: 1, timeout: 200 * time.Millisecond, wantErr: "no answer to CONNECT in time"},
		{name: "bad answer", answer: func(_ int, c net.Conn) { c.Write([]byte("NO\n")); c.Close() }, tries: 1, wantErr: `want "OK <port>"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := hybridEndpoint(t, tc.answer)
			ctx := ctxT(t)
			if tc.timeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tc.timeout)
				defer cancel()
			}
			var conn net.Conn
			var err error
			for range tc.tries {
				if conn, err = dialHybrid(ctx, path, 1024); err == nil {
					break
				}
			}
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			// What followed the answer is the guest's, not eaten.
			b := make([]byte, 5)
			if _, err := io.ReadFull(conn, b); err != nil || string(b) != "hello" {
				t.Fatalf("read %q, %v", b, err)
			}
		})
	}
}

package qemu

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/hypervisor"
)

// checkVmcore checks that path is an ELF core of a guest: notes (the
// vCPUs' registers) and memory segments, all inside the file.
func checkVmcore(t *testing.T, path string) {
	t.Helper()
	f, err := elf.Open(path)
	if err != nil {
		t.Fatalf("vmcore %s: %v", path, err)
	}
	defer f.Close()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if f.Type != elf.ET_CORE || f.Machine != elf.EM_X86_64 {
		t.Errorf("vmcore: type %v machine %v, want ET_CORE EM_X86_64", f.Type, f.Machine)
	}
	var notes, loads int
	var mem uint64
	for _, p := range f.Progs {
		switch p.Type {
		case elf.PT_NOTE:
			notes++
		case elf.PT_LOAD:
			loads++
			mem += p.Filesz
		}
		if p.Off+p.Filesz > uint64(st.Size()) {
			t.Errorf("vmcore: segment %v at %d+%d beyond the file's %d bytes", p.Type, p.Off, p.Filesz, st.Size())
		}
	}
	if notes == 0 || loads == 0 {
		t.Errorf("vmcore: %d PT_NOTE, %d PT_LOAD segments; want both", notes, loads)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("vmcore mode %v, want 0600", st.Mode().Perm())
	}
	t.Logf("vmcore: %d bytes (%d on disk), %d PT_LOAD segments with %d MiB of memory", st.Size(), st.Sys().(*syscall.Stat_t).Blocks*512, loads, mem>>20)
}

func queryStatus(t *testing.T, ctx context.Context, vm hypervisor.VM) string {
	t.Helper()
	st, err := vm.(*VM).qmp.QueryStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return st.Status
}

// A running guest is dumped and keeps running; the dump refuses a path
// that exists or is a symlink, and one that runs out of space is removed
// with the guest running again.
func TestDumpRunning(t *testing.T) {
	ctx, _ := testContext(t)
	dir := vmDir(t)
	vm, err := newDriver(t, "q35").Start(ctx, hypervisor.VMConfig{
		ID: "dump", Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort, VCPUs: 1, MemoryMB: 256,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer stopped(t, vm, dir)
	bootCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	readAgent(t, bootCtx, vm)

	out := t.TempDir()
	path := filepath.Join(out, "guest.vmcore")
	dumpCtx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	begin := time.Now()
	if err := vm.Dump(dumpCtx, path); err != nil {
		t.Fatal(err)
	}
	t.Logf("dumped a 256 MiB guest in %v", time.Since(begin))
	checkVmcore(t, path)
	if st := queryStatus(t, ctx, vm); st != "running" {
		t.Errorf("after the dump the VM is %q, want running", st)
	}
	select {
	case <-vm.Panicked():
		t.Error("Panicked is closed, the guest did not panic")
	default:
	}

	// An existing file is not overwritten, a symlink not followed.
	before, _ := os.ReadFile(path)
	if err := vm.Dump(dumpCtx, path); !errors.Is(err, fs.ErrExist) {
		t.Errorf("Dump to an existing file: got %v, want EEXIST", err)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Error("Dump changed an existing file")
	}
	target := filepath.Join(out, "target")
	link := filepath.Join(out, "link")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if err := vm.Dump(dumpCtx, link); err == nil {
		t.Error("Dump through a symlink succeeded")
	}
	if _, err := os.Lstat(target); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the symlink's target was created (%v)", err)
	}

	// A filesystem too small: the copy fails, QEMU's dump ends with it
	// (its write into the pipe fails), the partial file goes and the
	// guest runs again, so a next dump works.
	small := filepath.Join(t.TempDir(), "small")
	if err := os.Mkdir(small, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", small, "tmpfs", 0, "size=4m"); err != nil {
		t.Fatalf("mount a small tmpfs: %v", err)
	}
	defer unix.Unmount(small, unix.MNT_DETACH)
	err = vm.Dump(dumpCtx, filepath.Join(small, "guest.vmcore"))
	if !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("Dump to a full filesystem: got %v, want ENOSPC", err)
	}
	if entries, _ := os.ReadDir(small); len(entries) != 0 {
		t.Errorf("the failed dump left %v", entries)
	}
	if st := queryStatus(t, ctx, vm); st != "running" {
		t.Errorf("after a failed dump the VM is %q, want running", st)
	}
	if err := vm.Dump(dumpCtx, filepath.Join(out, "again.vmcore")); err != nil {
		t.Errorf("a dump after a failed one: %v", err)
	}
	// The guest still answers.
	pingCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	readAgent(t, pingCtx, vm)
}

// A guest kernel panic (an NMI: unknown on q35, unknown_nmi_panic=1; a
// PCI SERR on microvm, which has no port 0x61, panic_on_unrecovered_nmi)
// pauses the VM through pvpanic and closes Panicked; the paused guest is
// dumped and stays paused. On q35 and microvm; q35 restored from a
// template too (the clone has the device and the template's loaded driver).
func TestPanicDump(t *testing.T) {
	for _, tc := range []struct {
		name, machine string
		template      bool
	}{{"q35", "q35", false}, {"microvm", "microvm", false}, {"q35-clone", "q35", true}} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, logs := testContext(t)
			dir := vmDir(t)
			cfg := hypervisor.VMConfig{
				ID: "panic-" + tc.name, Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort, VCPUs: 1, MemoryMB: 256,
				KernelParams: []string{"unknown_nmi_panic=1", "sysctl.kernel.panic_on_unrecovered_nmi=1"},
			}
			if tc.template {
				cfg.TemplateDir = templateDir(t)
			}
			vm, err := newDriver(t, tc.machine).Start(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer stopped(t, vm, dir)
			bootCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
			defer cancel()
			readAgent(t, bootCtx, vm)
			if tc.template && !strings.Contains(strings.Join(vm.(*VM).cmd.Args, " "), "-incoming defer") {
				t.Fatal("the VM was not restored from a template")
			}

			if _, err := vm.(*VM).qmp.Execute(ctx, "inject-nmi", nil); err != nil {
				t.Fatal(err)
			}
			select {
			case <-vm.Panicked():
			case <-vm.Done():
				t.Fatalf("QEMU exited instead of pausing: %v", vm.Err())
			case <-bootCtx.Done():
				t.Fatalf("no GUEST_PANICKED; console:\n%s", strings.Join(vm.Console(), "\n"))
			}
			if st := queryStatus(t, ctx, vm); st != "guest-panicked" {
				t.Errorf("a panicked VM is %q, want guest-panicked", st)
			}
			if !strings.Contains(logs.String(), "the guest kernel panicked") {
				t.Error("the panic is not in the driver's log")
			}

			path := filepath.Join(t.TempDir(), "panic.vmcore")
			dumpCtx, cancel := context.WithTimeout(ctx, 5*time.Minute)
			defer cancel()
			begin := time.Now()
			if err := vm.Dump(dumpCtx, path); err != nil {
				t.Fatal(err)
			}
			t.Logf("dumped the panicked guest in %v", time.Since(begin))
			checkVmcore(t, path)
			// The panic's message is in the kernel's log buffer in the
			// dump; the console may not have it: a panic in NMI context
			// defers console output, and the VM pauses before the flush.
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Contains(b, []byte("Kernel panic - not syncing")) {
				t.Error("the vmcore does not hold the panic message")
			}
			b = nil
			if st := queryStatus(t, ctx, vm); st != "guest-panicked" {
				t.Errorf("after the dump the VM is %q, want guest-panicked still", st)
			}
			if err := vm.Err(); err != nil {
				t.Errorf("Err of a paused VM: %v", err)
			}
		})
	}
}

// dumpQEMU fakes QEMU's side of a dump on a socketpair: it takes the fd
// of getfd and, on dump-guest-memory, writes data into it, then forever
// (endless) or until the reader goes (EPIPE). query-dump answers what
// became of it.
type dumpQEMU struct {
	data    []byte
	endless bool
	// result is what the writer ended with, once it has.
	result chan error
}

func (d *dumpQEMU) serve(t *testing.T, conn *net.UnixConn) {
	var fd *os.File
	status := "none"
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(4))
	enc := func(s string) { conn.Write([]byte(s + "\r\n")) }
	enc(greeting)
	var pending []byte
	for {
		n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
		if err != nil {
			if fd != nil {
				fd.Close()
			}
			return
		}
		if oobn > 0 {
			msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
			fds, _ := unix.ParseUnixRights(&msgs[0])
			fd = os.NewFile(uintptr(fds[0]), "dump")
		}
		pending = append(pending, buf[:n]...)
		for {
			i := bytes.IndexByte(pending, '\n')
			if i < 0 {
				break
			}
			var r request
			json.Unmarshal(pending[:i], &r)
			pending = pending[i+1:]
			switch r.Execute {
			case "dump-guest-memory":
				status = "active"
				w := fd
				fd = nil
				go func() {
					defer w.Close()
					var err error
					for {
						if _, err = w.Write(d.data); err != nil || !d.endless {
							break
						}
					}
					d.result <- err
				}()
			case "query-dump":
				if status == "active" {
					select {
					case err := <-d.result:
						status = "completed"
						if err != nil {
							status = "failed"
						}
						d.result <- err
					default:
					}
				}
				enc(fmt.Sprintf(`{"return": {"status": %q, "completed": 0, "total": 0}, "id": %s}`, status, r.ID))
				continue
			}
			enc(fmt.Sprintf(`{"return": {}, "id": %s}`, r.ID))
		}
	}
}

// fakeVM is a VM whose QMP peer is d.
func fakeDumpVM(t *testing.T, d *dumpQEMU) *VM {
	t.Helper()
	client, server := socketpair(t)
	go d.serve(t, server.(*net.UnixConn))
	ctx, _ := testContext(t)
	q, err := NewQMP(ctx, client, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() })
	return &VM{
		id: "fake", qmp: q, done: make(chan struct{}), dumping: make(chan struct{}, 1),
		panicked: make(chan struct{}), logger: log.G(ctx),
	}
}

// The copy keeps what QEMU writes, with holes for the zero blocks.
func TestDumpCopy(t *testing.T) {
	data := make([]byte, 3*dumpBlock*256+100) // ends in a partial block
	copy(data, "\x7fELF")
	copy(data[dumpBlock*300:], "middle")
	data[len(data)-1] = 1
	d := &dumpQEMU{data: data, result: make(chan error, 1)}
	vm := fakeDumpVM(t, d)
	path := filepath.Join(t.TempDir(), "vmcore")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := vm.Dump(ctx, path); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("the file differs from what QEMU wrote (%d bytes, want %d)", len(got), len(data))
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	if st.Blocks*512 >= int64(len(data)) {
		t.Errorf("%d bytes on disk for %d mostly zero bytes: no holes", st.Blocks*512, len(data))
	}
}

// A ctx that ends mid-dump ends QEMU's writes (EPIPE: QEMU 7.2 has no
// command to cancel a dump) and removes the file.
func TestDumpCancel(t *testing.T) {
	d := &dumpQEMU{data: bytes.Repeat([]byte{1}, 1<<16), endless: true, result: make(chan error, 1)}
	vm := fakeDumpVM(t, d)
	dir := t.TempDir()
	path := filepath.Join(dir, "vmcore")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- vm.Dump(ctx, path) }()
	// Cancelled once data arrives: the fake never ends on its own.
	deadline := time.After(time.Minute)
	for {
		if st, err := os.Stat(path); err == nil && st.Size() > 0 {
			break
		}
		select {
		case err := <-errc:
			t.Fatalf("Dump returned before the cancel: %v", err)
		case <-deadline:
			t.Fatal("no data written")
		case <-time.After(5 * time.Millisecond):
		}
	}
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Dump: got %v, want context.Canceled", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Dump did not return after the cancel")
	}
	select {
	case err := <-d.result:
		if !errors.Is(err, syscall.EPIPE) {
			t.Errorf("QEMU's writes ended with %v, want EPIPE", err)
		}
	default:
		t.Error("QEMU's writes had not ended when Dump returned")
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("the cancelled dump left %v", entries)
	}
	// A ctx that has ended creates nothing.
	if err := vm.Dump(ctx, path); !errors.Is(err, context.Canceled) {
		t.Errorf("Dump with an ended ctx: %v", err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Dump with an ended ctx left %s (%v)", path, err)
	}
}

package sandbox

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/hypervisor"
)

func TestDumpName(t *testing.T) {
	at := time.Date(2026, 3, 4, 5, 6, 7, 890_000_000, time.FixedZone("CET", 3600))
	for _, tc := range []struct{ id, want string }{
		{"c1", "c1-20260304T040607.890Z.vmcore"},
		{strings.Repeat("ab", 32), strings.Repeat("ab", 32) + "-20260304T040607.890Z.vmcore"},
		{"pod_1.x-y", "pod_1.x-y-20260304T040607.890Z.vmcore"},
		// Not a containerd id, but the name stays one component.
		{"../../etc/x", ".._.._etc_x-20260304T040607.890Z.vmcore"},
		{"a\x00b\nc", "a_b_c-20260304T040607.890Z.vmcore"},
	} {
		got := dumpName(tc.id, at)
		if got != tc.want || filepath.Base(got) != got {
			t.Errorf("dumpName(%q) = %q, want %q", tc.id, got, tc.want)
		}
	}
}

func TestCheckDumpSpace(t *testing.T) {
	for _, tc := range []struct {
		name     string
		free     uint64
		memoryMB int
		ok       bool
	}{
		{"twice the memory", 512 << 20, 256, true},
		{"more", 100 << 30, 2048, true},
		{"a byte short", 512<<20 - 1, 256, false},
		{"the memory once", 256 << 20, 256, false},
		{"nothing free", 0, 256, false},
		{"a large guest", 200 << 30, 128 << 10, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := checkDumpSpace("/var/crash", tc.free, tc.memoryMB)
			if (err == nil) != tc.ok {
				t.Fatalf("checkDumpSpace(%d, %d MiB) = %v, want ok %v", tc.free, tc.memoryMB, err, tc.ok)
			}
			if err == nil {
				return
			}
			// The operator learns what was free, what was needed and where.
			for _, w := range []string{"/var/crash", "MiB free", "needs"} {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("%q does not name %q", err, w)
				}
			}
			if !errdefs.IsFailedPrecondition(err) {
				t.Errorf("%v: want a failed precondition (409 on the management socket)", err)
			}
		})
	}
}

// panicDriver is the fake driver with VMs that can panic (close
// panicked) and dump (a small file made as the QEMU driver makes it).
type panicDriver struct {
	*fakeDriver
	panicked chan struct{}
	mu       sync.Mutex
	dumps    []string
}

func (d *panicDriver) Start(ctx context.Context, cfg hypervisor.VMConfig) (hypervisor.VM, error) {
	vm, err := d.fakeDriver.Start(ctx, cfg)
	if err != nil {
		return nil, err
	}
	return &panicVM{VM: vm, d: d}, nil
}

type panicVM struct {
	hypervisor.VM
	d *panicDriver
}

func (v *panicVM) Panicked() <-chan struct{} { return v.d.panicked }

func (v *panicVM) Dump(ctx context.Context, path string) error {
	v.d.mu.Lock()
	v.d.dumps = append(v.d.dumps, path)
	v.d.mu.Unlock()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.WriteString("\x7fELF fake vmcore")
	return err
}

// smallTmpfs mounts a 16 MiB tmpfs: too small for a vmcore of any guest.
func smallTmpfs(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=16m,mode=0700"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Error(err)
		}
	})
	return dir
}

// logTo is a context whose log goes to buf as well.
func logTo(buf *logBuf) context.Context {
	l := logrus.New()
	l.SetOutput(buf)
	l.SetLevel(logrus.DebugLevel)
	return log.WithLogger(context.Background(), logrus.NewEntry(l))
}

type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *logBuf) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *logBuf) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// A guest panic fails the sandbox (its process exits with VMExitStatus,
// everything is torn down) after a vmcore is written into dump_dir, or
// not, saying why.
func TestWatchPanic(t *testing.T) {
	for _, tc := range []struct {
		name string
		dir  func(t *testing.T) string
		// want is in the log; vmcore tells whether one is written.
		want   []string
		vmcore bool
	}{
		{"dump", func(t *testing.T) string { return filepath.Join(t.TempDir(), "crash") }, []string{"vmcore written", "the guest kernel panicked; vmcore "}, true},
		{"no space", smallTmpfs, []string{"no vmcore written", "MiB free", "needs 512 MiB"}, false},
		{"no dump_dir", func(*testing.T) string { return "" }, []string{"hypervisor.dump_dir is not set"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, true)
			drv := &panicDriver{fakeDriver: e.drv, panicked: make(chan struct{})}
			cfg := e.config("9p")
			cfg.Hypervisor.MemoryMB, cfg.Hypervisor.BaseMemoryMB = 256, 256
			dir := tc.dir(t)
			cfg.Hypervisor.DumpDir = dir
			opts := e.options(cfg)
			opts.Driver = drv
			logs := &logBuf{}
			ctx := logTo(logs)
			sb, c, err := Create(ctx, opts, e.container("cat"))
			if err != nil {
				t.Fatal(err)
			}
			go io.Copy(io.Discard, e.stdout)
			go io.Copy(io.Discard, e.stderr)
			if err := c.Start(ctx, "", nil); err != nil {
				t.Fatal(err)
			}
			close(drv.panicked)
			if x := waitExit(t, e.exits); x.Status != VMExitStatus {
				t.Errorf("exit %+v, want status %d", x, VMExitStatus)
			}
			for _, w := range append(tc.want, "the guest kernel panicked", "sandbox failed") {
				if !strings.Contains(logs.String(), w) {
					t.Errorf("the log does not say %q:\n%s", w, logs)
				}
			}
			var found []string
			if dir != "" {
				entries, _ := os.ReadDir(dir)
				for _, en := range entries {
					found = append(found, en.Name())
				}
			}
			switch {
			case tc.vmcore && len(found) != 1:
				t.Errorf("dump_dir holds %v, want one vmcore", found)
			case tc.vmcore:
				if !strings.HasPrefix(found[0], "c1-") || !strings.HasSuffix(found[0], ".vmcore") {
					t.Errorf("vmcore named %q", found[0])
				}
				if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != 0o700 {
					t.Errorf("dump_dir made with mode %v (%v), want 0700", st.Mode().Perm(), err)
				}
			case len(found) != 0:
				t.Errorf("dump_dir holds %v, want nothing", found)
			}
			if _, err := sb.DeleteContainer(context.Background(), "c1"); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// POST /dump on the management socket: the vmcore's path and size, or the
// error with its status.
func TestHandleDump(t *testing.T) {
	e := newEnv(t, true)
	drv := &panicDriver{fakeDriver: e.drv, panicked: make(chan struct{})}
	cfg := e.config("9p")
	cfg.Hypervisor.MemoryMB, cfg.Hypervisor.BaseMemoryMB = 256, 256
	opts := e.options(cfg)
	opts.Driver = drv
	ctx := context.Background()
	sb, c, err := Create(ctx, opts, e.container("cat"))
	if err != nil {
		t.Fatal(err)
	}
	go io.Copy(io.Discard, e.stdout)
	go io.Copy(io.Discard, e.stderr)
	if err := c.Start(ctx, "", nil); err != nil {
		t.Fatal(err)
	}

	sock := filepath.Join(e.sandboxDir(), ManageSocket)
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
	}}
	post := func(body string) (int, []byte) {
		t.Helper()
		resp, err := client.Post("http://sandbox/dump", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, b
	}

	good := filepath.Join(t.TempDir(), "dumps")
	for _, tc := range []struct {
		name, body string
		status     int
		want       string
	}{
		{"no dir anywhere", "", http.StatusBadRequest, "hypervisor.dump_dir"},
		{"relative", `{"dir": "crash"}`, http.StatusBadRequest, "absolute"},
		{"unknown field", `{"path": "/tmp"}`, http.StatusBadRequest, "unknown field"},
		{"no space", `{"dir": "` + smallTmpfs(t) + `"}`, http.StatusConflict, "MiB free"},
		{"written", `{"dir": "` + good + `"}`, http.StatusOK, ""},
	} {
		status, b := post(tc.body)
		if status != tc.status {
			t.Errorf("%s: status %d (%s), want %d", tc.name, status, b, tc.status)
			continue
		}
		if status != http.StatusOK {
			var er ErrorReply
			if err := json.Unmarshal(b, &er); err != nil || !strings.Contains(er.Error, tc.want) {
				t.Errorf("%s: answer %s, want an error naming %q", tc.name, b, tc.want)
			}
			continue
		}
		var r DumpReply
		if err := json.Unmarshal(b, &r); err != nil {
			t.Fatalf("%s: %s: %v", tc.name, b, err)
		}
		st, err := os.Stat(r.Path)
		if err != nil || filepath.Dir(r.Path) != good || st.Size() != r.Bytes || r.Bytes == 0 {
			t.Errorf("%s: answer %+v; the file: %v", tc.name, r, err)
		}
	}
	if n := len(drv.dumps); n != 1 {
		t.Errorf("%d dumps asked of the VM, want 1 (the checks come first): %v", n, drv.dumps)
	}
	select {
	case <-sb.stopping:
		t.Error("a dump on demand stopped the sandbox")
	default:
	}
	if err := c.Kill(ctx, "", 9, false); err != nil {
		t.Fatal(err)
	}
	waitExit(t, e.exits)
	if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
}

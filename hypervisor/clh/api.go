package clh

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// apiTimeout bounds one call of CH's API when the caller's context allows
// longer: CH answers from its own thread at once, except for the calls that
// build or boot the VM (bootTimeout) and the ones that wait for the guest.
// Kata's 1 s proved too short under load (kata-containers#3466).
const apiTimeout = 10 * time.Second

// maxErrorBody is how much of an error answer reaches the caller's error.
const maxErrorBody = 4096

// apiError is an answer of CH's API outside 2xx: its status and CH's own
// message (the body), which says what CH did not like.
type apiError struct {
	Endpoint string
	Code     int
	Status   string
	Body     string
}

func (e *apiError) Error() string {
	if e.Body == "" {
		return fmt.Sprintf("%s: %s", e.Endpoint, e.Status)
	}
	return fmt.Sprintf("%s: %s: %s", e.Endpoint, e.Status, e.Body)
}

// statusOf is the HTTP status of an apiError in err's chain, 0 for others.
func statusOf(err error) int {
	var ae *apiError
	if errors.As(err, &ae) {
		return ae.Code
	}
	return 0
}

// api is CH's REST API on its unix socket (--api-socket).
//
// Each call is a connection of its own, written and read by hand rather
// than with net/http's client: vm.add-net hands CH the TAP's file
// descriptor as SCM_RIGHTS data of the very write that carries the request
// (CH's micro-http takes the fds it finds with the request), which
// http.Transport cannot do. One way for every call keeps them alike.
type api struct {
	path string
}

// call sends a request to endpoint ("vm.boot") with body (nil for none) as
// JSON and files as SCM_RIGHTS, and decodes a 200's body into out (if not
// nil). It is bounded by ctx and apiTimeout.
func (a *api) call(ctx context.Context, method, endpoint string, body, out any, files ...*os.File) error {
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	return a.callNoTimeout(ctx, method, endpoint, body, out, files...)
}

// callNoTimeout is call bounded by ctx alone, for calls that take longer
// than apiTimeout (vm.boot, vm.coredump) under their own bound.
func (a *api) callNoTimeout(ctx context.Context, method, endpoint string, body, out any, files ...*os.File) error {
	var payload []byte
	if body != nil {
		var err error
		if payload, err = json.Marshal(body); err != nil {
			return fmt.Errorf("%s: %w", endpoint, err)
		}
	}
	req, err := http.NewRequest(method, "http://localhost/api/v1/"+endpoint, bytes.NewReader(payload))
	if err != nil {
		return fmt.Errorf("%s: %w", endpoint, err)
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	var raw bytes.Buffer
	if err := req.Write(&raw); err != nil {
		return fmt.Errorf("%s: %w", endpoint, err)
	}

	c, err := (&net.Dialer{}).DialContext(ctx, "unix", a.path)
	if err != nil {
		return fmt.Errorf("%s: %w", endpoint, err)
	}
	conn := c.(*net.UnixConn)
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	if d, ok := ctx.Deadline(); ok {
		conn.SetDeadline(d)
	}
	if err := writeWithFiles(conn, raw.Bytes(), files); err != nil {
		return fmt.Errorf("%s: %w", endpoint, ctxErr(ctx, err))
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		return fmt.Errorf("%s: %w", endpoint, ctxErr(ctx, err))
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("%s: %w", endpoint, ctxErr(ctx, err))
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		msg := strings.TrimSpace(string(b))
		if len(msg) > maxErrorBody {
			msg = msg[:maxErrorBody] + "..."
		}
		return &apiError{Endpoint: endpoint, Code: resp.StatusCode, Status: resp.Status, Body: msg}
	}
	if out != nil && resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("%s: answer %q: %w", endpoint, b, err)
		}
	}
	return nil
}

// writeWithFiles writes b, with files' descriptors as SCM_RIGHTS on its
// first write, and the rest (if the socket took only part) after.
func writeWithFiles(conn *net.UnixConn, b []byte, files []*os.File) error {
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		n, _, err := conn.WriteMsgUnix(b, unix.UnixRights(fds...), nil)
		if err != nil {
			return err
		}
		b = b[n:]
	}
	_, err := conn.Write(b)
	return err
}

// ctxErr prefers the context's reason over the deadline error it caused.
func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%w)", context.Cause(ctx), err)
	}
	return err
}

// The API's bodies, as far as the driver uses them; field names are CH's
// (colo's contract with CH's API, clhtest/contract.go, which the tests
// check them against).

type vmConfig struct {
	Payload payloadConfig `json:"payload"`
	CPUs    cpusConfig    `json:"cpus"`
	Memory  memoryConfig  `json:"memory"`
	Serial  *consoleConf  `json:"serial,omitempty"`
	Console *consoleConf  `json:"console,omitempty"`
	Vsock   *vsockConfig  `json:"vsock,omitempty"`
	Balloon *balloonConf  `json:"balloon,omitempty"`
	FS      []fsConfig    `json:"fs,omitempty"`
	Devices []deviceConf  `json:"devices,omitempty"`
	PVPanic bool          `json:"pvpanic"`
}

type payloadConfig struct {
	Kernel    string `json:"kernel"`
	Initramfs string `json:"initramfs,omitempty"`
	Cmdline   string `json:"cmdline,omitempty"`
}

type cpusConfig struct {
	BootVCPUs int `json:"boot_vcpus"`
	MaxVCPUs  int `json:"max_vcpus"`
}

type memoryConfig struct {
	Size           int64  `json:"size"`
	HotplugSize    int64  `json:"hotplug_size,omitempty"`
	HotpluggedSize int64  `json:"hotplugged_size,omitempty"`
	HotplugMethod  string `json:"hotplug_method,omitempty"`
	Shared         bool   `json:"shared,omitempty"`
}

type consoleConf struct {
	Mode string `json:"mode"`
	File string `json:"file,omitempty"`
}

type vsockConfig struct {
	CID    uint32 `json:"cid"`
	Socket string `json:"socket"`
}

type balloonConf struct {
	Size              int64 `json:"size"`
	FreePageReporting bool  `json:"free_page_reporting"`
}

type fsConfig struct {
	Tag       string `json:"tag"`
	Socket    string `json:"socket"`
	NumQueues int    `json:"num_queues"`
	QueueSize int    `json:"queue_size"`
	ID        string `json:"id,omitempty"`
}

type deviceConf struct {
	Path string `json:"path"`
	ID   string `json:"id,omitempty"`
}

type netConfig struct {
	MAC string `json:"mac"`
	MTU int    `json:"mtu,omitempty"`
	ID  string `json:"id"`
	// NumQueues is 2: one queue pair, as the one TAP fd gives.
	NumQueues int `json:"num_queues"`
}

type diskConfig struct {
	Path     string `json:"path"`
	ReadOnly bool   `json:"readonly"`
	ID       string `json:"id"`
}

type pciDeviceInfo struct {
	ID  string `json:"id"`
	BDF string `json:"bdf"`
}

type vmResize struct {
	DesiredVCPUs   *int   `json:"desired_vcpus,omitempty"`
	DesiredRAM     *int64 `json:"desired_ram,omitempty"`
	DesiredBalloon *int64 `json:"desired_balloon,omitempty"`
}

type vmInfo struct {
	Config struct {
		CPUs struct {
			BootVCPUs int `json:"boot_vcpus"`
			MaxVCPUs  int `json:"max_vcpus"`
		} `json:"cpus"`
		Memory struct {
			Size           int64 `json:"size"`
			HotplugSize    int64 `json:"hotplug_size"`
			HotpluggedSize int64 `json:"hotplugged_size"`
		} `json:"memory"`
		Balloon *struct {
			Size int64 `json:"size"`
		} `json:"balloon"`
	} `json:"config"`
	State            string                `json:"state"`
	MemoryActualSize int64                 `json:"memory_actual_size"`
	DeviceTree       map[string]deviceNode `json:"device_tree"`
}

type deviceNode struct {
	ID       string   `json:"id"`
	Children []string `json:"children"`
	PCIBDF   string   `json:"pci_bdf"`
}

type urlConfig struct {
	DestinationURL string `json:"destination_url"`
}

package clhtest

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// FD is a file descriptor the server received, by what it refers to.
type FD struct {
	Dev uint64 `json:"dev"`
	Ino uint64 `json:"ino"`
}

// FDOf names what f refers to, to compare with an FD the server received.
func FDOf(f *os.File) (FD, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return FD{}, err
	}
	return FD{Dev: st.Dev, Ino: st.Ino}, nil
}

// Record is one request the server answered.
type Record struct {
	Method   string          `json:"method"`
	Endpoint string          `json:"endpoint"`
	Body     json.RawMessage `json:"body,omitempty"`
	FDs      []FD            `json:"fds,omitempty"`
	Status   int             `json:"status"`
	// Violation is what the request (or the server's own answer) broke
	// of the spec.
	Violation string `json:"violation,omitempty"`
}

// Server is the fake API. Set the knobs before Serve.
type Server struct {
	Spec *Spec
	// Resize429 is how many vm.resize requests are answered 429 (a vCPU
	// removal pending) before one succeeds.
	Resize429 int
	// Errors are answers to give instead of the usual one: endpoint to
	// status and CH's message.
	Errors map[string]Error
	// OnBoot, OnResize and OnShutdownVMM let a fake CH process act
	// (threads, console, vsock); called without the server's lock.
	// OnBoot and OnResize run before the answer, as CH makes the VM's
	// devices and vCPU threads before it answers (a client may use the
	// vsock socket as soon as vm.boot answered); OnShutdownVMM after it.
	OnBoot        func(config map[string]any)
	OnResize      func(vcpus int)
	OnShutdownVMM func()
	// Log is called with each record.
	Log func(Record)

	mu      sync.Mutex
	records []Record
	config  map[string]any
	state   string // "" (not created), Created, Running, Paused, Shutdown
	devices map[string]string
	slot    int
}

// Error is an answer Server.Errors injects.
type Error struct {
	Status  int
	Message string
}

// Records are the requests answered so far.
func (s *Server) Records() []Record {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Record(nil), s.records...)
}

// Violations are the records that broke the spec.
func (s *Server) Violations() []string {
	var v []string
	for _, r := range s.Records() {
		if r.Violation != "" {
			v = append(v, r.Violation)
		}
	}
	return v
}

// Serve answers connections on l until it is closed.
func (s *Server) Serve(l *net.UnixListener) error {
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			return err
		}
		go s.serveConn(c)
	}
}

// fdReader reads a unix socket and keeps the descriptors that arrive.
type fdReader struct {
	c   *net.UnixConn
	fds []int
}

func (r *fdReader) Read(b []byte) (int, error) {
	oob := make([]byte, unix.CmsgSpace(4*8))
	n, oobn, _, _, err := r.c.ReadMsgUnix(b, oob)
	if oobn > 0 {
		msgs, perr := unix.ParseSocketControlMessage(oob[:oobn])
		if perr == nil {
			for _, m := range msgs {
				if fds, err := unix.ParseUnixRights(&m); err == nil {
					r.fds = append(r.fds, fds...)
				}
			}
		}
	}
	return n, err
}

func (s *Server) serveConn(c *net.UnixConn) {
	defer c.Close()
	fr := &fdReader{c: c}
	br := bufio.NewReader(fr)
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		body, _ := io.ReadAll(req.Body)
		var fds []FD
		for _, fd := range fr.fds {
			var st unix.Stat_t
			if unix.Fstat(fd, &st) == nil {
				fds = append(fds, FD{Dev: st.Dev, Ino: st.Ino})
			}
			unix.Close(fd)
		}
		fr.fds = nil
		rec := Record{Method: req.Method, Endpoint: strings.TrimPrefix(req.URL.Path, "/api/v1/"), Body: body, FDs: fds}
		status, answer, before, after := s.handle(&rec)
		if before != nil {
			before()
		}
		resp := &http.Response{
			StatusCode: status, ProtoMajor: 1, ProtoMinor: 1,
			Header: http.Header{}, ContentLength: int64(len(answer)),
			Body: io.NopCloser(strings.NewReader(string(answer))),
		}
		if len(answer) > 0 {
			resp.Header.Set("Content-Type", "application/json")
		}
		rec.Status = status
		s.mu.Lock()
		s.records = append(s.records, rec)
		s.mu.Unlock()
		if s.Log != nil {
			s.Log(rec)
		}
		resp.Write(c)
		if after != nil {
			after()
		}
	}
}

// handle answers one request; before runs before the answer is written,
// after once it is.
func (s *Server) handle(rec *Record) (status int, answer []byte, before, after func()) {
	if err := s.Spec.CheckRequest(rec.Method, rec.Endpoint, rec.Body); err != nil {
		rec.Violation = err.Error()
		return http.StatusBadRequest, []byte(err.Error()), nil, nil
	}
	if e, ok := s.Errors[rec.Endpoint]; ok {
		return e.Status, []byte(e.Message), nil, nil
	}
	var body map[string]any
	json.Unmarshal(rec.Body, &body)
	status, answer, hook := s.answer(rec, body)
	if err := s.Spec.CheckResponse(rec.Method, rec.Endpoint, status, answer); err != nil && status < 400 {
		rec.Violation = "server: " + err.Error()
	}
	if rec.Endpoint == "vmm.shutdown" {
		return status, answer, nil, hook
	}
	return status, answer, hook, nil
}

// answer answers one request under the server's lock; the hook it
// returns (OnBoot, OnResize or OnShutdownVMM) runs without it.
func (s *Server) answer(rec *Record, body map[string]any) (int, []byte, func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.devices == nil {
		s.devices = map[string]string{}
		s.slot = 5 // CH's own devices come first
	}
	created := s.state != ""
	running := s.state == "Running" || s.state == "Paused"
	str := func(k string) string { v, _ := body[k].(string); return v }
	addDevice := func(prefix string) (int, []byte, func()) {
		if !created {
			return http.StatusNotFound, nil, nil
		}
		id := str("id")
		if id == "" {
			id = fmt.Sprintf("_%s%d", prefix, len(s.devices))
		}
		if _, ok := s.devices[id]; ok {
			return http.StatusConflict, []byte("duplicate id " + id), nil
		}
		bdf := fmt.Sprintf("0000:00:%02x.0", s.slot)
		s.slot++
		s.devices[id] = bdf
		if !running {
			return http.StatusNoContent, nil, nil
		}
		b, _ := json.Marshal(map[string]string{"id": id, "bdf": bdf})
		return http.StatusOK, b, nil
	}
	switch rec.Endpoint {
	case "vmm.ping":
		b, _ := json.Marshal(map[string]any{"version": "v51.1-fake", "pid": os.Getpid()})
		return http.StatusOK, b, nil
	case "vmm.shutdown":
		return http.StatusNoContent, nil, s.OnShutdownVMM
	case "vm.create":
		if created {
			return http.StatusInternalServerError, []byte("VmAlreadyCreated"), nil
		}
		s.config, s.state = body, "Created"
		for _, key := range []string{"devices", "fs"} {
			l, _ := body[key].([]any)
			for _, d := range l {
				m, _ := d.(map[string]any)
				id, _ := m["id"].(string)
				s.devices[id] = fmt.Sprintf("0000:00:%02x.0", s.slot)
				s.slot++
			}
		}
		return http.StatusNoContent, nil, nil
	case "vm.boot":
		if !created {
			return http.StatusNotFound, nil, nil
		}
		s.state = "Running"
		cfg, hook := s.config, s.OnBoot
		return http.StatusNoContent, nil, func() {
			if hook != nil {
				hook(cfg)
			}
		}
	case "vm.info":
		if !created {
			return http.StatusNotFound, nil, nil
		}
		tree := map[string]any{}
		for id, bdf := range s.devices {
			tree[id] = map[string]any{"id": id, "children": []string{}, "pci_bdf": bdf}
		}
		mem, _ := s.config["memory"].(map[string]any)
		size, _ := mem["size"].(float64)
		plugged, _ := mem["hotplugged_size"].(float64)
		var balloon float64
		if b, ok := s.config["balloon"].(map[string]any); ok {
			balloon, _ = b["size"].(float64)
		}
		b, _ := json.Marshal(map[string]any{
			"config": s.config, "state": s.state, "device_tree": tree,
			"memory_actual_size": int64(size + plugged - balloon),
		})
		return http.StatusOK, b, nil
	case "vm.add-net":
		if len(rec.FDs) != 1 {
			return http.StatusBadRequest, []byte(fmt.Sprintf("want 1 TAP fd with the request, got %d", len(rec.FDs))), nil
		}
		return addDevice("net")
	case "vm.add-disk":
		f, err := os.Open(str("path"))
		if err != nil {
			return http.StatusInternalServerError, []byte(err.Error()), nil
		}
		fd, _ := FDOf(f)
		f.Close()
		rec.FDs = append(rec.FDs, fd) // what the path opened
		return addDevice("disk")
	case "vm.add-device":
		if !strings.HasPrefix(str("path"), "/sys/bus/pci/devices/") {
			return http.StatusBadRequest, []byte("not a sysfs PCI device path"), nil
		}
		return addDevice("vfio")
	case "vm.remove-device":
		if _, ok := s.devices[str("id")]; !ok || !created {
			return http.StatusNotFound, nil, nil
		}
		delete(s.devices, str("id"))
		return http.StatusNoContent, nil, nil
	case "vm.resize":
		if !created {
			return http.StatusNotFound, nil, nil
		}
		if s.Resize429 > 0 {
			s.Resize429--
			return http.StatusTooManyRequests, []byte("cpu removal pending"), nil
		}
		var hook func()
		if v, ok := body["desired_vcpus"].(float64); ok {
			cpus, _ := s.config["cpus"].(map[string]any)
			cpus["boot_vcpus"] = v
			if s.OnResize != nil {
				f := s.OnResize
				hook = func() { f(int(v)) }
			}
		}
		if v, ok := body["desired_ram"].(float64); ok {
			mem, _ := s.config["memory"].(map[string]any)
			size, _ := mem["size"].(float64)
			hot, _ := mem["hotplug_size"].(float64)
			if v < size || v > size+hot {
				return http.StatusInternalServerError, []byte(fmt.Sprintf("InvalidMemorySize %v", v)), nil
			}
			mem["hotplugged_size"] = v - size
		}
		return http.StatusNoContent, nil, hook
	case "vm.shutdown":
		if !created {
			return http.StatusNotFound, nil, nil
		}
		s.state = "Shutdown"
		return http.StatusNoContent, nil, nil
	case "vm.pause", "vm.resume":
		if !running {
			return http.StatusMethodNotAllowed, nil, nil
		}
		s.state = map[string]string{"vm.pause": "Paused", "vm.resume": "Running"}[rec.Endpoint]
		return http.StatusNoContent, nil, nil
	case "vm.coredump":
		path, ok := strings.CutPrefix(str("destination_url"), "file://")
		if !ok || s.state != "Paused" {
			return http.StatusMethodNotAllowed, nil, nil
		}
		if err := os.WriteFile(path, []byte("\x7fELF fake core"), 0o600); err != nil {
			return http.StatusInternalServerError, []byte(err.Error()), nil
		}
		return http.StatusNoContent, nil, nil
	}
	return http.StatusInternalServerError, []byte("the fake does not serve " + rec.Endpoint), nil
}

package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/colo-runtime/colo/hypervisor"
)

// ManageSocket is the sandbox's management socket, in its directory: HTTP
// for operators and node tools (colo resize; metrics later). Only root
// may connect (the directory is the shim's, mode 0700).
const ManageSocket = "manage.sock"

// SizeReply is the answer of GET and PUT /resources: the VM's size.
type SizeReply struct {
	VCPUs    int `json:"vcpus"`
	MemoryMB int `json:"memory_mb"`
	// PluggedMB and BalloonMB tell how the memory is made up above the
	// base the VM booted with.
	PluggedMB int `json:"plugged_mb"`
	BalloonMB int `json:"balloon_mb"`
}

// ErrorReply is the body of every answer that is not 2xx.
type ErrorReply struct {
	Error string `json:"error"`
}

// maxRequestBody bounds what the server reads of a request.
const maxRequestBody = 64 << 10

// serveManagement starts the management server. It stops with the
// sandbox (stopManagement).
func (s *Sandbox) serveManagement(ctx context.Context) error {
	path := filepath.Join(s.dir, ManageSocket)
	l, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("management socket: %w", err)
	}
	mux := http.NewServeMux()
	s.routes(mux)
	srv := &http.Server{
		Handler: mux,
		// Every wait is bounded: a client that stalls loses its
		// connection, never holds a goroutine for good.
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		IdleTimeout:       time.Minute,
		BaseContext:       func(net.Listener) context.Context { return s.ctx },
	}
	s.manage = srv
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.G(ctx).WithError(err).Warn("management socket")
		}
	}()
	return nil
}

// routes are the management API, one line each (the handlers are in the
// files of what they serve).
func (s *Sandbox) routes(mux *http.ServeMux) {
	mux.HandleFunc("GET /resources", s.handleGetResources)
	mux.HandleFunc("PUT /resources", s.handlePutResources)
	mux.HandleFunc("GET /metrics", s.handleMetrics)
	mux.HandleFunc("POST /dump", s.handleDump)
	mux.HandleFunc("GET /console", s.handleConsole)
	if s.cfg.Runtime.Pprof {
		s.routePprof(mux)
	}
}

// stopManagement closes the management server and its socket.
func (s *Sandbox) stopManagement() {
	if s.manage == nil {
		return
	}
	// Close, not Shutdown: a resize in flight ends with the VM anyway.
	s.manage.Close()
	os.Remove(filepath.Join(s.dir, ManageSocket))
}

func (s *Sandbox) handleGetResources(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), time.Duration(s.cfg.Agent.CallTimeout))
	defer cancel()
	size, err := s.Size(ctx)
	reply(w, size, err)
}

func (s *Sandbox) handlePutResources(w http.ResponseWriter, r *http.Request) {
	var req Resources
	dec := json.NewDecoder(io.LimitReader(r.Body, maxRequestBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		reply(w, hypervisor.Size{}, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf(`PUT /resources: want {"vcpus": N, "memory_mb": N}: %v`, err)))
		return
	}
	if req == (Resources{}) {
		reply(w, hypervisor.Size{}, errdefs.ErrInvalidArgument.WithMessage(`PUT /resources: nothing to change: give "vcpus", "memory_mb" or both`))
		return
	}
	// Plugging vCPUs waits for the guest to bring each up: as long as
	// creating a container may take.
	ctx, cancel := context.WithTimeout(r.Context(), time.Duration(s.cfg.Agent.CreateTimeout))
	defer cancel()
	log.G(ctx).WithFields(log.Fields{"vcpus": req.VCPUs, "memory_mb": req.MemoryMB}).Info("resize asked on the management socket")
	size, err := s.Resize(ctx, req)
	reply(w, size, err)
}

// reply writes the size, or the error with the HTTP status of its kind.
func reply(w http.ResponseWriter, size hypervisor.Size, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		status := http.StatusInternalServerError
		switch {
		case errdefs.IsInvalidArgument(err):
			status = http.StatusBadRequest
		case errdefs.IsNotImplemented(err):
			status = http.StatusNotImplemented
		case errdefs.IsFailedPrecondition(err):
			status = http.StatusConflict
		case errors.Is(err, context.DeadlineExceeded):
			status = http.StatusGatewayTimeout
		}
		w.WriteHeader(status)
		json.NewEncoder(w).Encode(ErrorReply{Error: err.Error()})
		return
	}
	json.NewEncoder(w).Encode(SizeReply{VCPUs: size.VCPUs, MemoryMB: size.MemoryMB, PluggedMB: size.PluggedMB, BalloonMB: size.BalloonMB})
}

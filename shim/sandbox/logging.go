package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/containerd/log"
)

// loggerReadyTimeout bounds how long a binary:// logger may take to say it
// is ready.
const loggerReadyTimeout = 10 * time.Second

// loggerExitTimeout bounds how long a logger may take to exit after
// SIGTERM (the runc shim's 12s).
const loggerExitTimeout = 12 * time.Second

// owner names whose output a log URI receives: the logging binary gets it
// in CONTAINER_ID and CONTAINER_NAMESPACE, as with containerd's runc shim.
type owner struct {
	id, namespace string
}

// isBinaryScheme tells a logging binary's URI: binary-v2:// differs only in
// that the binary must write a byte before it closes its ready pipe.
func isBinaryScheme(scheme string) bool {
	return scheme == "binary" || scheme == "binary-v2"
}

// openLogFile serves file:// (stdout and stderr appended to one file).
func openLogFile(u *url.URL) (stdout, stderr io.WriteCloser, err error) {
	if !filepath.IsAbs(u.Path) {
		return nil, nil, fmt.Errorf("log URI %s: want an absolute path", u)
	}
	if err := os.MkdirAll(filepath.Dir(u.Path), 0o755); err != nil {
		return nil, nil, err
	}
	out, err := os.OpenFile(u.Path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return nil, nil, err
	}
	errf, err := os.OpenFile(u.Path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		out.Close()
		return nil, nil, err
	}
	return out, errf, nil
}

// logger is a running binary:// logging process: containerd's logging
// protocol gives it stdout on fd 3, stderr on fd 4 and a pipe on fd 5 that
// it closes once ready.
type logger struct {
	cmd    *exec.Cmd
	exited chan error
}

// startLogger serves binary:// and binary-v2:// and returns the writers
// for the process's output. Like the runc shim, it gives the binary the
// query's key/value pairs as arguments and only CONTAINER_ID and
// CONTAINER_NAMESPACE as its environment.
func startLogger(ctx context.Context, u *url.URL, o owner) (_ *logger, stdout, stderr io.WriteCloser, retErr error) {
	var args []string
	for k, vs := range u.Query() {
		args = append(args, k)
		if len(vs) > 0 {
			args = append(args, vs[0])
		}
	}
	var closers []io.Closer
	defer func() {
		for _, c := range closers {
			c.Close()
		}
	}()
	pipe := func() (r, w *os.File, err error) {
		r, w, err = os.Pipe()
		if err == nil {
			closers = append(closers, r)
		}
		return r, w, err
	}
	outR, outW, err := pipe()
	if err != nil {
		return nil, nil, nil, err
	}
	errR, errW, err := pipe()
	if err != nil {
		outW.Close()
		return nil, nil, nil, err
	}
	readyR, readyW, err := pipe()
	if err != nil {
		outW.Close()
		errW.Close()
		return nil, nil, nil, err
	}
	defer func() {
		if retErr != nil {
			outW.Close()
			errW.Close()
		}
	}()
	cmd := exec.Command(u.Path, args...)
	cmd.Env = []string{"CONTAINER_ID=" + o.id, "CONTAINER_NAMESPACE=" + o.namespace}
	cmd.ExtraFiles = []*os.File{outR, errR, readyW}
	err = cmd.Start()
	readyW.Close()
	if err != nil {
		return nil, nil, nil, fmt.Errorf("start logging binary %s: %w", u.Path, err)
	}
	l := &logger{cmd: cmd, exited: make(chan error, 1)}
	go func() { l.exited <- cmd.Wait() }()
	ready := make(chan error, 1)
	go func() {
		n, err := readyR.Read(make([]byte, 1))
		if errors.Is(err, io.EOF) {
			err = nil
		}
		if err == nil && n == 0 && u.Scheme == "binary-v2" {
			err = errors.New("closed its ready pipe without writing a byte")
		}
		ready <- err
	}()
	select {
	case err = <-ready:
	case err = <-l.exited:
		err = fmt.Errorf("exited before it was ready: %v", err)
	case <-time.After(loggerReadyTimeout):
		err = fmt.Errorf("not ready within %s", loggerReadyTimeout)
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err != nil {
		_ = cmd.Process.Kill()
		return nil, nil, nil, fmt.Errorf("logging binary %s: %w", u.Path, err)
	}
	log.G(ctx).WithField("logger", u.Path).Debug("logging binary ready")
	return l, outW, errW, nil
}

// stop ends the logger once its input is closed, as the runc shim does:
// SIGTERM (loggers built on containerd's logging.Run still copy to EOF),
// then SIGKILL if it has not exited within loggerExitTimeout.
func (l *logger) stop() {
	_ = l.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-l.exited:
	case <-time.After(loggerExitTimeout):
		_ = l.cmd.Process.Kill()
		<-l.exited
	}
}

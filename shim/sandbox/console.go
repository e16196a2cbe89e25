package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/colo-runtime/colo/hypervisor"
)

// ConsoleProtocol is the Upgrade token of GET /console: after "101
// Switching Protocols" the connection carries the bytes of the guest's
// debug console (a shell on a terminal) both ways, as they are.
const ConsoleProtocol = "colo-console"

// ConsoleOffMessage is the answer of GET /console when the VM has no
// console.
const ConsoleOffMessage = "the debug console is off: set agent.debug_console = true in the colo config (new sandboxes get it)"

// consoleDialTimeout bounds connecting to the console.
const consoleDialTimeout = 10 * time.Second

// handleConsole connects the client to the guest's debug console: the HTTP
// connection is upgraded (Connection: Upgrade, Upgrade: colo-console) and
// spliced with the VM's console until either side closes or the sandbox
// stops. The console is a root shell in the guest: the management socket is
// root's alone, and each session is logged.
func (s *Sandbox) handleConsole(w http.ResponseWriter, r *http.Request) {
	fail := func(err error) { reply(w, hypervisor.Size{}, err) }
	if !headerHas(r.Header, "Connection", "upgrade") || !headerHas(r.Header, "Upgrade", ConsoleProtocol) {
		fail(errdefs.ErrInvalidArgument.WithMessage("GET /console: want Connection: Upgrade and Upgrade: " + ConsoleProtocol))
		return
	}
	if !s.alive() {
		fail(errdefs.ErrFailedPrecondition.WithMessage(fmt.Sprintf("sandbox %s: its VM is not running", s.id)))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), consoleDialTimeout)
	guest, err := s.vm.DialConsole(ctx)
	cancel()
	switch {
	case errors.Is(err, hypervisor.ErrNoConsole):
		fail(errdefs.ErrFailedPrecondition.WithMessage(ConsoleOffMessage))
		return
	case errdefs.IsConflict(err):
		// One session at a time; reply maps only a failed
		// precondition to 409.
		fail(errdefs.ErrFailedPrecondition.WithMessage(err.Error()))
		return
	case err != nil:
		fail(err)
		return
	}
	hj, ok := w.(http.Hijacker)
	if !ok {
		guest.Close()
		fail(errors.New("GET /console: the connection cannot be taken over"))
		return
	}
	client, buf, err := hj.Hijack()
	if err != nil {
		guest.Close()
		log.G(r.Context()).WithError(err).Warn("console: hijack")
		return
	}
	// The server's read and write deadlines bound requests, not a
	// session: the splice has its own ends.
	client.SetDeadline(time.Time{})
	if _, err := io.WriteString(client, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "+ConsoleProtocol+"\r\n\r\n"); err != nil {
		client.Close()
		guest.Close()
		return
	}
	logger := log.G(r.Context()).WithField("sandbox", s.id)
	logger.Info("debug console: session opened on the management socket")
	begin := time.Now()
	// What the client sent after its request may sit in the server's
	// buffer already.
	from := io.MultiReader(io.LimitReader(buf.Reader, int64(buf.Reader.Buffered())), client)
	spliceConsole(client, from, guest, s.stopping, s.vm.Done())
	logger.WithField("took", time.Since(begin).Round(time.Millisecond)).Info("debug console: session closed")
}

// spliceConsole copies client to guest and guest to client until either side
// closes (or fails) or a stop channel is closed; then both are closed and
// it returns once both copies ended.
func spliceConsole(client net.Conn, from io.Reader, guest net.Conn, stops ...<-chan struct{}) {
	ended := make(chan struct{})
	var once sync.Once
	end := func() { once.Do(func() { close(ended) }) }
	var wg sync.WaitGroup
	wg.Go(func() {
		io.Copy(guest, from)
		end()
	})
	wg.Go(func() {
		io.Copy(client, guest)
		end()
	})
	stopped := make(chan struct{})
	for _, stop := range stops {
		go func() {
			select {
			case <-stop:
				end()
			case <-stopped:
			}
		}()
	}
	<-ended
	close(stopped)
	client.Close()
	guest.Close()
	wg.Wait()
}

// headerHas tells whether a comma-separated header has the token, as HTTP
// compares them: without case.
func headerHas(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// Package splice relays two byte streams that can close their sending
// side alone, for port-forwarding: the shim's end in the pod's network
// namespace and the agent's in the guest use the same relay.
package splice

import (
	"io"
	"sync"

	"github.com/hashicorp/yamux"
)

// HalfConn is a connection whose sending side closes alone.
type HalfConn interface {
	io.ReadWriteCloser
	CloseWrite() error
}

// Stream is a yamux stream as a HalfConn: its Close sends FIN and leaves
// it readable, which is a half-close; yamux frees it once both sides
// closed (or after its StreamCloseTimeout, with a reset).
type Stream struct{ *yamux.Stream }

func (s Stream) CloseWrite() error { return s.Stream.Close() }

// Splice copies a to b and b to a until both directions ended: the end of
// one (EOF) is passed on as a half-close, so a client that shut down its
// sending side still gets the whole answer; a failed direction closes both
// connections, which ends the other.
func Splice(a, b HalfConn) {
	var wg sync.WaitGroup
	var once sync.Once
	abort := func() {
		once.Do(func() {
			a.Close()
			b.Close()
		})
	}
	one := func(dst, src HalfConn) {
		defer wg.Done()
		if _, err := io.Copy(dst, src); err != nil {
			abort()
			return
		}
		if dst.CloseWrite() != nil {
			abort()
		}
	}
	wg.Add(2)
	go one(a, b)
	go one(b, a)
	wg.Wait()
	abort()
}

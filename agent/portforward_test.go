package agent

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/yamux"
)

// upperServer answers each connection with what it read, upper-cased,
// once the client shut down its sending side: an answer only a relay that
// passes the half-close on (and keeps the other direction open) delivers.
func upperServer(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				b, _ := io.ReadAll(c)
				c.Write([]byte(strings.ToUpper(string(b))))
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port
}

// hostSession runs forwardSession on one end of a pipe and returns the
// host's multiplexer on the other; the session ends with the test.
func hostSession(t *testing.T) *yamux.Session {
	t.Helper()
	host, guest := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		forwardSession(ctx, guest, dialLoopback)
	}()
	sess, err := yamux.Client(host, forwardYamuxConfig())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sess.Close()
		cancel()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Error("forwardSession did not return")
		}
	})
	return sess
}

func openPort(t *testing.T, sess *yamux.Session, port int) (*yamux.Stream, byte) {
	t.Helper()
	st, err := sess.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	st.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := st.Write(binary.BigEndian.AppendUint16(nil, uint16(port))); err != nil {
		t.Fatal(err)
	}
	var status [1]byte
	if _, err := io.ReadFull(st, status[:]); err != nil {
		t.Fatal(err)
	}
	return st, status[0]
}

func TestForwardHalfCloseAndConcurrency(t *testing.T) {
	port := upperServer(t)
	sess := hostSession(t)
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, status := openPort(t, sess, port)
			defer st.Close()
			if status != forwardOK {
				t.Errorf("status %d", status)
				return
			}
			msg := fmt.Sprintf("hello %d %s", i, strings.Repeat("x", 100000))
			if _, err := st.Write([]byte(msg)); err != nil {
				t.Error(err)
				return
			}
			st.Close() // half-close: the answer must still come
			b, err := io.ReadAll(st)
			if err != nil || string(b) != strings.ToUpper(msg) {
				t.Errorf("stream %d: %d bytes, %v; want the upper-cased request", i, len(b), err)
			}
		}()
	}
	wg.Wait()
}

func TestForwardRefused(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close() // nothing listens there now
	sess := hostSession(t)
	st, status := openPort(t, sess, port)
	defer st.Close()
	if status != forwardRefused {
		t.Fatalf("status %d, want refused", status)
	}
	if b, err := io.ReadAll(st); len(b) != 0 || err != nil {
		t.Errorf("after the status: %q, %v; want EOF", b, err)
	}
}

// A host that never sends the port costs only that stream: it is closed
// after forwardHeaderTimeout; others keep working meanwhile.
func TestForwardSilentStream(t *testing.T) {
	port := upperServer(t)
	sess := hostSession(t)
	silent, err := sess.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	silent.Write([]byte{0}) // half a header
	st, status := openPort(t, sess, port)
	if status != forwardOK {
		t.Fatalf("status %d", status)
	}
	st.Write([]byte("ok"))
	st.Close()
	if b, _ := io.ReadAll(st); string(b) != "OK" {
		t.Errorf("answer %q beside a silent stream", b)
	}
}

package sandbox

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/hashicorp/yamux"
	"github.com/vishvananda/netns"
)

// fakeGuest serves the port-forward protocol as the agent does, on the
// guest's end of a pipe: each stream's port picks the answer. Port 1 is
// refused; port 2 never answers (a stalled guest); any other answers with
// what it read, upper-cased, after the host's half-close.
func fakeGuest(t *testing.T, conn net.Conn) {
	sess, err := yamux.Server(conn, forwardYamuxConfig())
	if err != nil {
		t.Error(err)
		return
	}
	go func() {
		defer sess.Close()
		for {
			st, err := sess.AcceptStream()
			if err != nil {
				return
			}
			go func() {
				defer st.Close()
				var hdr [2]byte
				if _, err := io.ReadFull(st, hdr[:]); err != nil {
					return
				}
				switch binary.BigEndian.Uint16(hdr[:]) {
				case 1:
					st.Write([]byte{1})
					return
				case 2:
					io.Copy(io.Discard, st)
					return
				}
				st.Write([]byte{forwardOK})
				b, _ := io.ReadAll(st)
				st.Write([]byte(strings.ToUpper(string(b))))
			}()
		}
	}()
}

// newTestForwarder serves a forwarder on a host listener; the "original
// port" of each connection is what the client wrote first (one byte).
func newTestForwarder(t *testing.T) (*portForwarder, *int) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	dials := 0
	orig := func(c net.Conn) (int, error) {
		var b [1]byte
		if _, err := io.ReadFull(c, b[:]); err != nil {
			return 0, err
		}
		return int(b[0]), nil
	}
	dial := func(context.Context) (net.Conn, error) {
		mu.Lock()
		dials++
		mu.Unlock()
		host, guest := net.Pipe()
		fakeGuest(t, guest)
		return host, nil
	}
	f := newPortForwarder(context.Background(), ln, orig, dial)
	t.Cleanup(f.close)
	return f, &dials
}

func roundTrip(addr string, port byte, msg string) (string, error) {
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.Write(append([]byte{port}, msg...)); err != nil {
		return "", err
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	return string(b), err
}

func TestPortForwarderHalfCloseConcurrent(t *testing.T) {
	f, dials := newTestForwarder(t)
	addr := f.ln.Addr().String()
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := strings.Repeat("abc", 50000+i)
			got, err := roundTrip(addr, 80, msg)
			if err != nil || got != strings.ToUpper(msg) {
				t.Errorf("connection %d: %d bytes, %v", i, len(got), err)
			}
		}()
	}
	wg.Wait()
	if *dials != 1 {
		t.Errorf("%d channel dials, want one session for all", *dials)
	}
}

func TestPortForwarderRefused(t *testing.T) {
	f, _ := newTestForwarder(t)
	got, err := roundTrip(f.ln.Addr().String(), 1, "x")
	if err == nil && got != "" {
		t.Errorf("refused port: %q; want nothing", got)
	}
	// The session is still good for others.
	if got, err := roundTrip(f.ln.Addr().String(), 80, "y"); err != nil || got != "Y" {
		t.Errorf("after a refused port: %q, %v", got, err)
	}
}

// close ends connections in progress, and later ones are refused.
func TestPortForwarderClose(t *testing.T) {
	f, _ := newTestForwarder(t)
	addr := f.ln.Addr().String()
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte{80, 'z'}) // stays open: no half-close
	time.Sleep(100 * time.Millisecond)
	done := make(chan struct{})
	go func() { f.close(); close(done) }()
	select {
	case <-done:
	case <-time.After(forwardStopWait + time.Second):
		t.Fatal("close did not return")
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(c); err != nil && !errors.Is(err, net.ErrClosed) && !strings.Contains(err.Error(), "reset") {
		t.Errorf("connection after close: %v", err)
	}
	if _, err := net.Dial("tcp4", addr); err == nil {
		t.Error("the listener still accepts after close")
	}
}

// TestPortForwardNamespace checks the redirect in a network namespace of
// its own: a connection to 127.0.0.1:<any port> there reaches the
// forwarder with its original port, and close removes the table. Root
// only.
func TestPortForwardNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	name := fmt.Sprintf("colo-pf-test-%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Skipf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up: %v: %s", err, out)
	}
	nsPath := "/var/run/netns/" + name
	dial := func(context.Context) (net.Conn, error) {
		host, guest := net.Pipe()
		fakeGuest(t, guest)
		return host, nil
	}
	f, err := listenPortForward(context.Background(), nsPath, dial)
	if err != nil {
		t.Fatal(err)
	}
	own := f.ln.Addr().(*net.TCPAddr).Port
	for _, port := range []int{8080, own, 1} {
		got, err := inNamespaceRoundTrip(nsPath, port, "hello")
		want := "HELLO"
		if port == 1 {
			want = ""
		}
		if got != want {
			t.Errorf("port %d: %q, %v; want %q", port, got, err, want)
		}
	}
	f.close()
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		t.Fatal(err)
	}
	tables, err := c.ListTables()
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range tables {
		if tb.Name == forwardTable {
			t.Errorf("table %s left after close", forwardTable)
		}
	}
	if got, err := inNamespaceRoundTrip(nsPath, 8080, "x"); err == nil {
		t.Errorf("after close: %q, want no connection", got)
	}
}

// inNamespaceRoundTrip dials 127.0.0.1:port from the namespace, sends msg,
// half-closes and reads the answer.
func inNamespaceRoundTrip(nsPath string, port int, msg string) (string, error) {
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return "", err
	}
	defer ns.Close()
	runtime.LockOSThread()
	orig, _ := netns.Get()
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		runtime.UnlockOSThread()
		return "", err
	}
	c, err := net.DialTimeout("tcp4", fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
	if err := netns.Set(orig); err == nil {
		runtime.UnlockOSThread()
	}
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write([]byte(msg))
	c.(*net.TCPConn).CloseWrite()
	b, err := io.ReadAll(c)
	return string(b), err
}

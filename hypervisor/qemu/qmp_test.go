package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

const greeting = `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}`

type request struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments"`
	ID        json.RawMessage `json:"id"`
}

// fakeQEMU is the QEMU end of a socketpair: it sends greet, then hands
// every request to serve, which writes whatever replies and events it
// likes. serve returning false closes the connection.
type fakeQEMU struct {
	conn net.Conn
	w    *bufio.Writer
	mu   sync.Mutex
}

func (f *fakeQEMU) send(format string, args ...any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fmt.Fprintf(f.w, format+"\r\n", args...)
	f.w.Flush()
}

func (f *fakeQEMU) event(name string) {
	f.send(`{"timestamp": {"seconds": 1700000000, "microseconds": 5}, "event": %q, "data": {"n": 1}}`, name)
}

func socketpair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		conns[i] = c
	}
	return conns[0], conns[1]
}

func startFake(t *testing.T, greet string, serve func(f *fakeQEMU, r request) bool) net.Conn {
	t.Helper()
	client, server := socketpair(t)
	f := &fakeQEMU{conn: server, w: bufio.NewWriter(server)}
	done := make(chan struct{})
	t.Cleanup(func() {
		server.Close()
		<-done
	})
	go func() {
		defer close(done)
		defer server.Close()
		if greet == "" {
			return
		}
		f.send("%s", greet)
		dec := json.NewDecoder(server)
		for {
			var r request
			if err := dec.Decode(&r); err != nil {
				return
			}
			if r.Execute == "qmp_capabilities" {
				f.send(`{"return": {}, "id": %s}`, r.ID)
				continue
			}
			if !serve(f, r) {
				return
			}
		}
	}()
	return client
}

func TestQMPGreeting(t *testing.T) {
	for _, tc := range []struct {
		name, greet, want string
	}{
		{"closed", "", "qmp connection closed"},
		{"not json", "hello", "bad message"},
		{"not a greeting", `{"return": {}}`, "no QMP greeting"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn := startFake(t, tc.greet, nil)
			_, err := NewQMP(context.Background(), conn, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("NewQMP: got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

func TestQMPGreetingContext(t *testing.T) {
	client, _ := socketpair(t) // a QEMU that never greets
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := NewQMP(ctx, client, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("NewQMP: got %v, want context.Canceled", err)
	}
}

func TestQMPExecute(t *testing.T) {
	var (
		mu     sync.Mutex
		events []string
	)
	// Replies come out of order, after events: "slow" is answered only
	// after "fast" has been asked and answered.
	var held []request
	holding := make(chan struct{})
	conn := startFake(t, greeting, func(f *fakeQEMU, r request) bool {
		switch r.Execute {
		case "slow":
			held = append(held, r)
			f.event("FIRST")
			close(holding)
		case "fast":
			f.event("SECOND")
			f.send(`{"return": {"who": "fast"}, "id": %s}`, r.ID)
			for _, h := range held {
				f.send(`{"return": {"who": "slow"}, "id": %s}`, h.ID)
			}
			held = nil
		case "query-status":
			f.send(`{"return": {"status": "running", "singlestep": false, "running": true}, "id": %s}`, r.ID)
		case "echo":
			f.send(`{"return": %s, "id": %s}`, r.Arguments, r.ID)
		default:
			f.send(`{"error": {"class": "CommandNotFound", "desc": "The command %s has not been found"}, "id": %s}`, r.Execute, r.ID)
		}
		return true
	})
	q, err := NewQMP(context.Background(), conn, func(e Event) {
		mu.Lock()
		events = append(events, e.Name+":"+string(e.Data))
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	ctx := context.Background()

	slow := make(chan string, 1)
	go func() {
		raw, err := q.Execute(ctx, "slow", nil)
		if err != nil {
			slow <- err.Error()
			return
		}
		slow <- string(raw)
	}()
	<-holding // "fast" must not overtake "slow"
	raw, err := q.Execute(ctx, "fast", nil)
	if err != nil || string(raw) != `{"who": "fast"}` {
		t.Fatalf("fast: got %s, %v", raw, err)
	}
	if got := <-slow; got != `{"who": "slow"}` {
		t.Fatalf("slow: got %s", got)
	}

	for _, tc := range []struct {
		command string
		args    any
		want    string
		wantErr string
	}{
		{command: "echo", args: map[string]int{"a": 1}, want: `{"a":1}`},
		{command: "nope", wantErr: "qmp nope: CommandNotFound: The command nope has not been found"},
	} {
		raw, err := q.Execute(ctx, tc.command, tc.args)
		if tc.wantErr != "" {
			var qe *QMPError
			if !errors.As(err, &qe) || err.Error() != tc.wantErr {
				t.Errorf("%s: got %v, want QMPError %q", tc.command, err, tc.wantErr)
			}
			continue
		}
		if err != nil || string(raw) != tc.want {
			t.Errorf("%s: got %s, %v, want %s", tc.command, raw, err, tc.want)
		}
	}

	st, err := q.QueryStatus(ctx)
	if err != nil || st.Status != "running" || !st.Running {
		t.Fatalf("QueryStatus: got %+v, %v", st, err)
	}

	mu.Lock()
	defer mu.Unlock()
	if len(events) != 2 || events[0] != `FIRST:{"n": 1}` || events[1] != `SECOND:{"n": 1}` {
		t.Fatalf("events: got %q", events)
	}
}

func TestQMPQuitAndClose(t *testing.T) {
	for _, tc := range []struct {
		name  string
		reply bool // QEMU sometimes answers quit before it closes, sometimes not
	}{
		{"reply then close", true},
		{"close without reply", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn := startFake(t, greeting, func(f *fakeQEMU, r request) bool {
				if r.Execute != "quit" {
					return true // never answered
				}
				if tc.reply {
					f.send(`{"return": {}, "id": %s}`, r.ID)
					f.event("SHUTDOWN")
				}
				return false
			})
			q, err := NewQMP(context.Background(), conn, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer q.Close()

			// A command in flight when the connection closes fails.
			pending := make(chan error, 1)
			go func() {
				_, err := q.Execute(context.Background(), "hang", nil)
				pending <- err
			}()
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			if _, err := q.Execute(ctx, "hang", nil); !errors.Is(err, context.Canceled) {
				t.Fatalf("Execute with a cancelled context: got %v", err)
			}

			if err := q.Quit(context.Background()); err != nil {
				t.Fatalf("Quit: %v", err)
			}
			<-q.Done()
			if err := <-pending; !errors.Is(err, errQMPClosed) {
				t.Fatalf("command in flight: got %v, want errQMPClosed", err)
			}
			if _, err := q.Execute(context.Background(), "query-status", nil); !errors.Is(err, errQMPClosed) {
				t.Fatalf("after close: got %v, want errQMPClosed", err)
			}
		})
	}
}

package sandbox

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/colo-runtime/colo/agentproto"
)

func TestAgentTimeoutsBound(t *testing.T) {
	at := agentTimeouts{call: time.Second, create: time.Minute}
	for _, tc := range []struct {
		method string
		want   time.Duration
		key    string
	}{
		{"WaitProcess", 0, ""},
		{"ReadStdout", 0, ""},
		{"ReadStderr", 0, ""},
		{"GetOOMEvent", 0, ""},
		{"WriteStdin", 0, ""},
		{"CreateContainer", time.Minute, "agent.create_timeout"},
		{"StartContainer", time.Minute, "agent.create_timeout"},
		{"ExecProcess", time.Minute, "agent.create_timeout"},
		{"RemoveContainer", time.Minute, "agent.create_timeout"},
		{"CreateSandbox", time.Minute, "agent.create_timeout"},
		{"SignalProcess", time.Second, "agent.call_timeout"},
		{"Check", time.Second, "agent.call_timeout"},
		{"StatsContainer", time.Second, "agent.call_timeout"},
		{"SomethingNew", time.Second, "agent.call_timeout"},
	} {
		d, key := at.bound(tc.method)
		if d != tc.want || key != tc.key {
			t.Errorf("bound(%s) = %s %q, want %s %q", tc.method, d, key, tc.want, tc.key)
		}
	}
}

// silentAgent is an agent connection whose guest reads nothing and answers
// nothing, as a frozen guest.
func silentAgent(t *testing.T, at agentTimeouts) (*agentConn, chan struct{}) {
	t.Helper()
	host, guest := net.Pipe()
	closed := make(chan struct{})
	a := newAgentConn(host, at, func() { close(closed) })
	t.Cleanup(func() {
		a.Close()
		guest.Close()
	})
	return a, closed
}

// TestAgentCallsBounded: against a guest that never answers, a call that
// should answer at once fails with its deadline and names it; a call that
// waits for the guest waits for as long as its caller wants.
func TestAgentCallsBounded(t *testing.T) {
	// net.Pipe has no buffer: a guest that does not read blocks every
	// write, so this also shows that a write cannot hold the connection
	// forever.
	a, closed := silentAgent(t, agentTimeouts{call: 200 * time.Millisecond, create: time.Minute})
	_, err := a.SignalProcess(context.Background(), &agentproto.SignalProcessRequest{ContainerId: "c1", Signal: 9})
	if err == nil {
		t.Fatal("SignalProcess to a silent guest succeeded")
	}
	t.Log(err)
	// The blocked write broke the connection: the sandbox hears of it.
	select {
	case <-closed:
	case <-time.After(time.Minute):
		t.Fatal("the connection did not close after a write that could not finish")
	}
}

// TestAgentCallDeadlineNamed: a guest that reads but never answers.
func TestAgentCallDeadlineNamed(t *testing.T) {
	host, guest := net.Pipe()
	go func() {
		buf := make([]byte, 4096)
		for {
			if _, err := guest.Read(buf); err != nil {
				return
			}
		}
	}()
	a := newAgentConn(host, agentTimeouts{call: 200 * time.Millisecond, create: time.Minute}, nil)
	defer a.Close()
	defer guest.Close()

	_, err := a.StatsContainer(context.Background(), &agentproto.StatsContainerRequest{ContainerId: "c1"})
	if err == nil || !strings.Contains(err.Error(), "agent.call_timeout") || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("StatsContainer: %v, want a deadline naming agent.call_timeout", err)
	}

	// A waiting call has no deadline of its own: it ends with its caller.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, err = a.WaitProcess(ctx, &agentproto.WaitProcessRequest{ContainerId: "c1"})
	if !errors.Is(err, context.DeadlineExceeded) || strings.Contains(err.Error(), "agent.") {
		t.Errorf("WaitProcess: %v, want the caller's deadline", err)
	}
}

package agent_test

import (
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/ttrpc"

	"github.com/colo-runtime/colo/agentproto"
)

// TestServeAfterFailedConn: a connection that fails (cut mid-message, as
// the guest sees one a vsock transport reset ends) costs only itself; the
// service goes on accepting and answering, on the other connections too.
func TestServeAfterFailedConn(t *testing.T) {
	a := startAgent(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sock := filepath.Join(filepath.Dir(a.stateDir), "agent.sock")
	for _, cut := range []struct {
		name string
		sent []byte
	}{
		{"nothing sent", nil},
		{"cut in a header", []byte{0, 0, 0}},
		// A header announcing a 100-byte request, and 3 bytes of it.
		{"cut in a request", []byte{0, 0, 0, 100, 0, 0, 0, 1, 1, 0, 1, 2, 3}},
	} {
		conn, err := (&net.Dialer{}).DialContext(ctx, "unix", sock)
		if err != nil {
			t.Fatalf("%s: %v", cut.name, err)
		}
		if _, err := conn.Write(cut.sent); err != nil {
			t.Fatalf("%s: %v", cut.name, err)
		}
		conn.Close()

		conn, err = (&net.Dialer{}).DialContext(ctx, "unix", sock)
		if err != nil {
			t.Fatalf("after a connection %s: dial: %v", cut.name, err)
		}
		client := ttrpc.NewClient(conn)
		_, err = agentproto.NewAgentClient(client).Check(ctx, &agentproto.CheckRequest{})
		client.Close()
		if err != nil {
			t.Fatalf("after a connection %s: Check on a new connection: %v", cut.name, err)
		}
		if _, err := a.Check(ctx, &agentproto.CheckRequest{}); err != nil {
			t.Fatalf("after a connection %s: Check on the first connection: %v", cut.name, err)
		}
	}
}

package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/colo-runtime/colo/testbed"
)

// portForwardPage is what the pod's HTTP server serves.
const portForwardPage = "colo-port-forward-page"

// TestPortForward reaches an HTTP server in a pod through CRI PortForward
// (`crictl port-forward`, which drives containerd's streaming server as
// kubelet's `kubectl port-forward` does), for each handler. The server
// listens on the container's 127.0.0.1 only: with colo that is the guest's
// loopback, reached through the shim's redirect and the agent's relay.
func TestPortForward(t *testing.T) {
	crictl, err := cd.CrictlCommand()
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range criHandlers {
		t.Run(h.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), criTimeout)
			defer cancel()
			rs := criRuntime(t)
			p := runPod(ctx, t, rs, "port-forward-"+h.name, h.handler)
			id := p.startWith(ctx, t, "httpd", func(c *runtimeapi.ContainerConfig) {
				c.Command = []string{"sh", "-c", "mkdir -p /www && echo " + portForwardPage +
					" >/www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /www"}
			})

			// crictl (client-go) ends port-forwarding at the first
			// connection the pod refuses: wait for the server first.
			for i := 0; ; i++ {
				out, _, code := execSync(ctx, t, rs, id, "wget", "-q", "-O-", "http://127.0.0.1:8080/")
				if code == 0 && strings.Contains(out, portForwardPage) {
					break
				}
				if i == 60 {
					t.Fatalf("the server in the pod does not answer: %q", out)
				}
				time.Sleep(500 * time.Millisecond)
			}
			addr := startPortForward(ctx, t, crictl, p.id, 8080)
			var body string
			deadline := time.Now().Add(30 * time.Second)
			for {
				body, err = httpGet(ctx, addr, false)
				if err == nil && strings.Contains(body, portForwardPage) || time.Now().After(deadline) {
					break
				}
				time.Sleep(500 * time.Millisecond)
			}
			if err != nil || !strings.Contains(body, portForwardPage) {
				t.Fatalf("GET through port-forward: %q, %v; want the page", body, err)
			}

			// A client that shuts down its sending side after the
			// request still gets the whole answer.
			if body, err := httpGet(ctx, addr, true); err != nil || !strings.Contains(body, portForwardPage) {
				t.Errorf("GET with a half-closed request: %q, %v; want the page", body, err)
			}

			// Many at once.
			const n = 20
			var wg sync.WaitGroup
			errs := make(chan error, n)
			for i := range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					body, err := httpGet(ctx, addr, i%2 == 0)
					if err == nil && !strings.Contains(body, portForwardPage) {
						err = fmt.Errorf("answer %q", body)
					}
					errs <- err
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Errorf("concurrent GET: %v", err)
				}
			}

			// A port nothing listens on fails the connection rather
			// than hanging it.
			closed := startPortForward(ctx, t, crictl, p.id, 8081)
			if body, err := httpGet(ctx, closed, false); err == nil && strings.Contains(body, portForwardPage) {
				t.Errorf("GET to a closed port: %q; want an error", body)
			}
		})
	}
}

// startPortForward runs `crictl port-forward` for port of the pod on a
// local port it picks, until the test ends, and returns the local address.
func startPortForward(ctx context.Context, t *testing.T, crictl []string, podID string, port int) string {
	t.Helper()
	ctx, cancel := context.WithCancel(ctx)
	args := append(append([]string(nil), crictl[1:]...), "port-forward", podID, fmt.Sprintf(":%d", port))
	cmd := exec.CommandContext(ctx, crictl[0], args...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		cmd.Wait()
	})
	// "Forwarding from 127.0.0.1:NNNN -> 8080"
	re := regexp.MustCompile(`Forwarding from (127\.0\.0\.1:\d+) ->`)
	found := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				select {
				case found <- m[1]:
				default:
				}
			}
		}
		io.Copy(io.Discard, out)
	}()
	select {
	case addr := <-found:
		return addr
	case <-time.After(testbed.CRITimeout):
		t.Fatalf("crictl port-forward: no local port; stderr: %s", stderr.String())
	case <-ctx.Done():
		t.Fatalf("crictl port-forward: %v; stderr: %s", ctx.Err(), stderr.String())
	}
	return ""
}

// httpGet sends GET / as HTTP/1.0 on a new connection and returns the whole
// answer; with halfClose the client shuts down its sending side after the
// request, before reading.
func httpGet(ctx context.Context, addr string, halfClose bool) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	if _, err := io.WriteString(conn, "GET / HTTP/1.0\r\nHost: localhost\r\n\r\n"); err != nil {
		return "", err
	}
	if halfClose {
		if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
			return "", err
		}
	}
	b, err := io.ReadAll(conn)
	if err == nil && !strings.HasPrefix(string(b), "HTTP/1.") {
		err = fmt.Errorf("not an HTTP answer: %q", b)
	}
	return string(b), err
}

package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/colo-runtime/colo/shim/sandbox"
)

// resizeTimeout bounds a resize: plugging vCPUs waits for the guest to
// bring each up.
const resizeTimeout = 2 * time.Minute

// resize sets a sandbox's vCPUs or memory through its management socket.
func resize(ctx context.Context, e *env, args []string) error {
	fs := flag.NewFlagSet("resize", flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	cpus := fs.Int("cpus", 0, "vCPUs the VM is to have")
	memory := fs.String("memory", "", "memory the VM is to have: bytes, or with a suffix Ki, Mi, Gi, Ti (or k, M, G, T)")
	ref, err := parseWithSandbox(fs, args)
	if err != nil {
		return err
	}
	req := sandbox.Resources{VCPUs: *cpus}
	if *cpus < 0 {
		return usageError("--cpus %d: want a positive number", *cpus)
	}
	if *memory != "" {
		b, err := parseBytes(*memory)
		if err != nil {
			return usageError("--memory %s: %v", quoted(*memory), err)
		}
		req.MemoryMB = int((b + 1<<20 - 1) >> 20)
	}
	if req == (sandbox.Resources{}) {
		return usageError("give --cpus, --memory or both")
	}
	st, err := findSandbox(e.cfg.Runtime.StateDir, ref)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, resizeTimeout)
	defer cancel()
	var size sandbox.SizeReply
	if err := call(ctx, st.Dir, http.MethodPut, "/resources", req, &size); err != nil {
		return fmt.Errorf("sandbox %s: %w", st.ID, err)
	}
	fmt.Fprintf(e.stdout, "sandbox %s: %d vCPUs, %d MiB\n", st.ID, size.VCPUs, size.MemoryMB)
	return nil
}

// call makes a request of a sandbox's management socket and decodes the
// answer into out; an answer that is not 2xx is the error it names.
func call(ctx context.Context, dir, method, path string, body, out any) error {
	client, sock := manageClient(dir)
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://sandbox"+path, r)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("management socket %s: %w", sock, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("management socket %s: %w", sock, err)
	}
	if resp.StatusCode/100 != 2 {
		var e sandbox.ErrorReply
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			return fmt.Errorf("%s", e.Error)
		}
		return fmt.Errorf("%s %s: %s", method, path, resp.Status)
	}
	return json.Unmarshal(b, out)
}

// parseBytes reads a size as Kubernetes writes quantities: a whole number
// of bytes, with an optional binary (Ki, Mi, Gi, Ti) or decimal (k, M, G,
// T) suffix.
func parseBytes(s string) (int64, error) {
	units := []struct {
		suffix string
		factor int64
	}{
		{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40},
		{"k", 1e3}, {"M", 1e6}, {"G", 1e9}, {"T", 1e12},
	}
	factor := int64(1)
	for _, u := range units {
		if n, ok := strings.CutSuffix(s, u.suffix); ok {
			s, factor = n, u.factor
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("want a positive whole number with an optional suffix Ki, Mi, Gi, Ti, k, M, G or T")
	}
	if n > (1<<62)/factor {
		return 0, fmt.Errorf("too large")
	}
	return n * factor, nil
}

package cli

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"time"
)

// scrapeTimeout bounds one sandbox's metrics: the shim asks its guest.
const scrapeTimeout = 10 * time.Second

// metricsCmd prints a sandbox's metrics as its management socket serves
// them (Prometheus text).
func metricsCmd(ctx context.Context, e *env, args []string) error {
	if len(args) != 1 {
		return usageError("want one pod or sandbox, got %d arguments", len(args))
	}
	st, err := findSandbox(e.cfg.Runtime.StateDir, args[0])
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, scrapeTimeout)
	defer cancel()
	body, err := scrape(ctx, st.Dir)
	if err != nil {
		return fmt.Errorf("sandbox %s: %w", st.ID, err)
	}
	_, err = e.stdout.Write(body)
	return err
}

// scrape reads GET /metrics of the sandbox in dir.
func scrape(ctx context.Context, dir string) ([]byte, error) {
	client, sock := manageClient(dir)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://sandbox/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("management socket %s: %w", sock, err)
	}
	defer resp.Body.Close()
	// A shim's metrics are some hundred series; more is not a shim's.
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, fmt.Errorf("management socket %s: %w", sock, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	return b, nil
}

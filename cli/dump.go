package cli

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"path/filepath"
	"time"

	"github.com/colo-runtime/colo/shim/sandbox"
)

// dumpMargin is how much longer than hypervisor.dump_timeout the command
// waits for the shim, which bounds the dump itself and then answers.
const dumpMargin = 30 * time.Second

// dumpCmd writes a vmcore of a sandbox's guest through its management
// socket and prints its path.
func dumpCmd(ctx context.Context, e *env, args []string) error {
	fs := flag.NewFlagSet("dump", flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	dir := fs.String("dir", "", "directory for the vmcore (default: the sandbox's hypervisor.dump_dir)")
	ref, err := parseWithSandbox(fs, args)
	if err != nil {
		return err
	}
	var req sandbox.DumpRequest
	if *dir != "" {
		// The shim runs elsewhere: a relative directory is the caller's.
		abs, err := filepath.Abs(*dir)
		if err != nil {
			return usageError("--dir %s: %v", quoted(*dir), err)
		}
		req.Dir = abs
	}
	// Without --dir the shim's hypervisor.dump_dir applies (its
	// configuration may not be this command's); the shim refuses when
	// it has none.
	st, err := findSandbox(e.cfg.Runtime.StateDir, ref)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, time.Duration(e.cfg.Hypervisor.DumpTimeout)+dumpMargin)
	defer cancel()
	var out sandbox.DumpReply
	if err := call(ctx, st.Dir, http.MethodPost, "/dump", req, &out); err != nil {
		return fmt.Errorf("sandbox %s: %w", st.ID, err)
	}
	fmt.Fprintln(e.stdout, out.Path)
	return nil
}

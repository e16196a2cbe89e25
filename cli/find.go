package cli

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/colo-runtime/colo/shim/sandbox"
)

// sandboxes are the records of the node's sandboxes: one directory per
// sandbox under <state_dir>/<containerd namespace>/.
func sandboxes(stateDir string) ([]sandbox.State, error) {
	namespaces, err := os.ReadDir(stateDir)
	if err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	var out []sandbox.State
	for _, ns := range namespaces {
		if !ns.IsDir() {
			continue
		}
		dirs, err := os.ReadDir(filepath.Join(stateDir, ns.Name()))
		if err != nil {
			continue
		}
		for _, d := range dirs {
			if !d.IsDir() {
				continue
			}
			// Directories without a record (templates, the agent's pod
			// namespaces, a sandbox half made) are not sandboxes.
			st, err := sandbox.ReadState(filepath.Join(stateDir, ns.Name(), d.Name()))
			if err != nil {
				continue
			}
			out = append(out, st)
		}
	}
	return out, nil
}

// findSandbox finds the one sandbox that ref names: its id, a unique
// prefix of it, or its Kubernetes pod as "name" or "namespace/name".
func findSandbox(stateDir, ref string) (sandbox.State, error) {
	if ref == "" {
		return sandbox.State{}, usageError("no pod or sandbox named")
	}
	all, err := sandboxes(stateDir)
	if err != nil {
		return sandbox.State{}, err
	}
	var matches []sandbox.State
	for _, st := range all {
		if st.ID == ref {
			return st, nil
		}
		pod := st.Pod
		switch {
		case strings.HasPrefix(st.ID, ref),
			pod != nil && (pod.Name == ref || pod.Namespace+"/"+pod.Name == ref):
			matches = append(matches, st)
		}
	}
	switch len(matches) {
	case 0:
		return sandbox.State{}, fmt.Errorf("no sandbox or pod %s in %s", quoted(ref), stateDir)
	case 1:
		return matches[0], nil
	}
	var names []string
	for _, m := range matches {
		n := m.ID
		if m.Pod != nil {
			n += " (pod " + m.Pod.Namespace + "/" + m.Pod.Name + ")"
		}
		names = append(names, n)
	}
	sort.Strings(names)
	return sandbox.State{}, fmt.Errorf("%s names %d sandboxes: %s", quoted(ref), len(matches), strings.Join(names, ", "))
}

// manageClient is an HTTP client of the management socket of the sandbox
// in dir, and the socket's path for messages.
func manageClient(dir string) (*http.Client, string) {
	sock := filepath.Join(dir, sandbox.ManageSocket)
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}, sock
}

// parseWithSandbox parses a command's flags around its one sandbox
// argument, which may come before or after them, and returns it ("" when
// not given; findSandbox says so).
func parseWithSandbox(fs *flag.FlagSet, args []string) (string, error) {
	var ref string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		ref, args = args[0], args[1:]
	}
	if err := fs.Parse(args); err != nil {
		return "", usageError("%v", err)
	}
	if ref == "" && fs.NArg() > 0 {
		ref = fs.Arg(0)
	} else if fs.NArg() > 0 {
		return "", usageError("unexpected %s", quoted(strings.Join(fs.Args(), " ")))
	}
	return ref, nil
}

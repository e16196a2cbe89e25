// Package cli is the colo command: tools for an operator of a node's
// sandboxes, each reaching a sandbox through its record and management
// socket in the state directory (runtime.state_dir).
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/colo-runtime/colo/config"
)

// command is one subcommand.
type command struct {
	summary string
	run     func(ctx context.Context, env *env, args []string) error
}

var commands = map[string]command{
	"check":   {summary: "tell whether this host can run colo, and why not", run: checkCmd},
	"console": {summary: "run a shell (or a command) in a sandbox's guest, outside its containers: console POD-OR-SANDBOX [-- CMD ARGS]", run: consoleCmd},
	"dump":    {summary: "write a vmcore of a sandbox's guest now: dump POD-OR-SANDBOX [--dir DIR]", run: dumpCmd},
	"env":     {summary: "print the effective configuration", run: envCmd},
	"metrics": {summary: "print a sandbox's metrics (Prometheus text): metrics POD-OR-SANDBOX", run: metricsCmd},
	"monitor": {summary: "serve /metrics for every sandbox on the node: monitor [--listen ADDR]", run: monitorCmd},
	"ps":      {summary: "list the sandboxes on this node", run: psCmd},
	"resize":  {summary: "set a sandbox's vCPUs or memory: resize POD-OR-SANDBOX [--cpus N] [--memory SIZE]", run: resize},
}

// env is what every command gets.
type env struct {
	cfg config.Config
	// configPath is --config's value ("" when not given).
	configPath string
	stdout     io.Writer
	stderr     io.Writer
}

// exitStatus ends a command with a status of its own and no message:
// colo console passes on its command's.
type exitStatus int

func (e exitStatus) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

// errUsage marks an error in the command line: exit status 2.
var errUsage = errors.New("usage")

// Run runs the command line args (without the program name) and returns
// the exit status.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("colo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "", "configuration file (default: $"+config.EnvPath+", then "+config.DefaultPath+")")
	fs.Usage = func() { usage(stderr, fs) }
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() == 0 {
		usage(stderr, fs)
		return 2
	}
	name := fs.Arg(0)
	cmd, ok := commands[name]
	if !ok {
		fmt.Fprintf(stderr, "colo: no command %q\n", name)
		usage(stderr, fs)
		return 2
	}
	cfg, err := config.Load(*configPath)
	if err != nil {
		fmt.Fprintf(stderr, "colo: %v\n", err)
		return 1
	}
	if err := cmd.run(ctx, &env{cfg: cfg, configPath: *configPath, stdout: stdout, stderr: stderr}, fs.Args()[1:]); err != nil {
		var status exitStatus
		if errors.As(err, &status) {
			return int(status)
		}
		fmt.Fprintf(stderr, "colo %s: %v\n", name, err)
		if errors.Is(err, errUsage) {
			return 2
		}
		return 1
	}
	return 0
}

func usage(w io.Writer, fs *flag.FlagSet) {
	fmt.Fprintln(w, "usage: colo [--config FILE] COMMAND [ARGS]\n\ncommands:")
	var names []string
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-8s %s\n", n, commands[n].summary)
	}
	fmt.Fprintln(w, "\noptions:")
	fs.PrintDefaults()
}

// usageError is a command-line mistake.
func usageError(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, args...))
}

// quoted keeps user input short in messages.
func quoted(s string) string {
	if len(s) > 80 {
		s = s[:80] + "..."
	}
	return fmt.Sprintf("%q", strings.TrimSpace(s))
}

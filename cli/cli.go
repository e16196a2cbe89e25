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
	"resize": {summary: "set a sandbox's vCPUs or memory: resize POD-OR-SANDBOX [--cpus N] [--memory SIZE]", run: resize},
}

// env is what every command gets.
type env struct {
	cfg    config.Config
	stdout io.Writer
	stderr io.Writer
}

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
	if err := cmd.run(ctx, &env{cfg: cfg, stdout: stdout, stderr: stderr}, fs.Args()[1:]); err != nil {
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

// Command colo-agent is the guest's /init and the colo agent.
//
//	colo-agent                 as PID 1: set up the guest, run "serve", reap orphans
//	colo-agent serve [flags]   the ttrpc agent service
//	colo-agent init            libcontainer's container init (internal)
//	colo-agent pod-ns          holds a pod's namespaces (internal)
//	/sbin/modprobe [-q] [--] NAME  the guest kernel's modprobe (a link to colo-agent)
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"

	"github.com/containerd/log"
	"github.com/opencontainers/runc/libcontainer"
	_ "github.com/opencontainers/runc/libcontainer/nsenter" // C setns/clone before the Go runtime, for "init"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/agent"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func init() {
	// libcontainer re-executes this binary as "init", its pipes in the
	// environment, to set up each container process; nsenter has run by
	// now, and Init does not return. This comes before main's PID 1 check
	// as a container's init is PID 1 in its own namespace. The environment
	// check keeps a stray "init" on the kernel command line from killing
	// the guest's PID 1.
	if len(os.Args) > 1 && os.Args[1] == "init" && os.Getenv("_LIBCONTAINER_INITPIPE") != "" {
		libcontainer.Init()
	}
	// The holder of a pod's namespaces is PID 1 of its own PID namespace,
	// so it too must be told apart before main's PID 1 check.
	if len(os.Args) > 1 && os.Args[1] == agent.PodNSCommand && os.Getenv(agent.PodNSEnv) != "" {
		agent.HoldPodNamespaces()
	}
}

func main() {
	// The kernel's request_module runs "/sbin/modprobe -q -- NAME", a
	// link to this binary: never PID 1, and before anything else.
	if filepath.Base(os.Args[0]) == agent.ModprobeName {
		os.Exit(agent.RunModprobe(os.Args[1:], os.Stderr))
	}
	ctx := context.Background()
	// Plain text: the logs end up on a serial console, not a terminal.
	log.L.Logger.SetFormatter(&logrus.TextFormatter{
		DisableColors:   true,
		FullTimestamp:   true,
		TimestampFormat: log.RFC3339NanoFixed,
	})
	if os.Getpid() == 1 {
		// The kernel passes unknown boot parameters as arguments: ignore them.
		agent.Init(ctx)
	}
	if len(os.Args) < 2 || os.Args[1] != "serve" {
		fmt.Fprintf(os.Stderr, "usage: %s serve [flags] (or run as PID 1)\n", os.Args[0])
		os.Exit(2)
	}
	if err := serve(ctx, os.Args[2:]); err != nil {
		log.G(ctx).WithError(err).Error("colo-agent serve")
		os.Exit(1)
	}
}

func serve(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	var (
		cfg      = agent.ServeConfig{Service: agent.ServiceConfig{Version: version}}
		logLevel string
	)
	fs.StringVar(&cfg.Channel, "channel", agent.ChannelSerial, "host channel: serial or vsock")
	fs.StringVar(&cfg.Listen, "listen", "", "serve on unix:/path instead of the channel (development, tests)")
	fs.StringVar(&cfg.Service.StateDir, "state-dir", agent.DefaultStateDir, "libcontainer state directory")
	fs.BoolVar(&cfg.Service.NoPivotRoot, "no-pivot", false, "never pivot_root into containers (implied when / is the initramfs)")
	fs.StringVar(&logLevel, "log-level", "warn", "log level: trace, debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := log.SetLevel(logLevel); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	ctx, stop := signal.NotifyContext(ctx, unix.SIGTERM, unix.SIGINT)
	defer stop()
	return agent.Serve(ctx, cfg)
}

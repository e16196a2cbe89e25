// Command colo is the operator's tool for colo's sandboxes on this node
// (package cli has its commands).
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/colo-runtime/colo/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := cli.Run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

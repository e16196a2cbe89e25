// Command demo runs a container in a colo VM through a private containerd,
// twice, shows that it ran on the guest's kernel, and removes everything it
// started. `make demo` runs it.
package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/colo-runtime/colo/testbed"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run() (err error) {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()

	cd, err := testbed.Start(ctx, testbed.Options{Namespace: "demo"})
	if err != nil {
		return err
	}
	fmt.Printf("private containerd at %s\n", cd.Address)
	defer func() {
		leaks := cd.WaitNoLeaks(ctx)
		logs := cd.Logs()
		if stopErr := cd.Stop(); stopErr != nil && err == nil {
			err = stopErr
		}
		if len(leaks) > 0 && err == nil {
			err = fmt.Errorf("left behind: %s", strings.Join(leaks, "; "))
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "containerd log (tail):\n%s\n", testbed.Tail(logs, 40))
		}
	}()
	if err := cd.ImportBusybox(ctx); err != nil {
		return err
	}
	host, _ := exec.Command("uname", "-sr").Output()
	fmt.Printf("host kernel:  %s", host)
	// The first VM of a configuration boots and is saved as the template
	// the later ones are restored from: the second run shows a usual start.
	for i, note := range []string{"the first VM of this configuration: it boots, and is saved as the VM template", "restored from the template"} {
		id := fmt.Sprintf("demo-%d", i+1)
		fmt.Printf("$ ctr run --rm --runtime %s %s %s sh -c 'echo ...; uname -sr'\n", testbed.Runtime, testbed.BusyboxImage, id)
		start := time.Now()
		cmd := cd.CtrCmd(ctx, "run", "--rm", "--runtime", testbed.Runtime, testbed.BusyboxImage, id,
			"sh", "-c", `echo "hello from a container in a colo VM"; printf "guest kernel: "; uname -sr`)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("ctr run: %w", err)
		}
		fmt.Printf("(ctr run took %s: %s)\n", time.Since(start).Round(time.Millisecond), note)
	}
	return nil
}

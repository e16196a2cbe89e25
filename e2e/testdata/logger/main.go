// Command logger is a containerd logging binary for the binary:// log URI
// test: `binary:///path/logger?out=BASE` writes the container's stdout to
// BASE.out and its stderr to BASE.err.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/containerd/containerd/v2/core/runtime/v2/logging"
)

func main() {
	if len(os.Args) != 3 || os.Args[1] != "out" {
		fmt.Fprintln(os.Stderr, "usage: logger out BASE")
		os.Exit(2)
	}
	base := os.Args[2]
	logging.Run(func(ctx context.Context, cfg *logging.Config, ready func() error) error {
		stdout, err := os.Create(base + ".out")
		if err != nil {
			return err
		}
		defer stdout.Close()
		stderr, err := os.Create(base + ".err")
		if err != nil {
			return err
		}
		defer stderr.Close()
		if err := ready(); err != nil {
			return err
		}
		var wg sync.WaitGroup
		for dst, src := range map[io.Writer]io.Reader{stdout: cfg.Stdout, stderr: cfg.Stderr} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				io.Copy(dst, src)
			}()
		}
		wg.Wait()
		return nil
	})
}

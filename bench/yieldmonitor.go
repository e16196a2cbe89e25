package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/colo-runtime/colo/testbed"
)

// The yielding controller runs in colo monitor, on the node, when colo's
// config has [yield] enabled: the bench runs it against the test bed's
// state directory, with the test bed's config and that section added, for
// the run that measures it.

// yieldMonitorConfig writes the test bed's colo config with the yielding
// controller on, and returns its path.
func yieldMonitorConfig(cd *testbed.Containerd) (string, error) {
	base, err := os.ReadFile(cd.ColoConfig)
	if err != nil {
		return "", err
	}
	path := filepath.Join(cd.Dir, "colo-yield.toml")
	return path, os.WriteFile(path, append(base, yieldConfig...), 0o644)
}

// coloCLI is the colo command make build left in build/bin.
func coloCLI() (string, error) {
	root, err := testbed.RepoRoot()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(root, "build", "bin", "colo")
	if _, err := os.Stat(bin); err != nil {
		return "", fmt.Errorf("colo CLI: %w (run make build)", err)
	}
	return bin, nil
}

// checkYieldConfig has colo read the yield config: a colo without the
// yielding controller refuses the section.
func checkYieldConfig(ctx context.Context, cd *testbed.Containerd) error {
	cfg, err := yieldMonitorConfig(cd)
	if err != nil {
		return err
	}
	bin, err := coloCLI()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, bin, "--config", cfg, "env").CombinedOutput(); err != nil {
		return fmt.Errorf("colo does not take the yielding controller's config (%q in %s; is package yield built in?): %v: %s",
			yieldConfig, cfg, err, testbed.Tail(string(out), 5))
	}
	return nil
}

// startYieldMonitor starts colo monitor with the yielding controller and
// waits for it to listen. The context it returns ends, with the reason,
// if the monitor exits before stop; stop ends the monitor (SIGTERM, then
// SIGKILL) and says whether it had exited early.
func startYieldMonitor(ctx context.Context, cd *testbed.Containerd) (context.Context, func() error, error) {
	cfg, err := yieldMonitorConfig(cd)
	if err != nil {
		return nil, nil, err
	}
	bin, err := coloCLI()
	if err != nil {
		return nil, nil, err
	}
	logPath := filepath.Join(cd.Dir, "monitor.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, nil, err
	}
	defer logFile.Close()
	sock := filepath.Join(cd.Dir, "monitor.sock")
	cmd := exec.Command(bin, "--config", cfg, "monitor", "--listen", sock)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Its own process group: a Ctrl-C at the terminal reaches it only
	// through stop, after the pods are gone.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("start colo monitor: %w", err)
	}
	exited := make(chan struct{})
	// exitErr is set before exited is closed, and is the cause of runCtx:
	// one error, however many places see it.
	var waitErr, exitErr error
	runCtx, cancel := context.WithCancelCause(ctx)
	go func() {
		waitErr = cmd.Wait()
		exitErr = fmt.Errorf("colo monitor exited during the run (%v): %s", waitErr, logTail(logPath))
		close(exited)
		cancel(exitErr)
	}()
	stop := func() error {
		select {
		case <-exited:
			return exitErr
		default:
		}
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			return fmt.Errorf("colo monitor did not stop within 10s of SIGTERM: %s", logTail(logPath))
		}
		os.Remove(sock)
		return nil
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			return runCtx, stop, nil
		}
		select {
		case <-exited:
			return nil, nil, fmt.Errorf("colo monitor exited before it listened on %s (%v): %s", sock, waitErr, logTail(logPath))
		default:
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			err := fmt.Errorf("colo monitor did not listen on %s within 30s: %s", sock, logTail(logPath))
			return nil, nil, errors.Join(err, stop())
		}
	}
}

func logTail(path string) string {
	b, _ := os.ReadFile(path)
	return testbed.Tail(string(b), 10)
}

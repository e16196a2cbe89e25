package qemu

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/errdefs"

	"github.com/colo-runtime/colo/hypervisor"
)

// The debug console (VMConfig.DebugConsole) is a virtio-serial port of its
// own, never the agent's, named by the caller (DebugConsole.Serial): the
// guest agent serves a shell on it (package agent, console.go), and
// DialConsole connects to QEMU's end, a unix socket QEMU listens on in the
// VM directory.
const (
	// ConsoleSocket is the console's socket in VMConfig.Dir. No longer
	// than AgentSocket, so that a directory Start accepts fits it too.
	ConsoleSocket = "debug.sock"
	// consolePortID is the port's device id; consoleChardev its
	// chardev's, which DialConsole looks for.
	consolePortID  = "consoleport"
	consoleChardev = "console"
	// consoleBus is the console's own virtio-serial controller when the
	// agent has none (vsock).
	consoleBus = "vsercons"
)

// consoleArgs are the console's devices on QEMU's command line, after the
// agent channel's; none without VMConfig.DebugConsole. They are part of
// args(), so templates with and without the console have different keys
// (templateKey hashes the template's command line) and a clone always has
// its template's devices.
//
// QEMU creates and listens on the socket itself (server=on, unlinking a
// stale one first and removing it when it quits): unlike the agent's
// socket nothing waits for the console before QEMU runs, so the driver
// need not hand it over as a file. wait=off: QEMU does not wait for a
// client before running the guest.
func (l launch) consoleArgs(dev func(string) string) []string {
	if l.vm.DebugConsole.IsZero() {
		return nil
	}
	var a []string
	bus := "vser0.0"
	if l.vm.Channel != hypervisor.ChannelSerial {
		// Without the agent's virtio-serial controller: one of its
		// own (a PCI or virtio-mmio device like the others).
		a = append(a, "-device", dev("virtio-serial")+",id="+consoleBus)
		bus = consoleBus + ".0"
	}
	return append(a,
		"-chardev", fmt.Sprintf("socket,id=%s,path=%s,server=on,wait=off", consoleChardev, escape(filepath.Join(l.vm.Dir, ConsoleSocket))),
		"-device", fmt.Sprintf("virtserialport,bus=%s,chardev=%s,name=%s,id=%s", bus, consoleChardev, escape(l.vm.DebugConsole.Serial), consolePortID),
	)
}

// consoleClient is the console's one client at a time. QEMU's socket
// takes one client at a time and leaves a second one connected but unread
// in its backlog, which would look like a console that hangs: DialConsole
// refuses it instead. A client that follows another waits consoleGap after
// the last one left: the guest must see it leave (its port's host side
// closing) before the next one's bytes arrive, or they would go to the
// session that is ending, whose shell the guest is killing.
type consoleClient struct {
	mu   sync.Mutex
	busy bool
	left time.Time
}

// consoleGap is how long the guest is given to see a console client leave.
const consoleGap = time.Second

// DialConsole connects to the guest's debug console: a byte stream to and
// from the shell the agent runs on a terminal. One client at a time; the
// guest starts a new shell for each. An error wrapping
// hypervisor.ErrNoConsole when the VM was started without
// VMConfig.DebugConsole, and errdefs.ErrConflict while another client is
// connected.
func (vm *VM) DialConsole(ctx context.Context) (net.Conn, error) {
	select {
	case <-vm.done:
		return nil, fmt.Errorf("qemu: vm %s: dial console: %s", vm.id, vm.describeExit())
	default:
	}
	// Whether the VM has a console is QEMU's to say, not whether a socket
	// file is there: a QEMU killed earlier in the same directory leaves
	// its socket behind.
	has, err := vm.hasConsole(ctx)
	if err != nil {
		return nil, fmt.Errorf("qemu: vm %s: dial console: %w", vm.id, err)
	}
	if !has {
		return nil, fmt.Errorf("qemu: vm %s: %w", vm.id, hypervisor.ErrNoConsole)
	}
	c := &vm.console
	c.mu.Lock()
	if c.busy {
		c.mu.Unlock()
		return nil, fmt.Errorf("qemu: vm %s: the debug console has a client already (one at a time): %w", vm.id, errdefs.ErrConflict)
	}
	c.busy = true
	wait := time.Until(c.left.Add(consoleGap))
	c.mu.Unlock()
	free := func() {
		c.mu.Lock()
		c.busy, c.left = false, time.Now()
		c.mu.Unlock()
	}
	if wait > 0 {
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			free()
			return nil, fmt.Errorf("qemu: vm %s: dial console: %w", vm.id, ctx.Err())
		case <-t.C:
		}
	}
	conn, err := (&net.Dialer{}).DialContext(ctx, "unix", filepath.Join(vm.dir, ConsoleSocket))
	if err != nil {
		free()
		return nil, fmt.Errorf("qemu: vm %s: dial console: %w", vm.id, err)
	}
	return &consoleConn{Conn: conn, free: free}, nil
}

// hasConsole asks QEMU whether the console's chardev exists.
func (vm *VM) hasConsole(ctx context.Context) (bool, error) {
	raw, err := vm.qmp.Execute(ctx, "query-chardev", nil)
	if err != nil {
		return false, err
	}
	var devs []struct {
		Label string `json:"label"`
	}
	if err := json.Unmarshal(raw, &devs); err != nil {
		return false, fmt.Errorf("query-chardev: %w", err)
	}
	for _, d := range devs {
		if d.Label == consoleChardev {
			return true, nil
		}
	}
	return false, nil
}

// consoleConn frees the console for the next client when closed.
type consoleConn struct {
	net.Conn
	free func()
	once sync.Once
}

func (c *consoleConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.free)
	return err
}

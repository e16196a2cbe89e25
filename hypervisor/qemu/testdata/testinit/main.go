// Command testinit stands in for colo-agent as the guest's /init in the
// qemu driver's tests. It loads the modules in /etc/colo/modules, mounts
// the shares named on the kernel command line (testinit.9p=TAG,
// testinit.virtiofs=TAG) and reads their file "hello", then writes a
// report to the virtio-serial port agent.0, ending with "ready", and
// echoes whatever the host sends, but for "pci PATH", which it answers
// with what is at that PCI path (pci.go). With testinit.vsock=PORT it
// serves each connection to that vsock port so instead, listening on any
// CID as colo-agent does (a template's clone gets a CID of its own).
package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"
)

func main() {
	for _, m := range []struct{ fstype, target string }{
		{"devtmpfs", "/dev"}, {"proc", "/proc"}, {"sysfs", "/sys"},
	} {
		if err := syscall.Mount(m.fstype, m.target, m.fstype, 0, ""); err != nil {
			fmt.Printf("testinit: mount %s: %v\n", m.target, err)
		}
	}

	start := uptime()
	var report []string
	if err := loadModules("/etc/colo/modules"); err != nil {
		report = append(report, "error: "+err.Error())
	}
	fmt.Printf("testinit: started at %s s (guest uptime), modules loaded at %s s\n", start, uptime())
	cmdline, _ := os.ReadFile("/proc/cmdline")
	vsockPort := ""
	for _, p := range strings.Fields(string(cmdline)) {
		key, tag, _ := strings.Cut(p, "=")
		var fstype, opts string
		switch key {
		case "testinit.vsock":
			vsockPort = tag
			continue
		case "testinit.9p":
			fstype, opts = "9p", "trans=virtio,version=9p2000.L"
		case "testinit.virtiofs":
			fstype = "virtiofs"
		default:
			continue
		}
		target := "/mnt/" + tag
		os.MkdirAll(target, 0o755)
		if err := syscall.Mount(tag, target, fstype, 0, opts); err != nil {
			report = append(report, fmt.Sprintf("error: mount %s %s: %v", fstype, tag, err))
			continue
		}
		b, err := os.ReadFile(target + "/hello")
		if err != nil {
			report = append(report, fmt.Sprintf("error: %v", err))
			continue
		}
		report = append(report, fmt.Sprintf("%s %s: %s", fstype, tag, strings.TrimSpace(string(b))))
	}
	report = append(report, "ready")

	if vsockPort != "" {
		serveVsock(vsockPort, report)
		return
	}
	port := findPort("agent.0")
	fmt.Printf("testinit: ready, writing to %s\n", port)
	for {
		serve(port, report)
		time.Sleep(10 * time.Millisecond)
	}
}

// loadModules loads the modules in the order the list gives.
func loadModules(list string) error {
	b, err := os.ReadFile(list)
	if err != nil {
		return err
	}
	for _, path := range strings.Fields(string(b)) {
		f, err := os.Open("/" + path)
		if err != nil {
			return err
		}
		err = unix.FinitModule(int(f.Fd()), "", 0)
		f.Close()
		if err != nil && err != unix.EEXIST {
			return fmt.Errorf("load %s: %v", path, err)
		}
	}
	return nil
}

// findPort waits for the virtio-serial port name to appear; the host
// announces ports after the driver loads.
func findPort(name string) string {
	for {
		dirs, _ := filepath.Glob("/sys/class/virtio-ports/*")
		for _, d := range dirs {
			b, _ := os.ReadFile(d + "/name")
			if strings.TrimSpace(string(b)) == name {
				return "/dev/" + filepath.Base(d)
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// serveVsock serves every connection to the vsock port as serve does the
// serial port's, until listening fails (the kernel then panics: PID 1
// exits, which the host sees).
func serveVsock(port string, report []string) {
	p, err := strconv.ParseUint(port, 10, 32)
	if err != nil {
		fmt.Printf("testinit: testinit.vsock=%s: %v\n", port, err)
		return
	}
	l, err := vsock.ListenContextID(unix.VMADDR_CID_ANY, uint32(p), nil)
	if err != nil {
		fmt.Printf("testinit: %v\n", err)
		return
	}
	fmt.Printf("testinit: ready, listening on vsock port %d\n", p)
	for {
		conn, err := l.Accept()
		if err != nil {
			fmt.Printf("testinit: %v\n", err)
			return
		}
		go func() {
			defer conn.Close()
			converse(conn, report)
		}()
	}
}

// serve writes the report (the write blocks until the host connects) and
// echoes lines until the host goes away.
func serve(port string, report []string) {
	f, err := os.OpenFile(port, os.O_RDWR, 0)
	if err != nil {
		fmt.Printf("testinit: %v\n", err)
		return
	}
	defer f.Close()
	converse(f, report)
}

// converse writes the report and answers lines until the host goes away.
func converse(f io.ReadWriter, report []string) {
	for _, line := range report {
		if _, err := fmt.Fprintln(f, line); err != nil {
			return
		}
	}
	r := bufio.NewReader(f)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		reply := "echo " + line
		if p, ok := strings.CutPrefix(line, "pci "); ok {
			reply = "pci " + strings.TrimSpace(p) + " " + pciAt(strings.TrimSpace(p)) + "\n"
		}
		if _, err := io.WriteString(f, reply); err != nil {
			return
		}
	}
}

func uptime() string {
	b, _ := os.ReadFile("/proc/uptime")
	up, _, _ := strings.Cut(string(b), " ")
	return up
}

// Command fakech is a fake cloud-hypervisor for the clh driver's tests: it
// takes CH's options the driver uses, serves clhtest's fake API on the
// --api-socket, and does what the driver looks at of a running VM: vCPU
// threads named vcpuN, a line on the serial console file, a hybrid vsock
// socket that answers CONNECT to the guest's ports, and a pvpanic event on
// SIGUSR1. As CH does, it makes the vsock socket before vm.boot answers.
//
// Environment: FAKECH_LOG is a file each request is appended to as a JSON
// line; FAKECH_MODE "die" exits at once with a message, "noapi" never
// serves the API; FAKECH_VSOCK says which guest ports listen and what is
// behind each, "port=echo" or "port=/path/of/a/unix/socket" separated by
// commas (CONNECT to another port is closed, as CH closes it when nothing
// in the guest listens); unset, every port echoes.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/hypervisor/clh/clhtest"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "fakech:", err)
		os.Exit(1)
	}
}

func option(args []string, name string) string {
	for i := 0; i+1 < len(args); i++ {
		if args[i] == name {
			return args[i+1]
		}
	}
	return ""
}

func run() error {
	args := os.Args[1:]
	api, ok := strings.CutPrefix(option(args, "--api-socket"), "path=")
	if !ok {
		return fmt.Errorf("--api-socket path=... missing in %q", args)
	}
	var events io.Writer = io.Discard
	if v, ok := strings.CutPrefix(option(args, "--event-monitor"), "fd="); ok {
		fd, err := strconv.Atoi(v)
		if err != nil {
			return err
		}
		events = os.NewFile(uintptr(fd), "events")
	}
	if option(args, "--seccomp") != "true" {
		return fmt.Errorf("--seccomp true missing in %q", args)
	}
	switch os.Getenv("FAKECH_MODE") {
	case "die":
		return fmt.Errorf("Error booting VM: told to die")
	case "noapi":
		select {}
	}
	var logMu sync.Mutex
	var logf *os.File
	if p := os.Getenv("FAKECH_LOG"); p != "" {
		var err error
		if logf, err = os.OpenFile(p, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600); err != nil {
			return err
		}
	}
	ports, err := parsePorts(os.Getenv("FAKECH_VSOCK"))
	if err != nil {
		return err
	}
	vcpus := &vcpuSet{}
	var vsockMu sync.Mutex
	var vsockPath string
	srv := &clhtest.Server{
		Spec: clhtest.NewSpec(),
		Log: func(r clhtest.Record) {
			if logf == nil {
				return
			}
			b, _ := json.Marshal(r)
			logMu.Lock()
			logf.Write(append(b, '\n'))
			logMu.Unlock()
		},
		OnBoot: func(cfg map[string]any) {
			cpus, _ := cfg["cpus"].(map[string]any)
			n, _ := cpus["boot_vcpus"].(float64)
			vcpus.resize(int(n))
			if serial, ok := cfg["serial"].(map[string]any); ok {
				if p, _ := serial["file"].(string); p != "" {
					if f, err := os.OpenFile(p, os.O_WRONLY, 0); err == nil {
						fmt.Fprintf(f, "fake guest: booting with %q\r\n", payloadCmdline(cfg))
						f.Close()
					}
				}
			}
			if v, ok := cfg["vsock"].(map[string]any); ok {
				path, _ := v["socket"].(string)
				l, err := net.Listen("unix", path)
				if err != nil {
					fmt.Fprintln(os.Stderr, "fakech: vsock:", err)
					return
				}
				vsockMu.Lock()
				vsockPath = path
				vsockMu.Unlock()
				go serveVsock(l, ports)
			}
		},
		OnResize: func(n int) { vcpus.resize(n) },
		OnShutdownVMM: func() {
			os.Remove(api)
			vsockMu.Lock()
			if vsockPath != "" {
				os.Remove(vsockPath)
			}
			vsockMu.Unlock()
			os.Exit(0)
		},
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: api, Net: "unix"})
	if err != nil {
		return err
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGUSR1)
	go func() {
		for range sigs {
			b, _ := json.MarshalIndent(map[string]any{
				"timestamp":  map[string]int{"secs": 0, "nanos": 0},
				"source":     "guest",
				"event":      "panic",
				"properties": map[string]string{"event": "panic"},
			}, "", "  ")
			events.Write(append(b, '\n'))
		}
	}()
	return srv.Serve(l)
}

func payloadCmdline(cfg map[string]any) string {
	p, _ := cfg["payload"].(map[string]any)
	s, _ := p["cmdline"].(string)
	return s
}

// echo is the FAKECH_VSOCK target of a port that echoes.
const echo = "echo"

// parsePorts reads FAKECH_VSOCK: guest port to target; nil means every
// port echoes.
func parsePorts(env string) (map[uint32]string, error) {
	if env == "" {
		return nil, nil
	}
	ports := map[uint32]string{}
	for _, e := range strings.Split(env, ",") {
		p, target, ok := strings.Cut(e, "=")
		n, err := strconv.ParseUint(p, 10, 32)
		if !ok || err != nil || target == "" {
			return nil, fmt.Errorf("FAKECH_VSOCK: %q: want port=echo or port=/socket/path", e)
		}
		ports[uint32(n)] = target
	}
	return ports, nil
}

// serveVsock answers CONNECT <port> as CH does: OK when the guest's port
// listens, then the guest's bytes; the connection closed when it does not.
func serveVsock(l net.Listener, ports map[uint32]string) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			br := bufio.NewReader(c)
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			p, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "CONNECT ")
			port, err := strconv.ParseUint(p, 10, 32)
			if !ok || err != nil {
				return
			}
			target := echo
			if ports != nil {
				if target, ok = ports[uint32(port)]; !ok {
					return
				}
			}
			var guest io.ReadWriteCloser
			if target != echo {
				// The guest's listener is a unix socket of the test's.
				if guest, err = net.Dial("unix", target); err != nil {
					return
				}
				defer guest.Close()
			}
			fmt.Fprintf(c, "OK 1073741824\n")
			if guest == nil {
				io.Copy(c, br)
				return
			}
			done := make(chan struct{})
			go func() {
				io.Copy(guest, br)
				// The host closed its end: so does the guest's.
				guest.Close()
				close(done)
			}()
			io.Copy(c, guest)
			c.Close()
			<-done
		}()
	}
}

// vcpuSet runs one OS thread per vCPU, named vcpuN as CH names them.
type vcpuSet struct {
	mu    sync.Mutex
	stops []chan struct{}
}

func (v *vcpuSet) resize(n int) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for len(v.stops) < n {
		stop, started := make(chan struct{}), make(chan struct{})
		i := len(v.stops)
		go func() {
			// Never unlocked: the thread ends with the goroutine.
			runtime.LockOSThread()
			os.WriteFile(fmt.Sprintf("/proc/self/task/%d/comm", unix.Gettid()), []byte("vcpu"+strconv.Itoa(i)), 0)
			close(started)
			<-stop
		}()
		<-started
		v.stops = append(v.stops, stop)
	}
	for len(v.stops) > n {
		last := len(v.stops) - 1
		close(v.stops[last])
		v.stops = v.stops[:last]
	}
}

package testbed

import (
	"archive/tar"
	"context"
	_ "embed" // the pause source
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/vishvananda/netlink"
	internalapi "k8s.io/cri-api/pkg/apis"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	criclient "k8s.io/cri-client/pkg"

	"github.com/colo-runtime/colo/storage"
)

// CRINamespace is the containerd namespace the CRI plugin keeps its
// images, sandboxes and containers in.
const CRINamespace = "k8s.io"

// ColoHandler is the CRI runtime handler (a RuntimeClass's handler) that
// runs pods with colo; "runc" is the default handler.
const ColoHandler = "colo"

// ColoShimHandler runs pods with colo through containerd's sandbox API
// (sandboxer = "shim"): a pod is a VM with no pause container. ColoHandler
// keeps CRI's default sandboxer, "podsandbox" (a pause container).
const ColoShimHandler = "colo-shim"

// ColoBlockfileHandler is ColoHandler with containerd's blockfile
// snapshotter (BlockfileSnapshotter): every container's rootfs, the pause
// container's too, is an ext4 image that colo attaches as a disk.
const ColoBlockfileHandler = "colo-blockfile"

// PauseImage is the sandbox image, built locally from pause/pause.c. It is
// containerd v2.3.7's default (pinned_images.sandbox), and the config sets
// it too so that a containerd upgrade cannot ask for another one.
const PauseImage = "registry.k8s.io/pause:3.10.2"

// CRITimeout bounds each CRI call, as kubelet's --runtime-request-timeout
// (2m by default) does; colo pods boot a VM, seconds under TCG.
const CRITimeout = 2 * time.Minute

// shimSandboxController is containerd's sandbox controller plugin for
// sandboxer = "shim", which names its root and state directories.
const shimSandboxController = "io.containerd.sandbox.controller.v1.shim"

// cniBinDir is where Debian's containernetworking-plugins installs.
const cniBinDir = "/usr/lib/cni"

// cniNetwork names the test bed's CNI network (and the IPAM data subdir).
const cniNetwork = "colo-testbed"

// podNetworks is where each test bed picks a /24 for its pods.
var podNetworks = net.IPNet{IP: net.IPv4(10, 242, 0, 0).To4(), Mask: net.CIDRMask(16, 32)}

//go:embed pause/pause.c
var pauseSource []byte

// CRI is the CRI side of a test bed started with Options.CRI. Pods get
// an address in Subnet on a bridge of their own test bed (no NAT, the
// bridge is their gateway, so the host reaches pod IPs directly).
//
// What the CRI plugin leaves outside Dir, Stop removes: the bridge (CNI
// never deletes it), and net.ipv4.ip_forward, which the bridge plugin sets
// for a gateway, goes back to 0 if it was 0 at Start. Network namespace
// and /dev/shm mounts of pods that were not removed are unmounted, so Dir
// can go.
type CRI struct {
	// Endpoint is the CRI endpoint, as kubelet's --container-runtime-endpoint.
	Endpoint string
	// Subnet is the pods' network and Bridge its host bridge.
	Subnet *net.IPNet
	Bridge string
	// CrictlConfig is a crictl config file pointing at this test bed.
	CrictlConfig string

	dir        string // the test bed's Dir
	stateDir   string // the CRI plugin's state: netns and shm mounts
	rootDir    string // the CRI plugin's root: sandbox and container files
	cniConfDir string
	cniDataDir string // host-local IPAM allocations
	ipForward  string // net.ipv4.ip_forward before Start
}

const ipForwardPath = "/proc/sys/net/ipv4/ip_forward"

// newCRI picks the network and writes the CNI and crictl configs under
// dir.
func newCRI(dir, address string) (*CRI, error) {
	h := fnv.New32a()
	h.Write([]byte(dir))
	seed := h.Sum32()
	used, err := usedNetworks()
	if err != nil {
		return nil, err
	}
	subnet, err := freeSubnet(seed, used)
	if err != nil {
		return nil, err
	}
	forward, err := os.ReadFile(ipForwardPath)
	if err != nil {
		return nil, err
	}
	r := &CRI{
		Endpoint: "unix://" + address,
		Subnet:   subnet,
		// Unique per test bed, and within IFNAMSIZ (15).
		Bridge:       fmt.Sprintf("colo%08x", seed),
		CrictlConfig: filepath.Join(dir, "crictl.yaml"),
		dir:          dir,
		// As containerd derives them from its root and state.
		stateDir:   filepath.Join(dir, "state", "io.containerd.grpc.v1.cri"),
		rootDir:    filepath.Join(dir, "root", "io.containerd.grpc.v1.cri"),
		cniConfDir: filepath.Join(dir, "cni", "net.d"),
		cniDataDir: filepath.Join(dir, "cni", "ipam"),
		ipForward:  strings.TrimSpace(string(forward)),
	}
	if err := r.writeCNIConfig(); err != nil {
		return nil, err
	}
	// Explicit endpoints and a long timeout: crictl's default of 2 s is
	// shorter than a colo pod's boot.
	crictl := fmt.Sprintf("runtime-endpoint: %s\nimage-endpoint: %s\ntimeout: %d\ndebug: false\npull-image-on-create: false\ndisable-pull-on-run: true\n",
		r.Endpoint, r.Endpoint, int(CRITimeout/time.Second))
	if err := os.WriteFile(r.CrictlConfig, []byte(crictl), 0o644); err != nil {
		return nil, err
	}
	return r, nil
}

// writeCNIConfig writes the bridge network. No ipMasq (it needs iptables,
// and pods need no way out); containerd adds the loopback network itself
// from the loopback plugin in cniBinDir.
func (r *CRI) writeCNIConfig() error {
	conf, err := json.MarshalIndent(map[string]any{
		"cniVersion": "1.0.0",
		"name":       cniNetwork,
		"plugins": []any{map[string]any{
			"type":      "bridge",
			"bridge":    r.Bridge,
			"isGateway": true,
			"ipMasq":    false,
			"ipam": map[string]any{
				"type":    "host-local",
				"ranges":  [][]map[string]string{{{"subnet": r.Subnet.String()}}},
				"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
				"dataDir": r.cniDataDir,
			},
		}},
	}, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(r.cniConfDir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(r.cniConfDir, "10-colo-testbed.conflist"), conf, 0o644)
}

// containerdConfig is the CRI part of containerd's config. The runtime
// section's settings apply to every handler: cgroupfs (no systemd here),
// restrict_oom_score_adj (root may lack CAP_SYS_RESOURCE, and then runc
// fails to set the sandbox's oom_score_adj), netns mounts under the state
// dir rather than /var/run/netns, CDI specs from an empty dir there rather
// than /etc/cdi. The colo handlers are configured as docs/kubernetes.md
// says: privileged_without_host_devices, since CRI would otherwise give a
// privileged container all the host's devices, which colo refuses as no
// VM can have them. ColoShimHandler is the same runtime with containerd's
// sandbox API, and ColoBlockfileHandler the same runtime with the blockfile
// snapshotter.
func (r *CRI) containerdConfig(coloConfig string) string {
	return fmt.Sprintf(`
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = %[1]q

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  cdi_spec_dirs = [%[7]q]
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        SystemdCgroup = false
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.%[2]s]
      runtime_type = %[3]q
      privileged_without_host_devices = true
      pod_annotations = ["io.colo.*"]
      container_annotations = ["io.colo.*"]
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.%[2]s.options]
        ConfigPath = %[4]q
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.%[8]s]
      runtime_type = %[3]q
      sandboxer = "shim"
      privileged_without_host_devices = true
      pod_annotations = ["io.colo.*"]
      container_annotations = ["io.colo.*"]
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.%[8]s.options]
        ConfigPath = %[4]q
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.%[9]s]
      runtime_type = %[3]q
      snapshotter = %[10]q
      privileged_without_host_devices = true
      pod_annotations = ["io.colo.*"]
      container_annotations = ["io.colo.*"]
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.%[9]s.options]
        ConfigPath = %[4]q
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = [%[5]q]
    conf_dir = %[6]q
    max_conf_num = 1
`, PauseImage, ColoHandler, Runtime, coloConfig, cniBinDir, r.cniConfDir, filepath.Join(r.dir, "cdi"), ColoShimHandler,
		ColoBlockfileHandler, BlockfileSnapshotter)
}

// startCRI builds and imports the images CRI tests need, then waits until
// the CRI plugin reports itself ready and sees them.
func (c *Containerd) startCRI(ctx context.Context) error {
	pause, err := c.buildPause(ctx)
	if err != nil {
		return err
	}
	if err := c.importImage(ctx, CRINamespace, "pause", func(archive string) error {
		return WritePauseImage(archive, PauseImage, pause)
	}); err != nil {
		return err
	}
	if err := c.importImage(ctx, CRINamespace, "busybox", func(archive string) error {
		return WriteBusyboxImage(archive, BusyboxImage)
	}); err != nil {
		return err
	}
	rs, err := c.RuntimeService(ctx)
	if err != nil {
		return err
	}
	defer rs.Close(ctx)
	is, err := c.ImageService(ctx)
	if err != nil {
		return err
	}
	defer is.Close(ctx)
	for {
		notReady := criNotReady(ctx, rs, is)
		if notReady == "" {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("CRI not ready: %s: %w", notReady, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// criNotReady says what the CRI plugin lacks: a ready condition or one of
// the test bed's images (it learns of imports from events, so not at once).
func criNotReady(ctx context.Context, rs internalapi.RuntimeService, is internalapi.ImageManagerService) string {
	st, err := rs.Status(ctx, false)
	if err != nil {
		return err.Error()
	}
	// Other conditions, such as deprecation warnings (cgroup v1), do not
	// stop kubelet.
	for _, cond := range st.GetStatus().GetConditions() {
		if (cond.Type == runtimeapi.RuntimeReady || cond.Type == runtimeapi.NetworkReady) && !cond.Status {
			return fmt.Sprintf("%s: %s %s", cond.Type, cond.Reason, cond.Message)
		}
	}
	for _, image := range []string{PauseImage, BusyboxImage} {
		st, err := is.ImageStatus(ctx, &runtimeapi.ImageSpec{Image: image}, false)
		if err != nil {
			return err.Error()
		}
		if st.GetImage() == nil {
			return "no image " + image
		}
	}
	return ""
}

// buildPause compiles pause/pause.c into Dir: static, so the image needs
// nothing else.
func (c *Containerd) buildPause(ctx context.Context) (string, error) {
	src := filepath.Join(c.Dir, "pause.c")
	bin := filepath.Join(c.Dir, "pause")
	if err := os.WriteFile(src, pauseSource, 0o644); err != nil {
		return "", err
	}
	out, err := exec.CommandContext(ctx, "gcc", "-static", "-O2", "-s", "-o", bin, src).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("gcc pause.c: %w: %s", err, out)
	}
	return bin, nil
}

// WritePauseImage writes an OCI image-layout archive whose one layer holds
// the pause binary as /pause, its entrypoint, run as the nobody user
// 65535 like Kubernetes' pause image.
func WritePauseImage(path, name, pause string) error {
	body, err := os.ReadFile(pause)
	if err != nil {
		return err
	}
	return writeImage(path, name, []layerFile{{tar.Header{Typeflag: tar.TypeReg, Name: "pause", Mode: 0o755}, body}}, ocispec.ImageConfig{
		User:       "65535:65535",
		Entrypoint: []string{"/pause"},
	})
}

// RuntimeService connects to the test bed's CRI runtime service as kubelet
// does, with CRITimeout for each call. The caller closes it.
func (c *Containerd) RuntimeService(ctx context.Context) (internalapi.RuntimeService, error) {
	if c.CRI == nil {
		return nil, errors.New("the test bed was started without Options.CRI")
	}
	rs, err := criclient.NewRemoteRuntimeServiceBuilder().
		WithEndpoint(c.CRI.Endpoint).
		WithConnectionTimeout(CRITimeout).
		Build(ctx)
	if err != nil {
		return nil, fmt.Errorf("CRI runtime service: %w", err)
	}
	return rs, nil
}

// ImageService connects to the test bed's CRI image service. The caller
// closes it.
func (c *Containerd) ImageService(ctx context.Context) (internalapi.ImageManagerService, error) {
	if c.CRI == nil {
		return nil, errors.New("the test bed was started without Options.CRI")
	}
	is, err := criclient.NewRemoteImageServiceBuilder().
		WithEndpoint(c.CRI.Endpoint).
		WithConnectionTimeout(CRITimeout).
		Build(ctx)
	if err != nil {
		return nil, fmt.Errorf("CRI image service: %w", err)
	}
	return is, nil
}

// CrictlCommand is the command line that runs crictl against this test
// bed, for scripts: the binary, then flags that leave /etc/crictl.yaml and
// the environment's endpoints unused.
func (c *Containerd) CrictlCommand() ([]string, error) {
	if c.CRI == nil {
		return nil, errors.New("the test bed was started without Options.CRI")
	}
	bin, err := c.lookPath("crictl")
	if err != nil {
		return nil, err
	}
	return []string{bin, "--config", c.CRI.CrictlConfig,
		"--runtime-endpoint", c.CRI.Endpoint, "--image-endpoint", c.CRI.Endpoint,
		"--timeout", CRITimeout.String()}, nil
}

// Crictl runs crictl against this test bed and returns its output and exit
// code. err is set only when crictl could not run at all.
func (c *Containerd) Crictl(ctx context.Context, args ...string) (Result, error) {
	cmdline, err := c.CrictlCommand()
	if err != nil {
		return Result{}, err
	}
	cmd := exec.CommandContext(ctx, cmdline[0], append(cmdline[1:], args...)...)
	cmd.Env = c.env
	return run(cmd)
}

// CRICtr runs ctr in CRINamespace, where the CRI plugin keeps its
// containers, and returns its output and exit code. err is set only when
// ctr could not run at all.
func (c *Containerd) CRICtr(ctx context.Context, args ...string) (Result, error) {
	return c.ctrIn(ctx, CRINamespace, args...)
}

// leaks lists what pods left: mounts under the CRI state dir (network
// namespaces, /dev/shm), sandbox and container directories, veths on the
// bridge, and IP addresses still allocated.
func (r *CRI) leaks() []string {
	var leaks []string
	for _, m := range mountsUnder(r.stateDir) {
		leaks = append(leaks, "mount "+m)
	}
	for _, base := range []string{r.stateDir, r.rootDir} {
		for _, kind := range []string{"sandboxes", "containers"} {
			dirs, _ := filepath.Glob(filepath.Join(base, kind, "*"))
			for _, d := range dirs {
				leaks = append(leaks, "CRI directory "+d)
			}
		}
	}
	// The bundles of the sandbox API's sandboxes (ColoShimHandler).
	for _, base := range []string{"state", "root"} {
		bundles, _ := filepath.Glob(filepath.Join(r.dir, base, shimSandboxController, "*", "*"))
		for _, b := range bundles {
			leaks = append(leaks, "sandbox bundle "+b)
		}
	}
	netns, _ := filepath.Glob(filepath.Join(r.stateDir, "netns", "*"))
	for _, n := range netns {
		leaks = append(leaks, "network namespace "+n)
	}
	ports, _ := os.ReadDir(filepath.Join("/sys/class/net", r.Bridge, "brif"))
	for _, p := range ports {
		leaks = append(leaks, "interface "+p.Name()+" on bridge "+r.Bridge)
	}
	ips, _ := os.ReadDir(filepath.Join(r.cniDataDir, cniNetwork))
	for _, ip := range ips {
		if net.ParseIP(ip.Name()) != nil {
			leaks = append(leaks, "IP address "+ip.Name()+" allocated")
		}
	}
	return leaks
}

// stop removes what the CRI plugin leaves outside Dir, and unmounts its
// mounts of pods that were not removed so Dir can go. Run it after
// containerd has exited.
func (r *CRI) stop() error {
	var errs []error
	mounts, err := storage.MountsUnder(r.stateDir)
	if err != nil {
		errs = append(errs, err)
	}
	// Deepest first: a pod's shm mount lies below its sandbox dir.
	for i := len(mounts) - 1; i >= 0; i-- {
		if err := syscall.Unmount(mounts[i], syscall.MNT_DETACH); err != nil {
			errs = append(errs, fmt.Errorf("unmount %s: %w", mounts[i], err))
		}
	}
	if link, err := netlink.LinkByName(r.Bridge); err == nil {
		if err := netlink.LinkDel(link); err != nil {
			errs = append(errs, fmt.Errorf("delete bridge %s: %w", r.Bridge, err))
		}
	}
	if r.ipForward == "0" {
		if b, err := os.ReadFile(ipForwardPath); err == nil && strings.TrimSpace(string(b)) != "0" {
			if err := os.WriteFile(ipForwardPath, []byte("0\n"), 0o644); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// freeSubnet returns a /24 of podNetworks that overlaps none of used,
// trying them from seed on, so that test beds with different seeds that
// start at once are unlikely to pick the same one.
func freeSubnet(seed uint32, used []*net.IPNet) (*net.IPNet, error) {
	base := podNetworks.IP.To4()
	for i := range uint32(256) {
		n := byte((seed + i) % 256)
		subnet := &net.IPNet{IP: net.IPv4(base[0], base[1], n, 0).To4(), Mask: net.CIDRMask(24, 32)}
		free := true
		for _, u := range used {
			if u.Contains(subnet.IP) || subnet.Contains(u.IP) {
				free = false
				break
			}
		}
		if free {
			return subnet, nil
		}
	}
	return nil, fmt.Errorf("no free /24 in %s", podNetworks.String())
}

// usedNetworks lists the IPv4 networks this machine routes (main table,
// default route excepted) or has addresses in.
func usedNetworks() ([]*net.IPNet, error) {
	b, err := os.ReadFile("/proc/net/route")
	if err != nil {
		return nil, err
	}
	used, err := parseRoutes(string(b))
	if err != nil {
		return nil, err
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil {
			used = append(used, &net.IPNet{IP: n.IP.Mask(n.Mask), Mask: n.Mask})
		}
	}
	return used, nil
}

// parseRoutes reads /proc/net/route: destination and mask are hex in host
// (little-endian) byte order.
func parseRoutes(table string) ([]*net.IPNet, error) {
	var nets []*net.IPNet
	lines := strings.Split(strings.TrimSpace(table), "\n")
	for _, line := range lines[1:] { // the header
		f := strings.Fields(line)
		if len(f) < 8 {
			return nil, fmt.Errorf("/proc/net/route: bad line %q", line)
		}
		dst, err1 := strconv.ParseUint(f[1], 16, 32)
		mask, err2 := strconv.ParseUint(f[7], 16, 32)
		if err := errors.Join(err1, err2); err != nil {
			return nil, fmt.Errorf("/proc/net/route: %q: %w", line, err)
		}
		if mask == 0 {
			continue
		}
		n := &net.IPNet{IP: make(net.IP, 4), Mask: make(net.IPMask, 4)}
		binary.LittleEndian.PutUint32(n.IP, uint32(dst))
		binary.LittleEndian.PutUint32(n.Mask, uint32(mask))
		nets = append(nets, n)
	}
	return nets, nil
}

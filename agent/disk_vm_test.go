package agent_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/hypervisor/driver"
)

// TestDisksInRealGuest boots the real guest ($COLO_TEST_GUEST) and
// hot-plugs ext4 disks on each bus: the agent finds each by the PCI path
// AddDisk gives, loads its drivers (on-demand modules) and mounts it. A
// virtio-blk disk is the rootfs of two containers in turn, the NVMe and
// virtio-scsi disks are the sandbox's, bound into the containers; each
// container reads the files the host put on the disks, and the second
// sees in the guest's mount table that the first's rootfs was unmounted,
// a third that the sandbox's disks were with the sandbox.
// The disks are unplugged once the guest let go of them, and the VM
// leaves no process behind.
func TestDisksInRealGuest(t *testing.T) {
	guest := os.Getenv("COLO_TEST_GUEST")
	if guest == "" {
		t.Skip("set COLO_TEST_GUEST to the guest image's directory (make guest) to boot the real agent")
	}
	if os.Geteuid() != 0 {
		t.Skip("booting VMs needs root")
	}
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		t.Skipf("no mkfs.ext4: %v", err)
	}
	busybox, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skipf("no static busybox: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// The host's disks: ext4 images with busybox and a file naming the bus.
	images := t.TempDir()
	buses := []hypervisor.DiskBus{hypervisor.DiskVirtioBlk, hypervisor.DiskNVMe, hypervisor.DiskVirtioSCSI}
	files := map[hypervisor.DiskBus]*os.File{}
	for _, bus := range buses {
		tree := filepath.Join(images, string(bus))
		if err := os.MkdirAll(filepath.Join(tree, "bin"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(tree, "bin/busybox"), busybox, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(tree, "hello"), []byte("hello from "+string(bus)+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		img := tree + ".img"
		if out, err := exec.CommandContext(ctx, mkfs, "-q", "-F", "-d", tree, img, "16M").CombinedOutput(); err != nil {
			t.Fatalf("mkfs.ext4: %v: %s", err, out)
		}
		f, err := os.OpenFile(img, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		files[bus] = f
	}

	cfg := config.Default().Hypervisor
	cfg.Machine = "q35"
	cfg.Accel = "tcg"
	cfg.Kernel, cfg.Initrd = filepath.Join(guest, "vmlinux"), filepath.Join(guest, "initrd.img")
	drv, err := driver.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	vm, err := drv.Start(ctx, hypervisor.VMConfig{ID: "disks", Dir: dir, Channel: hypervisor.ChannelSerial,
		AgentPort:    hypervisor.GuestPort{Serial: agentproto.SerialPortName},
		KernelParams: []string{"colo.channel=" + string(hypervisor.ChannelSerial)}})
	if err != nil {
		t.Fatal(err)
	}
	pid := vm.Pid()
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := vm.Stop(sctx); err != nil {
			t.Errorf("Stop: %v", err)
		}
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("QEMU (pid %d) after Stop: kill 0: %v, want ESRCH", pid, err)
		}
	}()
	agent := dialAgent(t, ctx, vm)

	// Hot-plugged after boot, as the shim does.
	storages := map[hypervisor.DiskBus]*agentproto.Storage{}
	for _, bus := range buses {
		gd, err := vm.AddDisk(ctx, hypervisor.Disk{ID: "disk-" + string(bus), File: files[bus], Bus: bus})
		if err != nil {
			t.Fatalf("AddDisk %s: %v", bus, err)
		}
		t.Logf("%s disk at PCI path %s, SCSI address %q", bus, gd.PCIPath, gd.SCSIAddress)
		storages[bus] = &agentproto.Storage{Driver: string(bus), Source: gd.PCIPath, ScsiAddress: gd.SCSIAddress, Fstype: "ext4"}
	}
	nvme, scsi := storages[hypervisor.DiskNVMe], storages[hypervisor.DiskVirtioSCSI]
	nvme.MountPoint, scsi.MountPoint = agentproto.PodDiskPath(0), agentproto.PodDiskPath(1)
	scsi.Options = []string{"ro"}
	if _, err := agent.CreateSandbox(ctx, &agentproto.CreateSandboxRequest{SandboxId: "disks", Storages: []*agentproto.Storage{nvme, scsi}}); err != nil {
		t.Fatalf("CreateSandbox with the NVMe and virtio-scsi disks: %v", err)
	}

	blk := storages[hypervisor.DiskVirtioBlk]
	script := "cat /hello /nvme/hello /scsi/hello; grep -c ' /run/colo/block/' /proc/1/mountinfo; " +
		"grep -o ' /run/colo/block/[^ ]*' /proc/1/mountinfo; touch /scsi/x 2>/dev/null && echo scsi writable; true"
	for _, id := range []string{"c1", "c2"} {
		blk.MountPoint = agentproto.BlockRootfsPath(id)
		out := runContainer(t, ctx, agent, id, blk, script, true)
		want := fmt.Sprintf("hello from virtio-blk\nhello from nvme\nhello from virtio-scsi\n1\n /run/colo/block/%s/rootfs\n", id)
		if out != want {
			t.Errorf("container %s on the virtio-blk disk said %q, want %q", id, out, want)
		}
	}

	if _, err := agent.DestroySandbox(ctx, &agentproto.DestroySandboxRequest{}); err != nil {
		t.Fatalf("DestroySandbox: %v", err)
	}
	// The sandbox's disks are unmounted with it.
	blk.MountPoint = agentproto.BlockRootfsPath("c3")
	if out := runContainer(t, ctx, agent, "c3", blk, "grep -c ' /run/colo/disks/' /proc/1/mountinfo; true", false); out != "0\n" {
		t.Errorf("mounts below %s after DestroySandbox: %q, want 0", agentproto.PodDisksDir, out)
	}
	// Unplugged: the guest lets go of devices it has no mount on.
	for _, bus := range buses {
		if err := vm.RemoveDisk(ctx, "disk-"+string(bus)); err != nil {
			t.Errorf("RemoveDisk %s: %v", bus, err)
		}
	}
}

// dialAgent returns the agent's ttrpc service over the VM's channel.
func dialAgent(t *testing.T, ctx context.Context, vm hypervisor.VM) agentproto.AgentService {
	t.Helper()
	conn, err := vm.DialAgent(ctx)
	if err != nil {
		t.Fatal(err)
	}
	client := ttrpc.NewClient(conn)
	t.Cleanup(func() { client.Close() })
	agent := agentproto.NewAgentClient(client)
	// Over virtio-serial a call sent before the agent opened its port may
	// be lost: Check again until it answers.
	for {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := agent.Check(cctx, &agentproto.CheckRequest{})
		cancel()
		if err == nil {
			return agent
		}
		if ctx.Err() != nil {
			t.Fatalf("the agent did not answer: %v", err)
		}
	}
}

// runContainer runs script in a container whose rootfs is the disk
// rootfs, with the guest's PID namespace (its /proc/1 is the agent's) and,
// with podDisks, the sandbox's disks bound at /nvme and /scsi; removes it,
// and returns its output.
func runContainer(t *testing.T, ctx context.Context, agent agentproto.AgentService, id string, rootfs *agentproto.Storage, script string, podDisks bool) string {
	t.Helper()
	mounts := []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc"},
		{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "mode=755", "size=1m"}},
	}
	if podDisks {
		mounts = append(mounts,
			specs.Mount{Destination: "/nvme", Type: "bind", Source: agentproto.PodDiskPath(0), Options: []string{"rbind"}},
			specs.Mount{Destination: "/scsi", Type: "bind", Source: agentproto.PodDiskPath(1), Options: []string{"rbind"}})
	}
	spec := &specs.Spec{
		Version: specs.Version,
		Process: &specs.Process{Args: []string{"/bin/busybox", "sh", "-c", script}, Env: []string{"PATH=/bin"}, Cwd: "/"},
		Root:    &specs.Root{Path: rootfs.GetMountPoint()},
		Mounts:  mounts,
		Linux: &specs.Linux{
			Namespaces:  []specs.LinuxNamespace{{Type: specs.MountNamespace}},
			CgroupsPath: "/disks/" + id,
		},
	}
	b, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := agent.CreateContainer(ctx, &agentproto.CreateContainerRequest{
		ContainerId: id, OciSpec: b, Storages: []*agentproto.Storage{rootfs}, Stdout: true, Stderr: true,
	}); err != nil {
		t.Fatalf("CreateContainer %s on the %s disk: %v", id, rootfs.GetDriver(), err)
	}
	if _, err := agent.StartContainer(ctx, &agentproto.StartContainerRequest{ContainerId: id}); err != nil {
		t.Fatalf("StartContainer %s: %v", id, err)
	}
	var out, errOut strings.Builder
	for _, s := range []struct {
		read func(context.Context, *agentproto.ReadStreamRequest) (*agentproto.ReadStreamResponse, error)
		to   *strings.Builder
	}{{agent.ReadStdout, &out}, {agent.ReadStderr, &errOut}} {
		for {
			r, err := s.read(ctx, &agentproto.ReadStreamRequest{ContainerId: id, Len: 32 << 10})
			if err != nil {
				t.Fatalf("read the output of %s: %v", id, err)
			}
			s.to.Write(r.GetData())
			if r.GetEof() {
				break
			}
		}
	}
	w, err := agent.WaitProcess(ctx, &agentproto.WaitProcessRequest{ContainerId: id})
	if err != nil {
		t.Fatalf("WaitProcess %s: %v", id, err)
	}
	if w.GetExitStatus() != 0 || errOut.Len() > 0 {
		t.Errorf("container %s: exit status %d, stderr %q", id, w.GetExitStatus(), errOut.String())
	}
	if _, err := agent.RemoveContainer(ctx, &agentproto.RemoveContainerRequest{ContainerId: id}); err != nil {
		t.Fatalf("RemoveContainer %s: %v", id, err)
	}
	return out.String()
}

package qemu

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
)

func TestArgs(t *testing.T) {
	base := strings.Join(baseKernelParams, " ")
	common := func(kernelCmdline string) []string {
		return []string{
			"-kernel", "/k/vmlinux", "-initrd", "/k/initrd.img",
			"-append", kernelCmdline,
			"-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-vga", "none",
			"-serial", "stdio",
			"-pidfile", "/run/vm/qemu.pid",
			"-chardev", "socket,id=qmp,fd=3,server=on,wait=off",
			"-mon", "chardev=qmp,mode=control",
			"-action", "panic=pause", "-device", "pvpanic",
		}
	}
	vm := hypervisor.VMConfig{
		ID: "pod,1", Dir: "/run/vm", VCPUs: 2, MemoryMB: 512,
		Kernel: "/k/vmlinux", Initrd: "/k/initrd.img",
		KernelParams: []string{"colo.log=debug"},
		AgentPort:    testAgentPort,
	}
	for _, tc := range []struct {
		name string
		l    launch
		want [][]string
	}{{
		name: "q35 tcg serial 9p",
		l: launch{
			machine: "q35", accel: accelTCG, tscKHz: 2300000,
			vm: with(vm, func(c *hypervisor.VMConfig) {
				c.Channel = hypervisor.ChannelSerial
				c.Shares = []hypervisor.Share{
					{Tag: "colo-shared", Kind: hypervisor.Share9P, Path: "/run/vm/shared,x"},
					{Tag: "ro", Kind: hypervisor.Share9P, Path: "/ro", ReadOnly: true},
				}
			}),
			pidfile: "/run/vm/qemu.pid", qmpFD: 3, agentFD: 4,
		},
		want: [][]string{
			{"-name", "guest=pod,,1,debug-threads=on", "-machine", "q35",
				"-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "512M"},
			common(base + " colo.log=debug"),
			{"-device", "virtio-serial-pci,id=vser0",
				"-chardev", "socket,id=agent,fd=4,server=on,wait=off",
				"-device", "virtserialport,bus=vser0.0,chardev=agent,name=agent.0,id=agentport",
				"-device", "vmgenid,guid=auto",
				"-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on,deflate-on-oom=on",
				"-fsdev", "local,id=fs0,path=/run/vm/shared,,x,security_model=none,multidevs=remap",
				"-device", "virtio-9p-pci,fsdev=fs0,mount_tag=colo-shared",
				"-fsdev", "local,id=fs1,path=/ro,security_model=none,multidevs=remap,readonly=on",
				"-device", "virtio-9p-pci,fsdev=fs1,mount_tag=ro"},
		},
	}, {
		name: "microvm kvm vsock virtio-fs",
		l: launch{
			machine: "microvm", accel: accelKVM, tscKHz: 2300000,
			vm: with(vm, func(c *hypervisor.VMConfig) {
				c.Channel = hypervisor.ChannelVsock
				c.Shares = []hypervisor.Share{{Tag: "colo-shared", Kind: hypervisor.ShareVirtioFS, Path: "/run/vm/virtiofsd.sock"}}
			}),
			pidfile: "/run/vm/qemu.pid", qmpFD: 3, vhostFD: 4, cid: 1234,
		},
		want: [][]string{
			{"-name", "guest=pod,,1,debug-threads=on", "-machine", "microvm,memory-backend=mem",
				"-global", "virtio-mmio.force-legacy=false",
				"-accel", "kvm", "-cpu", "host", "-smp", "2", "-m", "512M",
				"-object", "memory-backend-memfd,id=mem,size=512M,share=on"},
			common(base + " tsc_early_khz=2300000 colo.log=debug"),
			{"-device", "vhost-vsock-device,id=vsock0,guest-cid=1234,vhostfd=4",
				"-device", "virtio-balloon-device,id=balloon0,free-page-reporting=on,deflate-on-oom=on",
				"-chardev", "socket,id=fs0,path=/run/vm/virtiofsd.sock",
				"-device", "vhost-user-fs-device,chardev=fs0,tag=colo-shared,id=fs0-dev"},
		},
	}, {
		name: "q35 nics and hotplug ports",
		l: launch{
			machine: "q35", accel: accelTCG,
			vm: with(vm, func(c *hypervisor.VMConfig) {
				c.Channel = hypervisor.ChannelSerial
				c.NICs = []hypervisor.NIC{
					{ID: "eth0", MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, MTU: 1450},
					{ID: "eth1", MAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}},
				}
			}),
			pidfile: "/run/vm/qemu.pid", qmpFD: 3, agentFD: 4, nicFDs: []int{5, 6}, vhostNet: true, hotplugPorts: 2,
		},
		want: [][]string{
			{"-name", "guest=pod,,1,debug-threads=on", "-machine", "q35",
				"-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "512M"},
			common(base + " colo.log=debug"),
			{"-device", "virtio-serial-pci,id=vser0",
				"-chardev", "socket,id=agent,fd=4,server=on,wait=off",
				"-device", "virtserialport,bus=vser0.0,chardev=agent,name=agent.0,id=agentport",
				"-netdev", "tap,id=eth0,fd=5,vhost=on",
				"-device", "virtio-net-pci,netdev=eth0,id=eth0-dev,mac=02:00:00:00:00:01,host_mtu=1450",
				"-netdev", "tap,id=eth1,fd=6,vhost=on",
				"-device", "virtio-net-pci,netdev=eth1,id=eth1-dev,mac=02:00:00:00:00:02",
				"-device", "pcie-root-port,id=hp0,bus=pcie.0,chassis=1",
				"-device", "pcie-root-port,id=hp1,bus=pcie.0,chassis=2",
				"-device", "vmgenid,guid=auto",
				"-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on,deflate-on-oom=on"},
		},
	}, {
		name: "q35 emulated NICs: no vhost, no host_mtu",
		l: launch{
			machine: "q35", accel: accelTCG,
			vm: with(vm, func(c *hypervisor.VMConfig) {
				c.Channel = hypervisor.ChannelSerial
				c.NICs = []hypervisor.NIC{
					{ID: "eth0", MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, MTU: 1450, Model: hypervisor.NICE1000E},
					{ID: "eth1", MAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, MTU: 1450, Model: hypervisor.NICIGB},
					{ID: "eth2", MAC: net.HardwareAddr{2, 0, 0, 0, 0, 3}, MTU: 1450, Model: hypervisor.NICVirtio},
				}
			}),
			pidfile: "/run/vm/qemu.pid", qmpFD: 3, agentFD: 4, nicFDs: []int{5, 6, 7}, vhostNet: true,
		},
		want: [][]string{
			{"-name", "guest=pod,,1,debug-threads=on", "-machine", "q35",
				"-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "512M"},
			common(base + " colo.log=debug"),
			{"-device", "virtio-serial-pci,id=vser0",
				"-chardev", "socket,id=agent,fd=4,server=on,wait=off",
				"-device", "virtserialport,bus=vser0.0,chardev=agent,name=agent.0,id=agentport",
				"-netdev", "tap,id=eth0,fd=5,vhost=off",
				"-device", "e1000e,netdev=eth0,id=eth0-dev,mac=02:00:00:00:00:01",
				"-netdev", "tap,id=eth1,fd=6,vhost=off",
				"-device", "igb,netdev=eth1,id=eth1-dev,mac=02:00:00:00:00:02",
				"-netdev", "tap,id=eth2,fd=7,vhost=on",
				"-device", "virtio-net-pci,netdev=eth2,id=eth2-dev,mac=02:00:00:00:00:03,host_mtu=1450",
				"-device", "vmgenid,guid=auto",
				"-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on,deflate-on-oom=on"},
		},
	}, {
		name: "template with 9p: memory in a file, shared",
		l: launch{
			machine: "q35", accel: accelTCG, snapshot: snapshotTemplate, memPath: "/t/memory",
			vm: with(vm, func(c *hypervisor.VMConfig) {
				c.Channel = hypervisor.ChannelSerial
				c.Shares = []hypervisor.Share{{Tag: "colo-shared", Kind: hypervisor.Share9P, Path: "/t/share0"}}
				c.NICs = []hypervisor.NIC{{ID: "eth0", MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}}}
			}),
			pidfile: "/run/vm/qemu.pid", qmpFD: 3, agentFD: 4, hotplugPorts: 1,
		},
		want: [][]string{
			{"-name", "guest=pod,,1,debug-threads=on", "-machine", "q35,memory-backend=mem",
				"-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "512M",
				"-object", "memory-backend-file,id=mem,size=512M,mem-path=/t/memory,share=on"},
			common(base + " colo.log=debug"),
			{"-device", "virtio-serial-pci,id=vser0",
				"-chardev", "socket,id=agent,fd=4,server=on,wait=off",
				"-device", "virtserialport,bus=vser0.0,chardev=agent,name=agent.0,id=agentport",
				"-device", "pcie-root-port,id=hp0,bus=pcie.0,chassis=1",
				"-device", "vmgenid,guid=auto",
				"-fsdev", "local,id=fs0,path=/t/share0,security_model=none,multidevs=remap",
				"-device", "virtio-9p-pci,fsdev=fs0,mount_tag=colo-shared"},
		},
	}, {
		name: "clone with virtio-fs: memory from the stream, device hot-plugged",
		l: launch{
			machine: "q35", accel: accelTCG, snapshot: snapshotClone,
			vm: with(vm, func(c *hypervisor.VMConfig) {
				c.Channel = hypervisor.ChannelSerial
				c.Shares = []hypervisor.Share{{Tag: "colo-shared", Kind: hypervisor.ShareVirtioFS, Path: "/run/vm/virtiofsd.sock"}}
			}),
			pidfile: "/run/vm/qemu.pid", qmpFD: 3, agentFD: 4, hotplugPorts: 1,
		},
		want: [][]string{
			{"-name", "guest=pod,,1,debug-threads=on", "-machine", "q35,memory-backend=mem",
				"-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "512M",
				"-object", "memory-backend-memfd,id=mem,size=512M,share=on"},
			common(base + " colo.log=debug"),
			{"-device", "virtio-serial-pci,id=vser0",
				"-chardev", "socket,id=agent,fd=4,server=on,wait=off",
				"-device", "virtserialport,bus=vser0.0,chardev=agent,name=agent.0,id=agentport",
				"-device", "pcie-root-port,id=hp0,bus=pcie.0,chassis=1",
				"-device", "vmgenid,guid=auto",
				"-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on,deflate-on-oom=on",
				"-chardev", "socket,id=fs0,path=/run/vm/virtiofsd.sock",
				"-incoming", "defer"},
		},
	}, {
		name: "q35 headroom: one vCPU booted, the others cold-plugged; virtio-mem above the base",
		l: launch{
			machine: "q35", accel: accelTCG,
			vm: with(vm, func(c *hypervisor.VMConfig) {
				c.Channel = hypervisor.ChannelSerial
				c.VCPUs, c.MaxVCPUs = 3, 4
				c.MemoryMB, c.BaseMemoryMB, c.MaxMemoryMB = 768, 256, 4096
			}),
			pidfile: "/run/vm/qemu.pid", qmpFD: 3, agentFD: 4,
		},
		want: [][]string{
			{"-name", "guest=pod,,1,debug-threads=on", "-machine", "q35",
				"-accel", "tcg,thread=multi", "-cpu", "max",
				"-smp", "1,sockets=1,cores=4,threads=1,maxcpus=4", "-m", "256M,slots=1,maxmem=4096M",
				"-device", "max-x86_64-cpu,id=cpu1,socket-id=0,core-id=1,thread-id=0",
				"-device", "max-x86_64-cpu,id=cpu2,socket-id=0,core-id=2,thread-id=0",
				"-object", "memory-backend-ram,id=vmem,size=3840M,reserve=off",
				"-device", "virtio-mem-pci,id=vmem0,memdev=vmem,block-size=2M,requested-size=512M"},
			common(base + " memhp_default_state=online_movable colo.log=debug"),
			{"-device", "virtio-serial-pci,id=vser0",
				"-chardev", "socket,id=agent,fd=4,server=on,wait=off",
				"-device", "virtserialport,bus=vser0.0,chardev=agent,name=agent.0,id=agentport",
				"-device", "vmgenid,guid=auto",
				"-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on,deflate-on-oom=on"},
		},
	}, {
		name: "q35 kvm headroom with virtio-fs: virtio-mem memory shared too",
		l: launch{
			machine: "q35", accel: accelKVM,
			vm: with(vm, func(c *hypervisor.VMConfig) {
				c.Channel = hypervisor.ChannelVsock
				c.VCPUs, c.MaxVCPUs = 2, 2
				c.MemoryMB, c.MaxMemoryMB = 512, 1024
				c.Shares = []hypervisor.Share{{Tag: "colo-shared", Kind: hypervisor.ShareVirtioFS, Path: "/run/vm/virtiofsd.sock"}}
			}),
			pidfile: "/run/vm/qemu.pid", qmpFD: 3, vhostFD: 4, cid: 1234,
		},
		want: [][]string{
			{"-name", "guest=pod,,1,debug-threads=on", "-machine", "q35,memory-backend=mem",
				"-accel", "kvm", "-cpu", "host", "-smp", "2", "-m", "512M,slots=1,maxmem=1024M",
				"-object", "memory-backend-memfd,id=mem,size=512M,share=on",
				"-object", "memory-backend-memfd,id=vmem,size=512M,share=on,reserve=off",
				"-device", "virtio-mem-pci,id=vmem0,memdev=vmem,block-size=2M,requested-size=0M"},
			common(base + " memhp_default_state=online_movable colo.log=debug"),
			{"-device", "vhost-vsock-pci,id=vsock0,guest-cid=1234,vhostfd=4",
				"-device", "vmgenid,guid=auto",
				"-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on,deflate-on-oom=on",
				"-chardev", "socket,id=fs0,path=/run/vm/virtiofsd.sock",
				"-device", "vhost-user-fs-pci,chardev=fs0,tag=colo-shared,id=fs0-dev"},
		},
	}, {
		name: "kvm vCPU devices are host CPUs",
		l: launch{
			machine: "q35", accel: accelKVM,
			vm: with(vm, func(c *hypervisor.VMConfig) {
				c.Channel = hypervisor.ChannelSerial
				c.VCPUs, c.MaxVCPUs = 2, 3
			}),
			pidfile: "/run/vm/qemu.pid", qmpFD: 3, agentFD: 4,
		},
		want: [][]string{
			{"-name", "guest=pod,,1,debug-threads=on", "-machine", "q35",
				"-accel", "kvm", "-cpu", "host",
				"-smp", "1,sockets=1,cores=3,threads=1,maxcpus=3", "-m", "512M",
				"-device", "host-x86_64-cpu,id=cpu1,socket-id=0,core-id=1,thread-id=0"},
			common(base + " colo.log=debug"),
			{"-device", "virtio-serial-pci,id=vser0",
				"-chardev", "socket,id=agent,fd=4,server=on,wait=off",
				"-device", "virtserialport,bus=vser0.0,chardev=agent,name=agent.0,id=agentport",
				"-device", "vmgenid,guid=auto",
				"-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on,deflate-on-oom=on"},
		},
	}, {
		name: "template with 9p and headroom: no balloon (its memory is the clones'), virtio-mem not shared",
		l: launch{
			machine: "q35", accel: accelTCG, snapshot: snapshotTemplate, memPath: "/t/memory",
			vm: with(vm, func(c *hypervisor.VMConfig) {
				c.Channel = hypervisor.ChannelSerial
				c.VCPUs, c.MaxVCPUs = 1, 4
				c.MemoryMB, c.MaxMemoryMB = 256, 2048
			}),
			pidfile: "/run/vm/qemu.pid", qmpFD: 3, agentFD: 4,
		},
		want: [][]string{
			{"-name", "guest=pod,,1,debug-threads=on", "-machine", "q35,memory-backend=mem",
				"-accel", "tcg,thread=multi", "-cpu", "max",
				"-smp", "1,sockets=1,cores=4,threads=1,maxcpus=4", "-m", "256M,slots=1,maxmem=2048M",
				"-object", "memory-backend-file,id=mem,size=256M,mem-path=/t/memory,share=on",
				"-object", "memory-backend-ram,id=vmem,size=1792M,reserve=off",
				"-device", "virtio-mem-pci,id=vmem0,memdev=vmem,block-size=2M,requested-size=0M"},
			common(base + " memhp_default_state=online_movable colo.log=debug"),
			{"-device", "virtio-serial-pci,id=vser0",
				"-chardev", "socket,id=agent,fd=4,server=on,wait=off",
				"-device", "virtserialport,bus=vser0.0,chardev=agent,name=agent.0,id=agentport",
				"-device", "vmgenid,guid=auto"},
		},
	}, {
		name: "microvm ignores headroom",
		l: launch{
			machine: "microvm", accel: accelTCG,
			vm: with(vm, func(c *hypervisor.VMConfig) {
				c.Channel = hypervisor.ChannelSerial
				c.MaxVCPUs, c.BaseMemoryMB, c.MaxMemoryMB = 4, 256, 4096
			}),
			pidfile: "/run/vm/qemu.pid", qmpFD: 3, agentFD: 4,
		},
		want: [][]string{
			{"-name", "guest=pod,,1,debug-threads=on", "-machine", "microvm",
				"-global", "virtio-mmio.force-legacy=false",
				"-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "512M"},
			common(base + " colo.log=debug"),
			{"-device", "virtio-serial-device,id=vser0",
				"-chardev", "socket,id=agent,fd=4,server=on,wait=off",
				"-device", "virtserialport,bus=vser0.0,chardev=agent,name=agent.0,id=agentport",
				"-device", "virtio-balloon-device,id=balloon0,free-page-reporting=on,deflate-on-oom=on"},
		},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			got := tc.l.args()
			want := slices.Concat(tc.want...)
			if !slices.Equal(got, want) {
				t.Errorf("args:\ngot  %q\nwant %q", got, want)
			}
		})
	}
}

func TestArgsSandbox(t *testing.T) {
	const sandbox = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
	vm := hypervisor.VMConfig{
		ID: "pod", Dir: "/run/vm", VCPUs: 1, MemoryMB: 256,
		Kernel: "/k/vmlinux", Initrd: "/k/initrd.img", Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort,
	}
	for _, tc := range []struct {
		name string
		l    launch
		want []string // the arguments after -name's
	}{
		{"q35 on", launch{machine: "q35", sandbox: true}, []string{"-sandbox", sandbox, "-machine", "q35"}},
		{"q35 off", launch{machine: "q35"}, []string{"-machine", "q35"}},
		{"microvm on", launch{machine: "microvm", sandbox: true}, []string{"-sandbox", sandbox, "-machine", "microvm"}},
		{"template on", launch{machine: "q35", sandbox: true, snapshot: snapshotTemplate}, []string{"-sandbox", sandbox, "-machine", "q35,memory-backend=mem"}},
		{"clone on", launch{machine: "q35", sandbox: true, snapshot: snapshotClone}, []string{"-sandbox", sandbox, "-machine", "q35,memory-backend=mem"}},
		{"clone off", launch{machine: "q35", snapshot: snapshotClone}, []string{"-machine", "q35,memory-backend=mem"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.l.vm, tc.l.accel, tc.l.pidfile = vm, accelTCG, "/run/vm/qemu.pid"
			got := tc.l.args()
			if !slices.Equal(got[2:2+len(tc.want)], tc.want) {
				t.Errorf("args: got %q, want %q after -name", got, tc.want)
			}
			want := 0
			if tc.l.sandbox {
				want = 1
			}
			if n := strings.Count(strings.Join(got, " "), "-sandbox"); n != want {
				t.Errorf("-sandbox %d times in %q, want %d", n, got, want)
			}
		})
	}
}

// The sandbox is part of a template's key: a clone starts with the
// command line of the template it comes from.
func TestTemplateKeySandbox(t *testing.T) {
	dir := t.TempDir()
	var files []string
	for _, name := range []string{"qemu", "vmlinux", "initrd.img"} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(name), 0o644); err != nil {
			t.Fatal(err)
		}
		files = append(files, p)
	}
	cfg := hypervisor.VMConfig{
		ID: "pod", Dir: "/run/vm", VCPUs: 1, MemoryMB: 256, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort,
		Kernel: files[1], Initrd: files[2], TemplateDir: dir,
	}
	keys := make(map[bool]string)
	for _, sandbox := range []bool{true, false} {
		d := &Driver{path: files[0], machine: "q35", accel: accelTCG, sandbox: sandbox}
		key, err := d.templateKey(cfg)
		if err != nil {
			t.Fatal(err)
		}
		keys[sandbox] = key
	}
	if keys[true] == keys[false] {
		t.Errorf("one template key %s with the sandbox on and off", keys[true])
	}
}

func TestConfinement(t *testing.T) {
	got := confinement()
	want := []string{"--no-new-privs", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all,+chown,+dac_override,+fowner,+fsetid"}
	if !slices.Equal(got, want) {
		t.Errorf("setpriv options: got %q, want %q", got, want)
	}
}

func with(c hypervisor.VMConfig, f func(*hypervisor.VMConfig)) hypervisor.VMConfig {
	f(&c)
	return c
}

func TestChooseAccel(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	kvm := write("kvm", "") // any file that opens read-write
	noKVM := filepath.Join(dir, "missing")
	vmx := write("cpuinfo-vmx", "processor\t: 0\nflags\t\t: fpu vme vmx sse\n\nprocessor\t: 1\nflags\t\t: fpu vmx\n")
	svm := write("cpuinfo-svm", "flags\t\t: fpu svm\n")
	plain := write("cpuinfo-plain", "flags\t\t: fpu vme sse hypervisor\n")
	noFlags := write("cpuinfo-none", "processor\t: 0\n")

	for _, tc := range []struct {
		name, configured, kvm, cpuinfo string
		want, reason, err              string
	}{
		{"tcg configured", "tcg", noKVM, plain, accelTCG, "configured", ""},
		{"kvm configured", "kvm", kvm, plain, accelKVM, "configured", ""},
		{"kvm configured, no device", "kvm", noKVM, vmx, "", "", "accel kvm: open " + noKVM},
		{"auto with vmx", "auto", kvm, vmx, accelKVM, "hardware virtualization", ""},
		{"auto with svm", "", kvm, svm, accelKVM, "hardware virtualization", ""},
		{"auto without vmx or svm", "auto", kvm, plain, accelTCG, "neither vmx nor svm", ""},
		{"auto without flags", "auto", kvm, noFlags, accelTCG, "no flags line", ""},
		{"auto without /dev/kvm", "auto", noKVM, vmx, accelTCG, "no such file", ""},
		{"unknown", "hvf", kvm, vmx, "", "", `accel "hvf"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, reason, err := ChooseAccel(tc.configured, tc.kvm, tc.cpuinfo)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("got %q, %v; want an error containing %q", got, err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want || !strings.Contains(reason, tc.reason) {
				t.Fatalf("got %q (%q), %v; want %q (%q)", got, reason, err, tc.want, tc.reason)
			}
		})
	}
}

func TestHostKHz(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, cpuinfo string
		want          int
	}{
		{"first cpu", "processor\t: 0\ncpu MHz\t\t: 2299.998\n\nprocessor\t: 1\ncpu MHz\t\t: 1200.000\n", 2299998},
		{"integer", "cpu MHz : 3000\n", 3000000},
		{"missing", "processor\t: 0\n", 0},
		{"garbage", "cpu MHz\t\t: fast\n", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, tc.name)
			if err := os.WriteFile(p, []byte(tc.cpuinfo), 0o644); err != nil {
				t.Fatal(err)
			}
			got, err := hostKHz(p)
			if tc.want == 0 {
				if err == nil {
					t.Fatalf("got %d, want an error", got)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %d, %v, want %d", got, err, tc.want)
			}
		})
	}
}

func TestIsQEMU(t *testing.T) {
	cmdline := func(args ...string) []byte { return []byte(strings.Join(args, "\x00") + "\x00") }
	for _, tc := range []struct {
		name    string
		cmdline []byte
		want    bool
	}{
		{"ours", cmdline("/usr/bin/qemu-system-x86_64", "-name", "x", "-pidfile", "/run/vm/qemu.pid"), true},
		{"unclean path", cmdline("qemu-system-x86_64", "-pidfile", "/run//vm/qemu.pid"), true},
		{"other dir", cmdline("/usr/bin/qemu-system-x86_64", "-pidfile", "/run/other/qemu.pid"), false},
		{"not qemu", cmdline("/bin/sleep", "-pidfile", "/run/vm/qemu.pid"), false},
		{"pidfile last", cmdline("/usr/bin/qemu-system-x86_64", "-pidfile"), false},
		{"empty", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := isQEMU(tc.cmdline, "/run/vm/qemu.pid"); got != tc.want {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestCheckNIC(t *testing.T) {
	tap, err := os.Open(os.DevNull) // checkNIC only looks for one
	if err != nil {
		t.Fatal(err)
	}
	defer tap.Close()
	mac := net.HardwareAddr{2, 0, 0, 0, 0, 1}
	for _, tc := range []struct {
		name    string
		nic     hypervisor.NIC
		machine string
		want    string // "" for no error
	}{
		{name: "virtio by default", nic: hypervisor.NIC{ID: "n", MAC: mac, TAP: tap}, machine: "microvm"},
		{name: "virtio on microvm", nic: hypervisor.NIC{ID: "n", MAC: mac, TAP: tap, Model: hypervisor.NICVirtio}, machine: "microvm"},
		{name: "e1000e on q35", nic: hypervisor.NIC{ID: "n", MAC: mac, TAP: tap, Model: hypervisor.NICE1000E, MTU: 9000}, machine: "q35"},
		{name: "igb on q35", nic: hypervisor.NIC{ID: "n", MAC: mac, TAP: tap, Model: hypervisor.NICIGB}, machine: "q35"},
		{name: "e1000e on microvm", nic: hypervisor.NIC{ID: "n", MAC: mac, TAP: tap, Model: hypervisor.NICE1000E}, machine: "microvm", want: "microvm has only virtio-net"},
		{name: "unknown model", nic: hypervisor.NIC{ID: "n", MAC: mac, TAP: tap, Model: "rtl8139"}, machine: "q35", want: `model "rtl8139"`},
		{name: "bad id", nic: hypervisor.NIC{ID: "a,b", MAC: mac, TAP: tap}, machine: "q35", want: "want an id"},
		{name: "no TAP", nic: hypervisor.NIC{ID: "n", MAC: mac}, machine: "q35", want: "no TAP"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := checkNIC(tc.nic, tc.machine)
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("checkNIC: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("checkNIC: %v; want an error with %q", err, tc.want)
			}
		})
	}
}

// TestNICDeviceProperties checks the properties the NIC arguments set
// against the QEMU installed: each model's own (-device MODEL,help) and
// the ones every device has (id, bus). A model QEMU lacks must be one
// hasDevice reports.
func TestNICDeviceProperties(t *testing.T) {
	path, err := exec.LookPath(DefaultBinary)
	if err != nil {
		t.Skipf("no QEMU: %v", err)
	}
	mac := net.HardwareAddr{2, 0, 0, 0, 0, 1}
	for _, model := range []string{hypervisor.NICVirtio, hypervisor.NICE1000E, hypervisor.NICIGB} {
		t.Run(model, func(t *testing.T) {
			n := hypervisor.NIC{ID: "eth0", MAC: mac, MTU: 1400, Model: model}
			driver := nicDriver(n, "pci")
			// The driver refuses a configured model QEMU lacks, and only
			// such a one.
			cfg := config.Default().Hypervisor
			cfg.NICModel = model
			_, newErr := New(cfg)
			if probeErr := hasDevice(path, driver); (newErr == nil) != (probeErr == nil) {
				t.Errorf("New with nic_model %s: %v; QEMU has the device: %v", model, newErr, probeErr)
			} else if newErr != nil && !strings.Contains(newErr.Error(), "hypervisor.nic_model "+model) {
				t.Errorf("New with nic_model %s: %v; want it to name the setting", model, newErr)
			}
			out, err := exec.Command(path, "-device", driver+",help").Output()
			if err != nil {
				t.Fatalf("%s,help: %v", driver, err)
			}
			if !strings.HasPrefix(string(out), driver+" options:") {
				// Only igb may be missing (QEMU before 8.0), and then
				// hasDevice must say so.
				perr := hasDevice(path, driver)
				if model != hypervisor.NICIGB || perr == nil || !strings.Contains(perr.Error(), "not found") || !strings.Contains(perr.Error(), "8.0") {
					t.Fatalf("%s,help: %q; hasDevice: %v", driver, out, perr)
				}
				t.Logf("QEMU has no %s: %v", driver, perr)
				return
			}
			if err := hasDevice(path, driver); err != nil {
				t.Errorf("hasDevice(%s): %v", driver, err)
			}
			var props []string
			for _, line := range strings.Split(string(out), "\n") {
				if name, _, ok := strings.Cut(strings.TrimSpace(line), "="); ok {
					props = append(props, name)
				}
			}
			arg := nicDeviceArg(driver, n, "hp0")
			for _, kv := range strings.Split(arg, ",")[1:] {
				name, _, _ := strings.Cut(kv, "=")
				if name == "id" || name == "bus" {
					continue // properties of every device
				}
				if !slices.Contains(props, name) {
					t.Errorf("%s: %s has no property %s (it has %q)", arg, driver, name, props)
				}
			}
		})
	}
}

// The ports the guest listens on: the real agent's (agentproto's, which
// the driver must not know) and testdata/testinit's, which follows them.
var (
	testAgentPort   = hypervisor.GuestPort{Vsock: 1024, Serial: "agent.0"}
	testConsolePort = hypervisor.GuestPort{Serial: "console.0"}
	testForwardPort = hypervisor.GuestPort{Serial: "portforward.0"}
)

package sandbox

import (
	"context"
	"slices"
	"testing"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
)

// bareDriver is a driver with no capability beyond Start, as a new
// driver may be: no templates, no channel of its own to pick.
type bareDriver struct{}

func (bareDriver) Start(context.Context, hypervisor.VMConfig) (hypervisor.VM, error) {
	return nil, nil
}

// capableDriver has both capabilities the shim asks drivers for.
type capableDriver struct {
	bareDriver
	channel hypervisor.AgentChannel
}

func (d capableDriver) PickChannel() hypervisor.AgentChannel                     { return d.channel }
func (capableDriver) ReleaseTemplates(string) error                              { return nil }
func (capableDriver) PrepareTemplate(context.Context, hypervisor.VMConfig) error { return nil }

// TestVMConfigCapabilities: what the shim gives a driver follows the
// driver's capabilities, never its name: templates only to a Templater,
// the agent.channel auto only as a ChannelPicker picks (else vsock); and
// every driver gets the agent protocol's ports and parameters.
func TestVMConfigCapabilities(t *testing.T) {
	for _, tc := range []struct {
		name         string
		drv          hypervisor.Driver
		channel      string // agent.channel
		console      bool
		wantChannel  hypervisor.AgentChannel
		wantTemplate bool
	}{
		{name: "bare driver, auto", drv: bareDriver{}, channel: "auto", wantChannel: hypervisor.ChannelVsock},
		{name: "bare driver, serial asked", drv: bareDriver{}, channel: "serial", wantChannel: hypervisor.ChannelSerial},
		{name: "picker, auto", drv: capableDriver{channel: hypervisor.ChannelSerial}, channel: "auto", wantChannel: hypervisor.ChannelSerial, wantTemplate: true},
		{name: "picker, vsock asked", drv: capableDriver{channel: hypervisor.ChannelSerial}, channel: "vsock", wantChannel: hypervisor.ChannelVsock, wantTemplate: true},
		{name: "console", drv: bareDriver{}, channel: "vsock", console: true, wantChannel: hypervisor.ChannelVsock},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := config.Default()
			cfg.Agent.Channel = tc.channel
			cfg.Agent.DebugConsole = tc.console
			cfg.Hypervisor.KernelParams = "from=config colo.channel=other"
			cfg.Runtime.TemplateDir = "/run/colo/templates"
			s := &Sandbox{id: "sb", dir: "/run/colo/sb", cfg: cfg, driver: tc.drv, size: vmSize{1, 256}, maxSize: vmSize{2, 512}}
			vm := s.vmConfig(hypervisor.Share{Tag: agentproto.SharedTag})
			if vm.Channel != tc.wantChannel {
				t.Errorf("channel %q, want %q", vm.Channel, tc.wantChannel)
			}
			if (vm.TemplateDir != "") != tc.wantTemplate {
				t.Errorf("template dir %q with %T", vm.TemplateDir, tc.drv)
			}
			if want := (hypervisor.GuestPort{Vsock: agentproto.VsockPort, Serial: agentproto.SerialPortName}); vm.AgentPort != want {
				t.Errorf("agent port %+v, want %+v", vm.AgentPort, want)
			}
			wantParams := []string{"colo.channel=" + string(tc.wantChannel)}
			var wantConsole hypervisor.GuestPort
			if tc.console {
				wantParams = append(wantParams, agentproto.ConsoleKernelParam)
				wantConsole = hypervisor.GuestPort{Serial: agentproto.ConsolePortName}
			}
			// hypervisor.kernel_params after the channel (a test may
			// point the agent elsewhere), the log level last.
			wantParams = append(wantParams, "from=config", "colo.channel=other", "colo.log="+cfg.Agent.LogLevel)
			if !slices.Equal(vm.KernelParams, wantParams) {
				t.Errorf("kernel params %q, want %q", vm.KernelParams, wantParams)
			}
			if vm.DebugConsole != wantConsole {
				t.Errorf("debug console %+v, want %+v", vm.DebugConsole, wantConsole)
			}
			if !vm.PortForward.IsZero() {
				t.Errorf("port-forward channel %+v for a sandbox without a pod network", vm.PortForward)
			}
		})
	}
}

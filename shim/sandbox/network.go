package sandbox

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/network"
)

// MirrorState records a TAP mirrored to a pod interface, for Cleanup.
type MirrorState struct {
	Interface string `json:"interface"`
	Tap       string `json:"tap"`
}

// podNetwork brings the interfaces CNI made in the pod's network namespace
// into the VM: a TAP beside each, mirrored to it with tc, as a NIC of the
// VM with the interface's MAC, configured by the agent like the interface;
// or, for a physical NIC (an ENI, an SR-IOV VF) with devices.passthrough_nics,
// the NIC itself, passed through with VFIO (vfio.go) and configured by the
// agent the same way, by its MAC.
type podNetwork struct {
	nsPath string
	// model is the guest NIC of each (hypervisor.nic_model).
	model string
	// passthrough passes physical NICs through (devices.passthrough_nics).
	passthrough bool

	mu      sync.Mutex
	mirrors []*network.Mirror
	cfg     network.Config // what was brought in so far
}

// netnsPath is the network namespace a spec joins (the pod's), or "".
func netnsPath(s *specs.Spec) string {
	if s.Linux == nil {
		return ""
	}
	for _, ns := range s.Linux.Namespaces {
		if ns.Type == specs.NetworkNamespace {
			return ns.Path
		}
	}
	return ""
}

// attach mirrors every interface of the namespace that is not in the VM
// yet and returns them as NICs, and the physical ones to pass through
// (taken down: the caller binds them), with what the guest must be told of
// all of them. record is called with each TAP before it is made, so that a
// crash never leaves one that the state file does not name.
func (n *podNetwork) attach(record func(MirrorState) error) ([]hypervisor.NIC, []network.Interface, network.Config, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	cur, err := network.Scan(n.nsPath)
	if err != nil {
		return nil, nil, network.Config{}, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("pod network: %v", err))
	}
	var (
		nics     []hypervisor.NIC
		physical []network.Interface
		added    network.Config
	)
	for _, iface := range cur.Interfaces {
		if _, ok := n.cfg.Interface(iface.Name); ok {
			continue
		}
		if iface.PCIAddress != "" && n.passthrough {
			// Its configuration is read: the guest gets it by MAC once
			// the NIC is the VM's.
			if err := network.SetDown(n.nsPath, iface.Name); err != nil {
				return nil, nil, network.Config{}, fmt.Errorf("pod network: pass %s (PCI %s) through: %w", iface.Name, iface.PCIAddress, err)
			}
			n.cfg.Interfaces = append(n.cfg.Interfaces, iface)
			added.Interfaces = append(added.Interfaces, iface)
			physical = append(physical, iface)
			continue
		}
		i := len(n.mirrors)
		tap := "tap" + strconv.Itoa(i) + "_colo"
		if err := record(MirrorState{Interface: iface.Name, Tap: tap}); err != nil {
			return nil, nil, network.Config{}, err
		}
		m, err := network.NewMirror(n.nsPath, iface.Name, tap)
		if err != nil {
			return nil, nil, network.Config{}, fmt.Errorf("pod network: %w", err)
		}
		n.mirrors = append(n.mirrors, m)
		n.cfg.Interfaces = append(n.cfg.Interfaces, iface)
		added.Interfaces = append(added.Interfaces, iface)
		nics = append(nics, hypervisor.NIC{ID: "net" + strconv.Itoa(i), MAC: iface.MAC, MTU: iface.MTU, TAP: m.File, Model: n.model})
	}
	for _, r := range cur.Routes {
		if _, ok := added.Interface(r.Device); ok {
			added.Routes = append(added.Routes, r)
		}
	}
	for _, nb := range cur.Neighbors {
		if _, ok := added.Interface(nb.Device); ok {
			added.Neighbors = append(added.Neighbors, nb)
		}
	}
	return nics, physical, added, nil
}

// close removes the TAPs and tc set-up; the VM must be gone.
func (n *podNetwork) close() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	var errs []error
	for _, m := range n.mirrors {
		errs = append(errs, m.Close())
	}
	n.mirrors = nil
	return errors.Join(errs...)
}

// configureGuest tells the agent the interfaces, then their routes and
// neighbours.
func configureGuest(ctx context.Context, agent agentproto.AgentService, cfg network.Config) error {
	for _, iface := range cfg.Interfaces {
		req := &agentproto.Interface{Name: iface.Name, HwAddr: iface.MAC.String(), Mtu: uint32(iface.MTU)}
		for _, a := range iface.Addrs {
			req.Addresses = append(req.Addresses, &agentproto.IPAddress{Address: a.Addr().String(), PrefixLen: uint32(a.Bits())})
		}
		if _, err := agent.UpdateInterface(ctx, &agentproto.UpdateInterfaceRequest{Interface: req}); err != nil {
			return agentError("UpdateInterface", err)
		}
	}
	if len(cfg.Routes) > 0 {
		req := &agentproto.UpdateRoutesRequest{}
		for _, r := range cfg.Routes {
			rt := &agentproto.Route{Device: r.Device, Scope: uint32(r.Scope), Mtu: uint32(r.MTU)}
			if r.Dest.IsValid() {
				rt.Dest = r.Dest.String()
			}
			if r.Gateway.IsValid() {
				rt.Gateway = r.Gateway.String()
			}
			if r.Source.IsValid() {
				rt.Source = r.Source.String()
			}
			req.Routes = append(req.Routes, rt)
		}
		if _, err := agent.UpdateRoutes(ctx, req); err != nil {
			return agentError("UpdateRoutes", err)
		}
	}
	if len(cfg.Neighbors) > 0 {
		req := &agentproto.AddARPNeighborsRequest{}
		for _, nb := range cfg.Neighbors {
			req.Neighbors = append(req.Neighbors, &agentproto.Neighbor{IpAddress: nb.IP.String(), HwAddr: nb.MAC.String(), Device: nb.Device})
		}
		if _, err := agent.AddARPNeighbors(ctx, req); err != nil {
			return agentError("AddARPNeighbors", err)
		}
	}
	return nil
}

// recordMirror adds a mirror to the state file.
func (s *Sandbox) recordMirror(m MirrorState) error {
	s.stateMu.Lock()
	defer s.stateMu.Unlock()
	s.state.Mirrors = append(s.state.Mirrors, m)
	return writeState(s.dir, s.state)
}

// hotplugNetwork brings interfaces that appeared in the pod's namespace
// since the VM booted into it.
func (s *Sandbox) hotplugNetwork(ctx context.Context) error {
	if s.net == nil {
		return nil
	}
	nics, physical, added, err := s.net.attach(s.recordMirror)
	if err != nil {
		return err
	}
	// QEMU and the guest answer within the set-up bound, or the container
	// create fails.
	ctx, cancel := context.WithTimeout(ctx, time.Duration(s.cfg.Agent.CreateTimeout))
	defer cancel()
	for _, nic := range nics {
		if err := s.vm.AddNIC(ctx, nic); err != nil {
			return fmt.Errorf("hot-plug NIC for %s: %w", nic.MAC, err)
		}
	}
	for _, iface := range physical {
		if _, err := s.passthrough(ctx, iface.PCIAddress); err != nil {
			return fmt.Errorf("pod network: pass %s through: %w", iface.Name, err)
		}
	}
	if n := len(nics) + len(physical); n > 0 {
		log.G(ctx).WithFields(log.Fields{"interfaces": n, "passed_through": len(physical)}).Info("pod interfaces hot-plugged")
	}
	return configureGuest(ctx, s.agent, added)
}

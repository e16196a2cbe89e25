package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/colo-runtime/colo/agentproto"
)

// nicTimeout bounds the wait for a NIC to show up: a hot-plugged device
// takes a moment to be probed.
const nicTimeout = 10 * time.Second

// netHandle opens netlink in the service's network namespace: the guest's
// own, or the one ServiceConfig.NetNS names (tests on the host).
func (s *Service) netHandle() (*netlink.Handle, error) {
	// Route sockets only: the guest kernel lacks modules for others
	// (xfrm), and a handle asks for every family by default.
	if s.netns == "" {
		return netlink.NewHandle(unix.NETLINK_ROUTE)
	}
	ns, err := netns.GetFromPath(s.netns)
	if err != nil {
		return nil, fmt.Errorf("network namespace %s: %w", s.netns, err)
	}
	defer ns.Close()
	return netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
}

// withNetlink runs fn with a netlink handle in the service's network
// namespace, one change to the guest's network at a time.
func (s *Service) withNetlink(fn func(*netlink.Handle) error) error {
	nl, err := s.netHandle()
	if err != nil {
		return err
	}
	defer nl.Close()
	s.netMu.Lock()
	defer s.netMu.Unlock()
	return fn(nl)
}

// family is the netlink address family of ip.
func family(ip netip.Addr) int {
	if ip.Is4() {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

// UpdateInterface gives the NIC with the request's MAC the name, MTU and
// addresses of the pod interface it stands in for, and brings it up.
func (s *Service) UpdateInterface(ctx context.Context, req *agentproto.UpdateInterfaceRequest) (*agentproto.Interface, error) {
	want := req.GetInterface()
	mac, err := net.ParseMAC(want.GetHwAddr())
	if err != nil {
		return nil, fmt.Errorf("interface %s: hw_addr %q: %w", want.GetName(), want.GetHwAddr(), errdefs.ErrInvalidArgument)
	}
	var addrs []*netlink.Addr
	for _, a := range want.GetAddresses() {
		ip, err := netip.ParseAddr(a.GetAddress())
		if err != nil || int(a.GetPrefixLen()) > ip.BitLen() {
			return nil, fmt.Errorf("interface %s: address %s/%d: %w", want.GetName(), a.GetAddress(), a.GetPrefixLen(), errdefs.ErrInvalidArgument)
		}
		addrs = append(addrs, &netlink.Addr{
			IPNet: &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(int(a.GetPrefixLen()), ip.BitLen())},
			// No duplicate address detection: the address moved here
			// from the pod's veth, and must work at once.
			Flags: unix.IFA_F_NODAD,
		})
	}
	var iface *agentproto.Interface
	err = s.withNetlink(func(nl *netlink.Handle) error {
		var err error
		iface, err = s.configureLink(ctx, nl, want, mac, addrs)
		return err
	})
	return iface, err
}

// configureLink gives the NIC with the MAC the name, MTU and addresses
// wanted, brings it up and pins its interrupts.
func (s *Service) configureLink(ctx context.Context, nl *netlink.Handle, want *agentproto.Interface, mac net.HardwareAddr, addrs []*netlink.Addr) (*agentproto.Interface, error) {
	link, err := s.waitLinkByMAC(ctx, nl, mac)
	if err != nil {
		return nil, fmt.Errorf("interface %s: %w", want.GetName(), err)
	}
	if name := want.GetName(); name != "" && link.Attrs().Name != name {
		if err := rename(nl, link, name); err != nil {
			return nil, fmt.Errorf("interface %s: %w", name, err)
		}
	}
	if mtu := int(want.GetMtu()); mtu > 0 && mtu != link.Attrs().MTU {
		if err := nl.LinkSetMTU(link, mtu); err != nil {
			return nil, fmt.Errorf("interface %s: MTU %d: %w", want.GetName(), mtu, err)
		}
	}
	for _, a := range addrs {
		if err := nl.AddrReplace(link, a); err != nil {
			return nil, fmt.Errorf("interface %s: address %s: %w", want.GetName(), a.IPNet, err)
		}
	}
	if err := nl.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("interface %s: up: %w", want.GetName(), err)
	}
	if link, err = nl.LinkByIndex(link.Attrs().Index); err != nil {
		return nil, err
	}
	if err := s.pinIRQs(ctx, link.Attrs().Name); err != nil {
		log.G(ctx).WithError(err).Warn("pin network interrupts to the high-priority vCPUs")
	}
	return describeLink(nl, link)
}

// linkList lists the links, again when the kernel says the list changed
// while it was read (a NIC being hot-plugged): a dump interrupted so is
// incomplete, and it passes in a moment.
func linkList(nl *netlink.Handle) ([]netlink.Link, error) {
	var err error
	for range 10 {
		var links []netlink.Link
		if links, err = nl.LinkList(); !errors.Is(err, netlink.ErrDumpInterrupted) {
			return links, err
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil, err
}

// waitLinkByMAC finds the link with the MAC, waiting a while for a device
// that is still being probed. A NIC that is a PCI function of its own (an
// emulated e1000e, a passed-through VF or ENI) has no link until its
// driver is loaded, which the guest, without udev, leaves to the agent:
// meanwhile the drivers of network devices without one are loaded
// (loadNICDrivers), in the guest's own network only.
func (s *Service) waitLinkByMAC(ctx context.Context, nl *netlink.Handle, mac net.HardwareAddr) (netlink.Link, error) {
	ctx, cancel := context.WithTimeout(ctx, nicTimeout)
	defer cancel()
	tried := make(map[string]error)
	for {
		links, err := linkList(nl)
		if err != nil {
			return nil, fmt.Errorf("list interfaces: %w", err)
		}
		for _, l := range links {
			if l.Attrs().HardwareAddr.String() == mac.String() {
				return l, nil
			}
		}
		if s.netns == "" {
			loadNICDrivers(ctx, s.sysRoot, tried, loadDeviceDriver)
		}
		select {
		case <-ctx.Done():
			var failed []error
			for dev, err := range tried {
				if err != nil {
					failed = append(failed, fmt.Errorf("%s: %w", filepath.Base(dev), err))
				}
			}
			if len(failed) > 0 {
				return nil, fmt.Errorf("no NIC with MAC %s in the guest, and network devices without a driver: %w: %w", mac, errors.Join(failed...), errdefs.ErrNotFound)
			}
			return nil, fmt.Errorf("no NIC with MAC %s in the guest: %w", mac, errdefs.ErrNotFound)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// pciClassNetwork is the PCI base class of network controllers, as the
// class attribute begins.
const pciClassNetwork = "0x02"

// loadNICDrivers loads, with load, the driver of every PCI network
// controller below sysRoot that has none bound and is not in tried yet,
// and records each in tried with load's error.
func loadNICDrivers(ctx context.Context, sysRoot string, tried map[string]error, load func(ctx context.Context, dev string) error) {
	devs, err := filepath.Glob(filepath.Join(sysRoot, "bus/pci/devices/*"))
	if err != nil {
		return
	}
	for _, dev := range devs {
		if _, ok := tried[dev]; ok {
			continue
		}
		if _, ok := boundDriver(dev); ok {
			continue
		}
		class, err := os.ReadFile(filepath.Join(dev, "class"))
		if err != nil || !strings.HasPrefix(string(class), pciClassNetwork) {
			continue
		}
		tried[dev] = load(ctx, dev)
		if err := tried[dev]; err != nil {
			log.G(ctx).WithError(err).WithField("device", filepath.Base(dev)).Warn("load the driver of a network device")
		} else {
			log.G(ctx).WithField("device", filepath.Base(dev)).Debug("network device driver loaded")
		}
	}
}

// rename names link name; a guest NIC that holds the name already (the
// kernel names NICs eth0, eth1... in probe order) gets its own index as a
// name first.
func rename(nl *netlink.Handle, link netlink.Link, name string) error {
	if other, err := nl.LinkByName(name); err == nil && other.Attrs().Index != link.Attrs().Index {
		if err := setName(nl, other, fmt.Sprintf("if%d", other.Attrs().Index)); err != nil {
			return err
		}
	}
	return setName(nl, link, name)
}

// setName renames a link, which must be down for it.
func setName(nl *netlink.Handle, link netlink.Link, name string) error {
	up := link.Attrs().Flags&net.FlagUp != 0
	if up {
		if err := nl.LinkSetDown(link); err != nil {
			return fmt.Errorf("down %s: %w", link.Attrs().Name, err)
		}
	}
	if err := nl.LinkSetName(link, name); err != nil {
		return fmt.Errorf("rename %s to %s: %w", link.Attrs().Name, name, err)
	}
	if up {
		if err := nl.LinkSetUp(link); err != nil {
			return fmt.Errorf("up %s: %w", name, err)
		}
	}
	return nil
}

func describeLink(nl *netlink.Handle, link netlink.Link) (*agentproto.Interface, error) {
	a := link.Attrs()
	iface := &agentproto.Interface{Name: a.Name, HwAddr: a.HardwareAddr.String(), Mtu: uint32(a.MTU)}
	addrs, err := nl.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("addresses of %s: %w", a.Name, err)
	}
	for _, ad := range addrs {
		ones, _ := ad.Mask.Size()
		iface.Addresses = append(iface.Addresses, &agentproto.IPAddress{Address: ad.IP.String(), PrefixLen: uint32(ones)})
	}
	return iface, nil
}

// UpdateRoutes adds (or replaces) the routes, in order: a route through a
// gateway must come after the route that reaches the gateway.
func (s *Service) UpdateRoutes(ctx context.Context, req *agentproto.UpdateRoutesRequest) (*agentproto.UpdateRoutesResponse, error) {
	resp := &agentproto.UpdateRoutesResponse{}
	err := s.withNetlink(func(nl *netlink.Handle) error {
		for _, r := range req.GetRoutes() {
			route, err := toRoute(nl, r)
			if err != nil {
				return err
			}
			if err := nl.RouteReplace(route); err != nil {
				return fmt.Errorf("route %s via %q dev %s: %w", routeDest(r), r.GetGateway(), r.GetDevice(), err)
			}
			resp.Routes = append(resp.Routes, r)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return resp, nil
}

func routeDest(r *agentproto.Route) string {
	if r.GetDest() == "" {
		return "default"
	}
	return r.GetDest()
}

func toRoute(nl *netlink.Handle, r *agentproto.Route) (*netlink.Route, error) {
	link, err := nl.LinkByName(r.GetDevice())
	if err != nil {
		return nil, fmt.Errorf("route %s: device %q: %w", routeDest(r), r.GetDevice(), errdefs.ErrNotFound)
	}
	route := &netlink.Route{LinkIndex: link.Attrs().Index, Scope: netlink.Scope(r.GetScope()), MTU: int(r.GetMtu())}
	// Destination, gateway and source are all of one family.
	var seen netip.Addr
	if d := r.GetDest(); d != "" {
		p, err := netip.ParsePrefix(d)
		if err != nil {
			return nil, fmt.Errorf("route %s: %w", d, errdefs.ErrInvalidArgument)
		}
		route.Dst = &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
		seen = p.Addr()
	}
	for _, f := range []struct {
		what string
		v    string
		to   *net.IP
	}{{"gateway", r.GetGateway(), &route.Gw}, {"source", r.GetSource(), &route.Src}} {
		if f.v == "" {
			continue
		}
		ip, err := netip.ParseAddr(f.v)
		if err != nil || seen.IsValid() && ip.BitLen() != seen.BitLen() {
			return nil, fmt.Errorf("route %s: %s %q: %w", routeDest(r), f.what, f.v, errdefs.ErrInvalidArgument)
		}
		*f.to = ip.AsSlice()
		seen = ip
	}
	if !seen.IsValid() {
		return nil, fmt.Errorf("route: neither destination nor gateway: %w", errdefs.ErrInvalidArgument)
	}
	if route.Dst == nil {
		route.Family = family(seen) // the default route of its family
	}
	return route, nil
}

// AddARPNeighbors adds permanent neighbour entries.
func (s *Service) AddARPNeighbors(ctx context.Context, req *agentproto.AddARPNeighborsRequest) (*emptypb.Empty, error) {
	err := s.withNetlink(func(nl *netlink.Handle) error {
		for _, n := range req.GetNeighbors() {
			ip, err := netip.ParseAddr(n.GetIpAddress())
			if err != nil {
				return fmt.Errorf("neighbour %q: %w", n.GetIpAddress(), errdefs.ErrInvalidArgument)
			}
			mac, err := net.ParseMAC(n.GetHwAddr())
			if err != nil {
				return fmt.Errorf("neighbour %s: hw_addr %q: %w", ip, n.GetHwAddr(), errdefs.ErrInvalidArgument)
			}
			link, err := nl.LinkByName(n.GetDevice())
			if err != nil {
				return fmt.Errorf("neighbour %s: device %q: %w", ip, n.GetDevice(), errdefs.ErrNotFound)
			}
			state := int(n.GetState())
			if state == 0 {
				state = netlink.NUD_PERMANENT
			}
			neigh := &netlink.Neigh{LinkIndex: link.Attrs().Index, Family: family(ip), State: state, IP: ip.AsSlice(), HardwareAddr: mac}
			if err := nl.NeighSet(neigh); err != nil {
				return fmt.Errorf("neighbour %s on %s: %w", ip, n.GetDevice(), err)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

// ListInterfaces lists the guest's interfaces but loopback.
func (s *Service) ListInterfaces(ctx context.Context, req *agentproto.ListInterfacesRequest) (*agentproto.ListInterfacesResponse, error) {
	nl, err := s.netHandle()
	if err != nil {
		return nil, err
	}
	defer nl.Close()
	links, err := linkList(nl)
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	resp := &agentproto.ListInterfacesResponse{}
	for _, l := range links {
		if l.Attrs().Flags&net.FlagLoopback != 0 {
			continue
		}
		iface, err := describeLink(nl, l)
		if err != nil {
			return nil, err
		}
		resp.Interfaces = append(resp.Interfaces, iface)
	}
	return resp, nil
}

// loopbackUp brings up lo: containers of a pod share the guest's network
// namespace and talk over localhost.
func loopbackUp() error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	if err := netlink.LinkSetUp(lo); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("loopback up: %w", err)
	}
	return nil
}

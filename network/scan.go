package network

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/vfio"
)

// Interface is one interface of a pod's network namespace, as the guest NIC
// that stands in for it must look.
type Interface struct {
	Name  string
	MAC   net.HardwareAddr
	MTU   int
	Addrs []netip.Prefix
	// PCIAddress is the host PCI address of the device behind a physical
	// interface (an ENI, an SR-IOV VF: ethtool's bus info), which can be
	// passed through to the VM with VFIO; empty for virtual ones (veth).
	PCIAddress string
}

// Route is a route of the pod's main routing table through one of its
// interfaces.
type Route struct {
	// Dest is the destination; the zero Prefix is the default route.
	Dest    netip.Prefix
	Gateway netip.Addr
	Source  netip.Addr
	Device  string
	Scope   uint8
	// MTU is the route's own MTU (0: the device's). CNI plugins such as
	// Cilium set it; a guest without it loses throughput.
	MTU int
}

// Neighbor is a static neighbour entry (ARP or NDP) of the pod.
type Neighbor struct {
	IP     netip.Addr
	MAC    net.HardwareAddr
	Device string
}

// Config is a pod's network as CNI left it: what the guest must be given.
type Config struct {
	Interfaces []Interface
	Routes     []Route
	Neighbors  []Neighbor
}

// Interface returns the interface called name, if cfg has it.
func (c Config) Interface(name string) (Interface, bool) {
	for _, i := range c.Interfaces {
		if i.Name == name {
			return i, true
		}
	}
	return Interface{}, false
}

// Scan reads the network namespace at nsPath: every interface a VM can
// stand in for (an Ethernet device other than a TAP, a bridge or
// loopback), with its global addresses, the routes through them and the
// permanent neighbour entries on them. Routes the kernel made for an
// address are left out: the guest makes its own when the address is added.
func Scan(nsPath string) (Config, error) {
	var cfg Config
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return cfg, fmt.Errorf("network namespace %s: %w", nsPath, err)
	}
	defer ns.Close()
	nl, err := netlink.NewHandleAt(ns)
	if err != nil {
		return cfg, fmt.Errorf("netlink in %s: %w", nsPath, err)
	}
	defer nl.Close()
	links, err := nl.LinkList()
	if err != nil {
		return cfg, fmt.Errorf("interfaces of %s: %w", nsPath, err)
	}
	names := make(map[int]string)
	for _, l := range links {
		if !mirrorable(l) {
			continue
		}
		a := l.Attrs()
		iface := Interface{Name: a.Name, MAC: a.HardwareAddr, MTU: a.MTU}
		if l.Type() == "device" {
			if iface.PCIAddress, err = pciAddress(ns, a.Name); err != nil {
				return cfg, fmt.Errorf("device of %s in %s: %w", a.Name, nsPath, err)
			}
		}
		addrs, err := nl.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return cfg, fmt.Errorf("addresses of %s in %s: %w", a.Name, nsPath, err)
		}
		for _, ad := range addrs {
			if p, ok := prefix(ad.IPNet); ok && !p.Addr().IsLinkLocalUnicast() {
				iface.Addrs = append(iface.Addrs, p)
			}
		}
		names[a.Index] = a.Name
		cfg.Interfaces = append(cfg.Interfaces, iface)

		neighs, err := nl.NeighList(a.Index, netlink.FAMILY_ALL)
		if err != nil {
			return cfg, fmt.Errorf("neighbours of %s in %s: %w", a.Name, nsPath, err)
		}
		for _, n := range neighs {
			ip, ok := netip.AddrFromSlice(n.IP)
			if n.State&netlink.NUD_PERMANENT == 0 || !ok || len(n.HardwareAddr) == 0 {
				continue
			}
			cfg.Neighbors = append(cfg.Neighbors, Neighbor{IP: ip.Unmap(), MAC: n.HardwareAddr, Device: a.Name})
		}
	}
	routes, err := nl.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return cfg, fmt.Errorf("routes of %s: %w", nsPath, err)
	}
	for _, r := range routes {
		dev, ok := names[r.LinkIndex]
		if !ok || r.Protocol == unix.RTPROT_KERNEL || r.Type != unix.RTN_UNICAST {
			continue
		}
		rt := Route{Device: dev, Scope: uint8(r.Scope), MTU: r.MTU}
		if r.Dst != nil {
			p, ok := prefix(r.Dst)
			if !ok {
				continue
			}
			if p.Bits() != 0 || !p.Addr().IsUnspecified() {
				rt.Dest = p
			}
		}
		rt.Gateway, _ = addr(r.Gw)
		rt.Source, _ = addr(r.Src)
		cfg.Routes = append(cfg.Routes, rt)
	}
	// Routes through a gateway need the route to the gateway first.
	slices.SortStableFunc(cfg.Routes, func(a, b Route) int {
		return boolInt(a.Gateway.IsValid()) - boolInt(b.Gateway.IsValid())
	})
	return cfg, nil
}

// pciAddress is the PCI address of the device behind the interface name
// in ns, from ethtool's driver info (sysfs would show the host's view only
// where it is mounted in ns); "" for a device on another bus.
func pciAddress(ns netns.NsHandle, name string) (string, error) {
	var info *unix.EthtoolDrvinfo
	err := inNamespace(ns, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		info, err = unix.IoctlGetEthtoolDrvinfo(fd, name)
		return err
	})
	if errors.Is(err, unix.EOPNOTSUPP) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("ethtool driver info: %w", err)
	}
	bus := unix.ByteSliceToString(info.Bus_info[:])
	if vfio.CheckAddress(bus) != nil {
		return "", nil
	}
	return bus, nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// mirrorable tells whether a VM NIC can stand in for the link: an
// Ethernet device with a MAC that is not loopback, a bridge or a TAP (a
// TAP is what colo itself adds beside the link).
func mirrorable(l netlink.Link) bool {
	a := l.Attrs()
	if a.Flags&net.FlagLoopback != 0 || len(a.HardwareAddr) != 6 || a.EncapType != "ether" {
		return false
	}
	switch l.Type() {
	case "tuntap", "bridge", "openvswitch", "bond", "vxlan", "dummy":
		return false
	}
	return true
}

func prefix(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := addr(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a, ones), true
}

func addr(ip net.IP) (netip.Addr, bool) {
	if ip == nil {
		return netip.Addr{}, false
	}
	a, ok := netip.AddrFromSlice(ip)
	return a.Unmap(), ok
}

// RemoveMirror undoes what NewMirror did to the veth vethName in the
// namespace at nsPath, for a crashed runtime: the ingress qdisc (and so the
// redirect filter) on the veth, and the TAP tapName if it is still there.
// A namespace or device that is gone already counts as done.
func RemoveMirror(nsPath, vethName, tapName string) error {
	ns, err := netns.GetFromPath(nsPath)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("network namespace %s: %w", nsPath, err)
	}
	defer ns.Close()
	nl, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink in %s: %w", nsPath, err)
	}
	defer nl.Close()
	var errs []error
	if veth, err := nl.LinkByName(vethName); err == nil {
		if err := delIngress(nl, veth); err != nil {
			errs = append(errs, err)
		}
	}
	if tap, err := nl.LinkByName(tapName); err == nil {
		if err := nl.LinkDel(tap); err != nil && !gone(err) {
			errs = append(errs, fmt.Errorf("delete TAP %s: %w", tapName, err))
		}
	}
	return errors.Join(errs...)
}

// delIngress deletes the ingress qdisc of a link, and with it the filters
// under it.
func delIngress(nl *netlink.Handle, l netlink.Link) error {
	err := nl.QdiscDel(&netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: l.Attrs().Index, Parent: netlink.HANDLE_INGRESS, Handle: ingressParent,
	}})
	if err != nil && !gone(err) {
		return fmt.Errorf("ingress qdisc on %s: %w", l.Attrs().Name, err)
	}
	return nil
}

// gone tells whether a netlink error says the object is not there (any
// more): a deleted device, or a qdisc that never was.
func gone(err error) bool {
	return errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EINVAL)
}

// SetDown takes the interface name in the namespace at nsPath down. A
// physical NIC passed through to a VM must be: the host lets go of a
// device only while nothing uses it.
func SetDown(nsPath, name string) error {
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return fmt.Errorf("network namespace %s: %w", nsPath, err)
	}
	defer ns.Close()
	nl, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink in %s: %w", nsPath, err)
	}
	defer nl.Close()
	l, err := nl.LinkByName(name)
	if err != nil {
		return fmt.Errorf("interface %s in %s: %w", name, nsPath, err)
	}
	if err := nl.LinkSetDown(l); err != nil {
		return fmt.Errorf("set %s in %s down: %w", name, nsPath, err)
	}
	return nil
}

// Package network brings a pod's network into its VM. CNI gives the pod a
// veth in its network namespace; for each such interface the runtime
// creates a TAP device for the VM beside it and mirrors all traffic between
// the two with tc (an ingress qdisc on each, a match-all u32 filter with a
// mirred egress redirect to the other, both ways), the "tcfilter" model of
// Kata Containers. The guest NIC then takes the veth's MAC and addresses.
// Everything is done over netlink; nothing shells out to ip or tc.
package network

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Mirror is a TAP device mirrored to a veth in one network namespace.
type Mirror struct {
	// Veth is the interface CNI made, as it was found.
	Veth netlink.Link
	// Tap is the TAP device; File is its queue, for the hypervisor.
	Tap  netlink.Link
	File *os.File

	ns netns.NsHandle
	nl *netlink.Handle
}

// ingressParent is the parent of tc filters on an ingress qdisc (ffff:).
var ingressParent = netlink.MakeHandle(0xffff, 0)

// NewMirror creates a TAP named tapName in the network namespace at
// nsPath, gives it the MAC and MTU of the interface vethName, and mirrors
// the two both ways. The TAP is not persistent: it goes away when File and
// every copy of it (the hypervisor's) are closed. On error nothing is left.
func NewMirror(nsPath, vethName, tapName string) (_ *Mirror, retErr error) {
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return nil, fmt.Errorf("network namespace %s: %w", nsPath, err)
	}
	m := &Mirror{ns: ns}
	defer func() {
		if retErr != nil {
			m.Close()
		}
	}()
	if m.nl, err = netlink.NewHandleAt(ns); err != nil {
		return nil, fmt.Errorf("netlink in %s: %w", nsPath, err)
	}
	if m.Veth, err = m.nl.LinkByName(vethName); err != nil {
		return nil, fmt.Errorf("interface %s in %s: %w", vethName, nsPath, err)
	}
	tap := &netlink.Tuntap{
		LinkAttrs:  netlink.LinkAttrs{Name: tapName},
		Mode:       netlink.TUNTAP_MODE_TAP,
		Flags:      netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_ONE_QUEUE,
		Queues:     1,
		NonPersist: true,
	}
	// A TAP is made by ioctl on /dev/net/tun, in the caller's namespace.
	if err := inNamespace(ns, func() error { return netlink.LinkAdd(tap) }); err != nil {
		return nil, fmt.Errorf("create TAP %s: %w", tapName, err)
	}
	if len(tap.Fds) != 1 {
		return nil, fmt.Errorf("create TAP %s: got %d queues, want 1", tapName, len(tap.Fds))
	}
	m.File = tap.Fds[0]
	if m.Tap, err = m.nl.LinkByName(tapName); err != nil {
		return nil, fmt.Errorf("TAP %s: %w", tapName, err)
	}
	if err := m.nl.LinkSetHardwareAddr(m.Tap, m.Veth.Attrs().HardwareAddr); err != nil {
		return nil, fmt.Errorf("TAP %s: set MAC: %w", tapName, err)
	}
	if err := m.nl.LinkSetMTU(m.Tap, m.Veth.Attrs().MTU); err != nil {
		return nil, fmt.Errorf("TAP %s: set MTU: %w", tapName, err)
	}
	if err := m.nl.LinkSetUp(m.Tap); err != nil {
		return nil, fmt.Errorf("TAP %s: up: %w", tapName, err)
	}
	for _, l := range []netlink.Link{m.Veth, m.Tap} {
		if err := m.nl.QdiscAdd(&netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: l.Attrs().Index, Parent: netlink.HANDLE_INGRESS, Handle: ingressParent,
		}}); err != nil {
			return nil, fmt.Errorf("ingress qdisc on %s: %w", l.Attrs().Name, err)
		}
	}
	for _, dir := range [][2]netlink.Link{{m.Veth, m.Tap}, {m.Tap, m.Veth}} {
		if err := m.nl.FilterAdd(redirect(dir[0], dir[1])); err != nil {
			return nil, fmt.Errorf("redirect %s to %s: %w", dir[0].Attrs().Name, dir[1].Attrs().Name, err)
		}
	}
	return m, nil
}

// redirect is `tc filter add dev FROM parent ffff: protocol all u32 match
// u8 0 0 action mirred egress redirect dev TO`.
func redirect(from, to netlink.Link) *netlink.U32 {
	return &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: from.Attrs().Index,
			Parent:    ingressParent,
			Priority:  1,
			Protocol:  unix.ETH_P_ALL,
		},
		Sel: &netlink.TcU32Sel{Flags: netlink.TC_U32_TERMINAL, Nkeys: 1, Keys: []netlink.TcU32Key{{}}},
		Actions: []netlink.Action{&netlink.MirredAction{
			ActionAttrs:  netlink.ActionAttrs{Action: netlink.TC_ACT_STOLEN},
			MirredAction: netlink.TCA_EGRESS_REDIR,
			Ifindex:      to.Attrs().Index,
		}},
	}
}

// Close undoes NewMirror: the filters and qdiscs on the veth, the TAP
// (its own go with it once every copy of File is closed), and the handles.
func (m *Mirror) Close() error {
	var errs []error
	if m.nl != nil && m.Veth != nil {
		// Deleting the ingress qdisc deletes the filters under it.
		if err := delIngress(m.nl, m.Veth); err != nil {
			errs = append(errs, err)
		}
	}
	if m.File != nil {
		errs = append(errs, m.File.Close())
		m.File = nil
	}
	if m.nl != nil && m.Tap != nil {
		// Gone already unless a copy of its fd is still open somewhere.
		if err := m.nl.LinkDel(m.Tap); err != nil && !gone(err) {
			if _, found := m.nl.LinkByName(m.Tap.Attrs().Name); found == nil {
				errs = append(errs, fmt.Errorf("delete TAP %s: %w", m.Tap.Attrs().Name, err))
			}
		}
		m.Tap = nil
	}
	if m.nl != nil {
		m.nl.Close()
		m.nl = nil
	}
	if m.ns.IsOpen() {
		m.ns.Close()
	}
	return errors.Join(errs...)
}

// inNamespace runs fn on a thread switched into ns. A thread that cannot
// be switched back is never unlocked, so Go retires it instead of reusing
// it in the wrong namespace.
func inNamespace(ns netns.NsHandle, fn func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		runtime.UnlockOSThread()
		return err
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		return errors.Join(ferr, fmt.Errorf("return to the original network namespace: %w", err))
	}
	runtime.UnlockOSThread()
	return ferr
}

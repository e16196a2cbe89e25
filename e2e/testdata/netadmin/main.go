// Command netadmin does what a privileged container's network setup does,
// for e2e's TestPrivileged: built static, mounted into the container.
//
//	netadmin bridge NAME   create a bridge (netlink), as `ip link add NAME type bridge`
//	netadmin tun NAME      create a TUN device through /dev/net/tun
//	netadmin masq          add an nftables NAT masquerade rule (table ip colo_test)
//	netadmin list          print the rules of table ip colo_test, one line each
//
// On failure it prints "netadmin: ..." with the error (such as "operation
// not permitted") and exits 1.
package main

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

const tableName = "colo_test"

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "netadmin: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 0 {
		return errors.New("usage: netadmin bridge NAME | tun NAME | masq | list")
	}
	switch {
	case args[0] == "bridge" && len(args) == 2:
		if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: args[1]}}); err != nil {
			return fmt.Errorf("add bridge %s: %w", args[1], err)
		}
		l, err := netlink.LinkByName(args[1])
		if err != nil {
			return err
		}
		fmt.Printf("bridge %s type %s\n", l.Attrs().Name, l.Type())
		return nil
	case args[0] == "tun" && len(args) == 2:
		return addTun(args[1])
	case args[0] == "masq" && len(args) == 1:
		return addMasq()
	case args[0] == "list" && len(args) == 1:
		return list()
	}
	return fmt.Errorf("bad arguments %q", args)
}

// addTun creates a persistent TUN device as `ip tuntap add` does.
func addTun(name string) error {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open /dev/net/tun: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		return fmt.Errorf("TUNSETIFF %s: %w", name, err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 1); err != nil {
		return fmt.Errorf("TUNSETPERSIST %s: %w", name, err)
	}
	l, err := netlink.LinkByName(name)
	if err != nil {
		return err
	}
	fmt.Printf("tun %s type %s\n", l.Attrs().Name, l.Type())
	return nil
}

// addMasq adds table ip colo_test, chain postrouting (nat, srcnat) and the
// rule `oifname != "lo" masquerade`.
func addMasq() error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	table := c.AddTable(&nftables.Table{Family: nftables.TableFamilyIPv4, Name: tableName})
	chain := c.AddChain(&nftables.Chain{
		Name:     "postrouting",
		Table:    table,
		Type:     nftables.ChainTypeNAT,
		Hooknum:  nftables.ChainHookPostrouting,
		Priority: nftables.ChainPriorityNATSource,
	})
	c.AddRule(&nftables.Rule{
		Table: table,
		Chain: chain,
		Exprs: []expr.Any{
			&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: ifname("lo")},
			&expr.Masq{},
		},
	})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("add masquerade rule: %w", err)
	}
	fmt.Println("masquerade rule added")
	return nil
}

func ifname(n string) []byte {
	b := make([]byte, 16)
	copy(b, n)
	return b
}

// list prints each rule of the test table: its chain and its expressions.
func list() error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return fmt.Errorf("list chains: %w", err)
	}
	for _, ch := range chains {
		if ch.Table.Name != tableName {
			continue
		}
		rules, err := c.GetRules(ch.Table, ch)
		if err != nil {
			return fmt.Errorf("list rules of %s: %w", ch.Name, err)
		}
		for _, r := range rules {
			var exprs []string
			for _, e := range r.Exprs {
				switch e.(type) {
				case *expr.Masq:
					exprs = append(exprs, "masquerade")
				case *expr.Meta:
					exprs = append(exprs, "meta")
				case *expr.Cmp:
					exprs = append(exprs, "cmp")
				default:
					exprs = append(exprs, fmt.Sprintf("%T", e))
				}
			}
			fmt.Printf("rule table=%s chain=%s type=%s hook=postrouting: %s\n", ch.Table.Name, ch.Name, ch.Type, strings.Join(exprs, " "))
		}
	}
	return nil
}

// Command routes prints the routes of its network namespace with their
// MTU metric, one "DEST DEV MTU" line each, which busybox's ip leaves out.
// The network test bind-mounts it into a container.
package main

import (
	"fmt"
	"os"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func main() {
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for _, r := range routes {
		dev := "?"
		if l, err := netlink.LinkByIndex(r.LinkIndex); err == nil {
			dev = l.Attrs().Name
		}
		dst := "default"
		if r.Dst != nil {
			dst = r.Dst.String()
		}
		fmt.Println(dst, dev, r.MTU)
	}
}

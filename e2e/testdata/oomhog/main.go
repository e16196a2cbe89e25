// Command oomhog allocates memory and writes to every page of it until
// the kernel kills it, for the guest-OOM test; given a size in MiB, it
// holds that much, then exits 0 (the sizing test). Busybox has nothing that
// grows without bound in anonymous memory (a tmpfs would fill the guest
// with pages that outlive the process). It prints its oom_score_adj, then
// how much it holds every 16 MiB. Static: the guest has no libc.
package main

import (
	"fmt"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
)

const (
	chunk = 4 << 20
	// limit ends a run that was never killed, so that a test sees a
	// clear failure rather than waiting: far more than a test VM has.
	limit = 64 << 30
)

func main() {
	// Everything is kept: collecting would only burn CPU.
	debug.SetGCPercent(-1)
	adj, err := os.ReadFile("/proc/self/oom_score_adj")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("oom_score_adj %s\n", strings.TrimSpace(string(adj)))
	want := limit
	if len(os.Args) > 1 {
		mib, err := strconv.Atoi(os.Args[1])
		if err != nil || mib <= 0 {
			fmt.Fprintf(os.Stderr, "size %q: want MiB\n", os.Args[1])
			os.Exit(2)
		}
		want = mib << 20
	}
	var held [][]byte
	for total := 0; total < want; total += chunk {
		b := make([]byte, chunk)
		for i := 0; i < len(b); i += 4096 {
			b[i] = 1
		}
		held = append(held, b)
		if (total+chunk)%(16<<20) == 0 {
			fmt.Printf("holding %d MiB\n", (total+chunk)>>20)
		}
	}
	if want < limit {
		fmt.Printf("held %d MiB\n", want>>20)
		return
	}
	fmt.Fprintf(os.Stderr, "holding %d MiB and not killed\n", limit>>20)
	os.Exit(3)
}

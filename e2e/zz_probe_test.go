package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"
)

func TestZZProbe(t *testing.T) {
	cfg := coloConfig(t, os.Getenv("PROBE_CONFIG"))
	checkNoLeaks(t, "probe1")
	startDetached(t, "io.containerd.colo.v2", "probe1", []string{"--null-io", "--runtime-config-path", cfg}, "sleep", "1000")
	time.Sleep(3 * time.Second)
	pids := cd.ShimPids("probe1")
	out, _ := exec.Command("sh", "-c", fmt.Sprintf(`p=%d; awk '/^[0-9a-f]+-/{name=$6} /^Rss:/{r=$2} /^Pss:/{if ($2>300) print $2, r, name}' /proc/$p/smaps; grep -E "^(Rss|Pss)" /proc/$p/smaps_rollup; grep -E "Threads|VmRSS|RssAnon|RssFile" /proc/$p/status`, pids[0])).CombinedOutput()
	t.Logf("%s", out)
	ctr(t, "task", "kill", "-s", "SIGKILL", "probe1")
	waitStopped(t, "probe1")
	ctr(t, "task", "rm", "probe1")
	ctr(t, "container", "rm", "probe1")
}

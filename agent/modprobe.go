package agent

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ModprobeName is the name colo-agent answers to as the guest kernel's
// usermode helper for request_module: the initrd links /sbin/modprobe to
// /init, and the kernel runs "/sbin/modprobe -q -- NAME", NAME a module
// name or an alias (such as "rtnl-link-bridge", "nft-chain-2-nat",
// "net-pf-16-proto-12", "char-major-10-200").
const ModprobeName = "modprobe"

const (
	// modprobeTimeout bounds a whole modprobe: the kernel waits for it.
	modprobeTimeout = 30 * time.Second
	// maxIndexBytes bounds each of modules.dep, modules.alias and
	// modules.builtin read by modprobe (the initrd's are some KiB).
	maxIndexBytes = 16 << 20
	// maxModuleDeps bounds the modules one name makes modprobe load, with
	// their dependencies.
	maxModuleDeps = 256
	// maxModprobeName bounds the name asked for (modalias strings, the
	// longest, are some hundred bytes).
	maxModprobeName = 1024
)

// RunModprobe is colo-agent run as /sbin/modprobe: it loads the module
// named by args (modprobe's options -q, -v, -b, -s and "--" are taken;
// only -q changes anything) with its dependencies from
// /lib/modules/$(uname -r), and returns the exit status: 0 when the module
// is loaded, was loaded already or is built in; 1 otherwise, with the
// reason on stderr unless -q. Files are opened beneath the modules
// directory only, never through a symlink.
func RunModprobe(args []string, stderr io.Writer) int {
	quiet := false
	var names []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			names = append(names, args[i+1:]...)
			break
		}
		switch a {
		case "-q", "--quiet":
			quiet = true
		case "-v", "--verbose", "-b", "--use-blacklist", "-s", "--syslog":
		default:
			if strings.HasPrefix(a, "-") {
				if !quiet {
					fmt.Fprintf(stderr, "modprobe: unsupported option %q\n", a)
				}
				return 1
			}
			names = append(names, a)
		}
	}
	if len(names) != 1 {
		if !quiet {
			fmt.Fprintln(stderr, "usage: modprobe [-q] [--] MODULE (module parameters are not supported)")
		}
		return 1
	}
	timer := time.AfterFunc(modprobeTimeout, func() { os.Exit(1) })
	defer timer.Stop()
	p := modprober{dir: moduleDir(), sysModules: "/sys/module", load: loadModuleFile}
	if err := p.modprobe(names[0]); err != nil {
		if !quiet {
			fmt.Fprintf(stderr, "modprobe: %s: %v\n", names[0], err)
		}
		return 1
	}
	return 0
}

// moduleDir is the running kernel's modules directory,
// /lib/modules/$(uname -r).
func moduleDir() string {
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		return "/lib/modules"
	}
	return filepath.Join("/lib/modules", unix.ByteSliceToString(uts.Release[:]))
}

// modprober loads modules with their dependencies from one modules
// directory.
type modprober struct {
	dir        string // /lib/modules/<release>
	sysModules string // /sys/module: a loaded module has <name>/initstate
	// load loads an opened module file (loadModuleFile; a fake in tests).
	load func(*os.File) error
}

// modprobe loads the module name stands for: the module of that name, or
// every module with an alias matching it, each after its dependencies.
func (p *modprober) modprobe(name string) error {
	if name == "" || len(name) > maxModprobeName || strings.ContainsAny(name, "/\x00") {
		return fmt.Errorf("bad module name: %w", fs.ErrInvalid)
	}
	ix, err := readModuleIndex(p.dir)
	if err != nil {
		return err
	}
	mods, err := ix.resolve(name)
	if err != nil || len(mods) == 0 {
		return err
	}
	var errs []error
	for _, mod := range mods {
		paths, err := ix.loadOrder(mod)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, rel := range paths {
			if err := p.loadOne(rel); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", rel, err))
				break
			}
		}
	}
	return errors.Join(errs...)
}

// loadOne loads the module at rel (relative to the modules directory)
// unless it is loaded already.
func (p *modprober) loadOne(rel string) error {
	if name, ok := moduleName(path.Base(rel)); ok {
		if _, err := os.Stat(filepath.Join(p.sysModules, name, "initstate")); err == nil {
			return nil
		}
	}
	f, err := openBeneath(p.dir, rel)
	if err != nil {
		return err
	}
	defer f.Close()
	return p.load(f)
}

// openBeneath opens rel beneath dir for reading without following any
// symlink or leaving dir.
func openBeneath(dir, rel string) (*os.File, error) {
	if !filepath.IsLocal(rel) {
		return nil, fmt.Errorf("%q: not a path beneath %s: %w", rel, dir, fs.ErrInvalid)
	}
	dirFd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: dir, Err: err}
	}
	defer unix.Close(dirFd)
	fd, err := unix.Openat2(dirFd, rel, &unix.OpenHow{
		Flags:   unix.O_RDONLY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	})
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: filepath.Join(dir, rel), Err: err}
	}
	return os.NewFile(uintptr(fd), filepath.Join(dir, rel)), nil
}

// moduleIndex is what depmod wrote in a modules directory.
type moduleIndex struct {
	paths   map[string]string   // module name -> its path relative to the directory
	deps    map[string][]string // module path -> its dependencies' paths (modules.dep)
	aliases []moduleAlias       // modules.alias, in order
	builtin map[string]bool     // modules.builtin: built into the kernel
}

type moduleAlias struct {
	pattern string // normalized (normalizeAlias), a shell pattern
	module  string // normalized module name
}

// readModuleIndex reads modules.dep, modules.alias and modules.builtin
// (the last two may be missing) from dir.
func readModuleIndex(dir string) (*moduleIndex, error) {
	ix := &moduleIndex{paths: map[string]string{}, deps: map[string][]string{}, builtin: map[string]bool{}}
	err := readIndexFile(dir, "modules.dep", func(line string) error {
		mod, deps, ok := strings.Cut(line, ":")
		if !ok {
			return fmt.Errorf("bad line %q", line)
		}
		mod = strings.TrimSpace(mod)
		name, ok := moduleName(path.Base(mod))
		if !ok {
			return fmt.Errorf("bad module file %q", mod)
		}
		ix.paths[name] = mod
		ix.deps[mod] = strings.Fields(deps)
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = readIndexFile(dir, "modules.alias", func(line string) error {
		f := strings.Fields(line)
		if len(f) != 3 || f[0] != "alias" {
			return nil // not an alias line: skipped, as modprobe does
		}
		ix.aliases = append(ix.aliases, moduleAlias{pattern: normalizeAlias(f[1]), module: normalizeModuleName(f[2])})
		return nil
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	err = readIndexFile(dir, "modules.builtin", func(line string) error {
		if name, ok := moduleName(path.Base(line)); ok {
			ix.builtin[name] = true
		}
		return nil
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	return ix, nil
}

// readIndexFile calls fn with each line of dir/name that is neither empty
// nor a comment.
func readIndexFile(dir, name string, fn func(string) error) error {
	f, err := openBeneath(dir, name)
	if err != nil {
		return err
	}
	defer f.Close()
	s := bufio.NewScanner(io.LimitReader(f, maxIndexBytes))
	s.Buffer(make([]byte, 0, 4096), 64<<10)
	for n := 1; s.Scan(); n++ {
		line := strings.TrimSpace(s.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if err := fn(line); err != nil {
			return fmt.Errorf("%s line %d: %w", name, n, err)
		}
	}
	if err := s.Err(); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

// resolve returns the modules name stands for: a module's name, or an
// alias (a shell pattern in modules.alias, as modprobe matches them: "-"
// and "_" alike outside brackets). None and no error: built in.
func (ix *moduleIndex) resolve(name string) ([]string, error) {
	if n := normalizeModuleName(name); ix.paths[n] != "" {
		return []string{n}, nil
	}
	alias := normalizeAlias(name)
	var mods []string
	seen := map[string]bool{}
	for _, a := range ix.aliases {
		if ok, err := path.Match(a.pattern, alias); err != nil || !ok || seen[a.module] {
			continue
		}
		seen[a.module] = true
		mods = append(mods, a.module)
		if len(mods) > maxModuleDeps {
			return nil, fmt.Errorf("alias %q matches more than %d modules", name, maxModuleDeps)
		}
	}
	if len(mods) > 0 {
		return mods, nil
	}
	if ix.builtin[normalizeModuleName(name)] {
		return nil, nil
	}
	return nil, fmt.Errorf("module %q not found in modules.dep or modules.alias: %w", name, fs.ErrNotExist)
}

// loadOrder returns the paths to load for module mod: its dependencies,
// the last listed in modules.dep first (as modprobe), then mod.
func (ix *moduleIndex) loadOrder(mod string) ([]string, error) {
	p := ix.paths[mod]
	if p == "" {
		if ix.builtin[mod] {
			return nil, nil
		}
		return nil, fmt.Errorf("module %s (an alias's) not in modules.dep: %w", mod, fs.ErrNotExist)
	}
	deps := ix.deps[p]
	if len(deps) >= maxModuleDeps {
		return nil, fmt.Errorf("module %s: more than %d dependencies", mod, maxModuleDeps)
	}
	order := make([]string, 0, len(deps)+1)
	for i := len(deps) - 1; i >= 0; i-- {
		order = append(order, deps[i])
	}
	return append(order, p), nil
}

// normalizeAlias is modprobe's: "-" is "_" outside brackets.
func normalizeAlias(alias string) string {
	b := []byte(alias)
	inBracket := false
	for i, c := range b {
		switch {
		case c == '[':
			inBracket = true
		case c == ']':
			inBracket = false
		case c == '-' && !inBracket:
			b[i] = '_'
		}
	}
	return string(b)
}

// staticNodeModes are the modes udev gives the nodes of modules.devname;
// others get 0600.
var staticNodeModes = map[string]uint32{"net/tun": 0o666, "fuse": 0o666}

// makeStaticNodes creates in devDir the device nodes modules.devname in
// moduleDir lists (kmod's static-nodes), so that opening one loads its
// module through the kernel's request_module: /dev/net/tun loads tun.
// Existing nodes are left alone.
func makeStaticNodes(moduleDir, devDir string) error {
	var errs []error
	err := readIndexFile(moduleDir, "modules.devname", func(line string) error {
		f := strings.Fields(line)
		if len(f) != 3 || len(f[2]) < 2 {
			return fmt.Errorf("bad line %q", line)
		}
		node := f[1]
		if !filepath.IsLocal(node) {
			return fmt.Errorf("device %q: not beneath %s", node, devDir)
		}
		var typ uint32
		switch f[2][0] {
		case 'c':
			typ = unix.S_IFCHR
		case 'b':
			typ = unix.S_IFBLK
		default:
			return fmt.Errorf("device %q: bad type %q", node, f[2])
		}
		maj, min, ok := strings.Cut(f[2][1:], ":")
		major, err1 := strconv.ParseUint(maj, 10, 32)
		minor, err2 := strconv.ParseUint(min, 10, 32)
		if !ok || err1 != nil || err2 != nil {
			return fmt.Errorf("device %q: bad number %q", node, f[2])
		}
		mode, ok := staticNodeModes[node]
		if !ok {
			mode = 0o600
		}
		target := filepath.Join(devDir, node)
		if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
			errs = append(errs, err)
			return nil
		}
		err := unix.Mknod(target, typ|mode, int(unix.Mkdev(uint32(major), uint32(minor))))
		if err != nil && !errors.Is(err, unix.EEXIST) {
			errs = append(errs, &fs.PathError{Op: "mknod", Path: target, Err: err})
			return nil
		}
		if err == nil {
			// mknod's mode is cut by the umask.
			errs = append(errs, os.Chmod(target, fs.FileMode(mode)))
		}
		return nil
	})
	if errors.Is(err, fs.ErrNotExist) {
		err = nil
	}
	return errors.Join(append(errs, err)...)
}

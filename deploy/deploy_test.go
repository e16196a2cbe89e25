package deploy

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"flag"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	nodev1 "k8s.io/api/node/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"

	"github.com/colo-runtime/colo/config"
)

var update = flag.Bool("update", false, "rewrite config.toml from docs/config.md's defaults")

// repo is the repository's root: go test runs in deploy/.
const repo = ".."

// nodeLabel marks the nodes colo is installed on.
var nodeLabel = map[string]string{"colo.io/runtime": "true"}

func read(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// codeBlocks returns the fenced blocks of one language in a Markdown file.
func codeBlocks(t *testing.T, path, lang string) []string {
	t.Helper()
	var blocks []string
	var cur []string
	in := false
	for _, line := range strings.Split(string(read(t, path)), "\n") {
		switch {
		case !in && line == "```"+lang:
			in, cur = true, nil
		case in && line == "```":
			in = false
			blocks = append(blocks, strings.Join(cur, "\n")+"\n")
		case in:
			cur = append(cur, line)
		}
	}
	if len(blocks) == 0 {
		t.Fatalf("%s: no ```%s block", path, lang)
	}
	return blocks
}

// keys lists the dotted keys of a TOML document's tables (not inside
// arrays).
func keys(prefix string, m map[string]any, out map[string]bool) {
	for k, v := range m {
		out[prefix+k] = true
		if sub, ok := v.(map[string]any); ok {
			keys(prefix+k+".", sub, out)
		}
	}
}

func TestDefaultConfig(t *testing.T) {
	block := codeBlocks(t, filepath.Join(repo, "docs/config.md"), "toml")[0]
	data := read(t, "config.toml")
	header, body, ok := strings.Cut(string(data), "\n\n")
	if *update {
		if err := os.WriteFile("config.toml", []byte(header+"\n\n"+block), 0o644); err != nil {
			t.Fatal(err)
		}
		data = read(t, "config.toml")
		header, body, ok = strings.Cut(string(data), "\n\n")
	}
	if !ok || body != block {
		t.Errorf("config.toml is not a comment header, a blank line and docs/config.md's TOML block: go test ./deploy -run TestDefaultConfig -update")
	}
	for _, line := range strings.Split(header, "\n") {
		if !strings.HasPrefix(line, "#") {
			t.Errorf("config.toml's header has a line that is not a comment: %q", line)
		}
	}

	c, err := config.Parse(data)
	if err != nil {
		t.Fatalf("config.Parse(config.toml): %v", err)
	}
	want := config.Default()
	// `vcpus = []` is Default's nil list.
	nilEmpty(reflect.ValueOf(&c).Elem())
	nilEmpty(reflect.ValueOf(&want).Elem())
	if !reflect.DeepEqual(c, want) {
		t.Errorf("config.toml parses to\n%+v\nwant config.Default()\n%+v", c, want)
	}

	// Parse starts from the defaults, so a key left out would pass the
	// above: every key of the defaults is in the file.
	def, err := toml.Marshal(config.Default())
	if err != nil {
		t.Fatal(err)
	}
	var defMap, fileMap map[string]any
	if err := toml.Unmarshal(def, &defMap); err != nil {
		t.Fatal(err)
	}
	if err := toml.Unmarshal(data, &fileMap); err != nil {
		t.Fatal(err)
	}
	defKeys, fileKeys := map[string]bool{}, map[string]bool{}
	keys("", defMap, defKeys)
	keys("", fileMap, fileKeys)
	for k := range defKeys {
		if !fileKeys[k] {
			t.Errorf("config.toml lacks %s", k)
		}
	}
}

// nilEmpty sets the empty slices in v to nil.
func nilEmpty(v reflect.Value) {
	switch v.Kind() {
	case reflect.Struct:
		for i := range v.NumField() {
			if v.Field(i).CanSet() {
				nilEmpty(v.Field(i))
			}
		}
	case reflect.Slice:
		if v.Len() == 0 {
			v.SetZero()
		}
		for i := range v.Len() {
			nilEmpty(v.Index(i))
		}
	}
}

// containerdRuntime returns the colo runtime table of a containerd config.
func containerdRuntime(t *testing.T, name, doc string) map[string]any {
	t.Helper()
	var m map[string]any
	if err := toml.Unmarshal([]byte(doc), &m); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if v, _ := m["version"].(int64); v != 3 {
		t.Errorf("%s: version = %v, want 3 (containerd 2.x)", name, m["version"])
	}
	cur := m
	for _, k := range []string{"plugins", "io.containerd.cri.v1.runtime", "containerd", "runtimes", "colo"} {
		next, ok := cur[k].(map[string]any)
		if !ok {
			t.Fatalf("%s: no table %s", name, k)
		}
		cur = next
	}
	return cur
}

func TestContainerdSnippet(t *testing.T) {
	got := containerdRuntime(t, "containerd-colo.toml", string(read(t, "containerd-colo.toml")))
	if got["runtime_type"] != "io.containerd.colo.v2" {
		t.Errorf("runtime_type = %v, want io.containerd.colo.v2", got["runtime_type"])
	}
	if got["privileged_without_host_devices"] != true {
		t.Errorf("privileged_without_host_devices = %v, want true", got["privileged_without_host_devices"])
	}
	opts, _ := got["options"].(map[string]any)
	if opts["ConfigPath"] != config.DefaultPath {
		t.Errorf("options.ConfigPath = %v, want %s", opts["ConfigPath"], config.DefaultPath)
	}
	// The same handler as docs/kubernetes.md's.
	docs := codeBlocks(t, filepath.Join(repo, "docs/kubernetes.md"), "toml")[0]
	if want := containerdRuntime(t, "docs/kubernetes.md", docs); !reflect.DeepEqual(got, want) {
		t.Errorf("containerd-colo.toml's runtime\n%v\ndiffers from docs/kubernetes.md's\n%v", got, want)
	}
	// A drop-in must not change the node's default runtime.
	if strings.Contains(string(read(t, "containerd-colo.toml")), "default_runtime_name") {
		t.Error("containerd-colo.toml sets default_runtime_name")
	}
}

func runtimeClass(t *testing.T) nodev1.RuntimeClass {
	t.Helper()
	var rc nodev1.RuntimeClass
	if err := yaml.UnmarshalStrict(read(t, "kubernetes/runtimeclass.yaml"), &rc); err != nil {
		t.Fatalf("runtimeclass.yaml: %v", err)
	}
	return rc
}

func TestRuntimeClass(t *testing.T) {
	rc := runtimeClass(t)
	if rc.APIVersion != "node.k8s.io/v1" || rc.Kind != "RuntimeClass" {
		t.Errorf("runtimeclass.yaml is a %s %s", rc.APIVersion, rc.Kind)
	}
	if rc.Name != "colo" || rc.Handler != "colo" {
		t.Errorf("name %q handler %q, want colo and colo (containerd-colo.toml's runtime)", rc.Name, rc.Handler)
	}
	if rc.Overhead == nil {
		t.Fatal("no overhead")
	}
	for name, want := range map[string]string{"memory": "160Mi", "cpu": "250m"} {
		got, ok := rc.Overhead.PodFixed[corev1.ResourceName(name)]
		if !ok || got.Cmp(resource.MustParse(want)) != 0 {
			t.Errorf("overhead.podFixed.%s = %v, want %s", name, got.String(), want)
		}
	}
	if len(rc.Overhead.PodFixed) != 2 {
		t.Errorf("overhead.podFixed = %v, want memory and cpu only", rc.Overhead.PodFixed)
	}
	if rc.Scheduling == nil || !reflect.DeepEqual(rc.Scheduling.NodeSelector, nodeLabel) {
		t.Errorf("scheduling = %+v, want nodeSelector %v", rc.Scheduling, nodeLabel)
	}

	// docs/kubernetes.md's RuntimeClass: the same handler and overhead.
	var docs nodev1.RuntimeClass
	for _, b := range codeBlocks(t, filepath.Join(repo, "docs/kubernetes.md"), "yaml") {
		if strings.Contains(b, "kind: RuntimeClass") {
			if err := yaml.UnmarshalStrict([]byte(b), &docs); err != nil {
				t.Fatalf("docs/kubernetes.md's RuntimeClass: %v", err)
			}
		}
	}
	if docs.Handler != rc.Handler || docs.Overhead == nil {
		t.Fatalf("docs/kubernetes.md's RuntimeClass: handler %q overhead %v", docs.Handler, docs.Overhead)
	}
	for name, q := range docs.Overhead.PodFixed {
		if got := rc.Overhead.PodFixed[name]; got.Cmp(q) != 0 {
			t.Errorf("overhead.podFixed.%s = %s, docs/kubernetes.md says %s", name, got.String(), q.String())
		}
	}
}

func TestInstallerDaemonSet(t *testing.T) {
	var ds appsv1.DaemonSet
	if err := yaml.UnmarshalStrict(read(t, "kubernetes/installer.yaml"), &ds); err != nil {
		t.Fatalf("installer.yaml: %v", err)
	}
	if ds.APIVersion != "apps/v1" || ds.Kind != "DaemonSet" {
		t.Errorf("installer.yaml is a %s %s", ds.APIVersion, ds.Kind)
	}
	if ds.Namespace != "kube-system" {
		t.Errorf("namespace %q, want kube-system", ds.Namespace)
	}
	sel, err := metav1.LabelSelectorAsSelector(ds.Spec.Selector)
	if err != nil || sel.Empty() || !sel.Matches(labels.Set(ds.Spec.Template.Labels)) {
		t.Errorf("selector %v does not match the template's labels %v (%v)", ds.Spec.Selector, ds.Spec.Template.Labels, err)
	}
	pod := ds.Spec.Template.Spec
	if !pod.HostPID {
		t.Error("hostPID is false: node-setup.sh enters PID 1's namespaces")
	}
	if !reflect.DeepEqual(pod.NodeSelector, nodeLabel) {
		t.Errorf("nodeSelector %v, want the RuntimeClass's %v", pod.NodeSelector, nodeLabel)
	}
	if rc := runtimeClass(t); !reflect.DeepEqual(pod.NodeSelector, rc.Scheduling.NodeSelector) {
		t.Errorf("nodeSelector %v differs from the RuntimeClass's %v", pod.NodeSelector, rc.Scheduling.NodeSelector)
	}
	if len(pod.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(pod.Containers))
	}
	c := pod.Containers[0]
	if sc := c.SecurityContext; sc == nil || sc.Privileged == nil || !*sc.Privileged {
		t.Error("the container is not privileged")
	}
	// The image is the Dockerfile's: the tarball in /opt/colo.
	if !slices.Equal(c.Command, []string{"/opt/colo/node-setup.sh"}) || !slices.Equal(c.Args, []string{"install"}) {
		t.Errorf("command %q args %q, want /opt/colo/node-setup.sh install", c.Command, c.Args)
	}
	if df := string(read(t, "Dockerfile")); !strings.Contains(df, "/opt/colo/node-setup.sh") || !strings.Contains(df, "mv /opt/colo-${VERSION}-linux-amd64 /opt/colo") {
		t.Error("Dockerfile does not unpack the tarball in /opt/colo")
	}
	hostRoot := ""
	for _, e := range c.Env {
		if e.Name == "HOST_ROOT" {
			hostRoot = e.Value
		}
	}
	if hostRoot == "" {
		t.Fatal("no HOST_ROOT in the container's environment")
	}

	// Each host directory install.sh writes is mounted, writable, at
	// HOST_ROOT and its own path (install.sh runs with DESTDIR=HOST_ROOT).
	hostPaths := map[string]string{} // volume name: host path
	for _, v := range pod.Volumes {
		if v.HostPath == nil {
			t.Errorf("volume %s is not a hostPath", v.Name)
			continue
		}
		hostPaths[v.Name] = v.HostPath.Path
	}
	mounted := map[string]bool{}
	for _, m := range c.VolumeMounts {
		p, ok := hostPaths[m.Name]
		if !ok {
			t.Errorf("mount %s: no such hostPath volume", m.Name)
			continue
		}
		if m.MountPath != hostRoot+p {
			t.Errorf("host %s mounted at %s, want %s", p, m.MountPath, hostRoot+p)
		}
		if m.ReadOnly {
			t.Errorf("host %s mounted read-only", p)
		}
		mounted[p] = true
	}
	want := []string{"/etc/colo", "/etc/containerd", "/usr/local/bin", "/usr/share/colo"}
	got := slices.Sorted(func(yield func(string) bool) {
		for p := range mounted {
			if !yield(p) {
				return
			}
		}
	})
	if !slices.Equal(got, want) {
		t.Errorf("host paths mounted: %v, want %v", got, want)
	}
}

// artifacts copies what make install takes from build/ to a directory of
// the test's, so that a rebuild elsewhere in the tree does not change it
// under the test; it returns make's arguments that point there.
func artifacts(t *testing.T) []string {
	t.Helper()
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("no make")
	}
	dir := t.TempDir()
	for _, f := range []string{"bin/containerd-shim-colo-v2", "bin/colo", "guest/vmlinux", "guest/initrd.img"} {
		src := filepath.Join(repo, "build", f)
		data, err := os.ReadFile(src)
		if err != nil {
			t.Skipf("%s is missing: make build guest first (make test builds them before it runs the tests)", src)
		}
		info, err := os.Stat(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, f)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), data, info.Mode().Perm()); err != nil {
			t.Fatal(err)
		}
	}
	return []string{"BIN=" + filepath.Join(dir, "bin"), "GUEST=" + filepath.Join(dir, "guest")}
}

func run(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	// Not what a make running the tests (make test PREFIX=...) passes on,
	// nor the caller's install variables.
	for _, e := range os.Environ() {
		k, _, _ := strings.Cut(e, "=")
		switch k {
		case "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "DESTDIR", "PREFIX", "DIST", "GUEST_INSTALL", "SOURCE_DATE_EPOCH":
		default:
			cmd.Env = append(cmd.Env, e)
		}
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func makeIn(t *testing.T, args ...string) string {
	t.Helper()
	root, err := filepath.Abs(repo)
	if err != nil {
		t.Fatal(err)
	}
	return run(t, root, "make", append([]string{"--no-print-directory"}, args...)...)
}

// tree lists the files (with their contents) and directories under dir,
// relative to it; directories end with a slash.
func tree(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if d.IsDir() {
			out[rel+"/"] = nil
			return nil
		}
		data, err := os.ReadFile(p)
		out[rel] = data
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func files(tr map[string][]byte) []string {
	var out []string
	for p := range tr {
		if !strings.HasSuffix(p, "/") {
			out = append(out, p)
		}
	}
	slices.Sort(out)
	return out
}

// checkInstalled checks the files an install under dest should have, from
// the build artifacts in bin and guest.
func checkInstalled(t *testing.T, dest, prefix string, build []string) {
	t.Helper()
	src := map[string]string{}
	for _, a := range build {
		k, v, _ := strings.Cut(a, "=")
		src[k] = v
	}
	prefix = strings.TrimPrefix(prefix, "/")
	want := map[string]string{ // installed: its source
		prefix + "/bin/containerd-shim-colo-v2": filepath.Join(src["BIN"], "containerd-shim-colo-v2"),
		prefix + "/bin/colo":                    filepath.Join(src["BIN"], "colo"),
		"usr/share/colo/vmlinux":                filepath.Join(src["GUEST"], "vmlinux"),
		"usr/share/colo/initrd.img":             filepath.Join(src["GUEST"], "initrd.img"),
		"usr/share/colo/containerd-colo.toml":   "containerd-colo.toml",
		"etc/colo/config.toml":                  "config.toml",
		"usr/share/colo/installed-files":        "",
	}
	tr := tree(t, dest)
	wantFiles := slices.Sorted(func(yield func(string) bool) {
		for p := range want {
			if !yield(p) {
				return
			}
		}
	})
	if got := files(tr); !slices.Equal(got, wantFiles) {
		t.Errorf("installed files:\n%v\nwant\n%v", got, wantFiles)
	}
	for p, s := range want {
		if s == "" {
			continue
		}
		if !bytes.Equal(tr[p], read(t, s)) {
			t.Errorf("%s differs from %s", p, s)
		}
		info, err := os.Stat(filepath.Join(dest, p))
		if err != nil {
			continue
		}
		mode := os.FileMode(0o644)
		if strings.Contains(p, "/bin/") {
			mode = 0o755
		}
		if info.Mode().Perm() != mode {
			t.Errorf("%s: mode %v, want %v", p, info.Mode().Perm(), mode)
		}
	}
	// The manifest names every file and directory the install made.
	var manifest []string
	for p := range tr {
		manifest = append(manifest, "/"+p)
	}
	slices.Sort(manifest)
	if got := strings.Fields(string(tr["usr/share/colo/installed-files"])); !slices.Equal(got, manifest) {
		t.Errorf("installed-files:\n%v\nwant\n%v", got, manifest)
	}
}

func checkEmpty(t *testing.T, dest string) {
	t.Helper()
	if tr := tree(t, dest); len(tr) != 0 {
		t.Errorf("uninstall left behind: %v", slices.Sorted(func(yield func(string) bool) {
			for p := range tr {
				if !yield(p) {
					return
				}
			}
		}))
	}
}

func TestMakeInstall(t *testing.T) {
	build := artifacts(t)
	install := func(t *testing.T, dest string, extra ...string) string {
		return makeIn(t, append(append([]string{"install", "DESTDIR=" + dest}, build...), extra...)...)
	}
	uninstall := func(t *testing.T, dest string, extra ...string) string {
		return makeIn(t, append([]string{"uninstall", "DESTDIR=" + dest}, extra...)...)
	}

	t.Run("fresh", func(t *testing.T) {
		dest := t.TempDir()
		out := install(t, dest)
		checkInstalled(t, dest, "/usr/local", build)
		for _, s := range []string{`runtime_type = "io.containerd.colo.v2"`, `ConfigPath = "/etc/colo/config.toml"`} {
			if !strings.Contains(out, s) {
				t.Errorf("make install does not print containerd's snippet (%s):\n%s", s, out)
			}
		}
		// Again: an upgrade over itself, the config kept but still its own.
		install(t, dest)
		checkInstalled(t, dest, "/usr/local", build)
		uninstall(t, dest)
		checkEmpty(t, dest)
		// Nothing installed: nothing to do.
		uninstall(t, dest)
	})

	t.Run("prefix", func(t *testing.T) {
		dest := t.TempDir()
		install(t, dest, "PREFIX=/usr")
		checkInstalled(t, dest, "/usr", build)
		uninstall(t, dest, "PREFIX=/usr")
		checkEmpty(t, dest)
	})

	t.Run("edited config", func(t *testing.T) {
		dest := t.TempDir()
		install(t, dest)
		cfg := filepath.Join(dest, "etc/colo/config.toml")
		edited := append(read(t, cfg), "# mine\n"...)
		if err := os.WriteFile(cfg, edited, 0o644); err != nil {
			t.Fatal(err)
		}
		install(t, dest)
		if !bytes.Equal(read(t, cfg), edited) {
			t.Error("make install overwrote an edited config")
		}
		uninstall(t, dest)
		if tr := tree(t, dest); !slices.Equal(files(tr), []string{"etc/colo/config.toml"}) || !bytes.Equal(tr["etc/colo/config.toml"], edited) {
			t.Errorf("after uninstall: %v, want only the edited config", files(tr))
		}
	})

	t.Run("config there before", func(t *testing.T) {
		// A config install did not put there stays, even the default.
		dest := t.TempDir()
		cfg := filepath.Join(dest, "etc/colo/config.toml")
		if err := os.MkdirAll(filepath.Dir(cfg), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(cfg, read(t, "config.toml"), 0o600); err != nil {
			t.Fatal(err)
		}
		install(t, dest)
		if info, err := os.Stat(cfg); err != nil || info.Mode().Perm() != 0o600 {
			t.Errorf("the config there before was replaced: %v %v", info, err)
		}
		manifest := string(read(t, filepath.Join(dest, "usr/share/colo/installed-files")))
		if strings.Contains(manifest, "/etc/colo") {
			t.Errorf("installed-files lists what install did not make:\n%s", manifest)
		}
		uninstall(t, dest)
		if got := files(tree(t, dest)); !slices.Equal(got, []string{"etc/colo/config.toml"}) {
			t.Errorf("after uninstall: %v, want only the config", got)
		}
	})
}

func TestDist(t *testing.T) {
	build := artifacts(t)
	var name string // colo-$(VERSION)-linux-amd64
	var tarballs [][]byte
	for range 2 {
		dist := t.TempDir()
		makeIn(t, append([]string{"dist", "DIST=" + dist}, build...)...)
		found, _ := filepath.Glob(filepath.Join(dist, "colo-*-linux-amd64.tar.gz"))
		if len(found) != 1 {
			t.Fatalf("make dist made %v, want one colo-*-linux-amd64.tar.gz", found)
		}
		name = strings.TrimSuffix(filepath.Base(found[0]), ".tar.gz")
		tarballs = append(tarballs, read(t, found[0]))
		sum := string(read(t, filepath.Join(dist, name+".tar.gz.sha256")))
		if !strings.HasSuffix(sum, "  "+name+".tar.gz\n") {
			t.Errorf("%s.tar.gz.sha256: %q", name, sum)
		}
	}
	if !bytes.Equal(tarballs[0], tarballs[1]) {
		t.Error("two make dist of the same build differ")
	}

	// The tarball: owner root, one mtime, unpacked to check it installs.
	zr, err := gzip.NewReader(bytes.NewReader(tarballs[0]))
	if err != nil {
		t.Fatal(err)
	}
	unpacked := t.TempDir()
	tr := tar.NewReader(zr)
	var names []string
	var mtime int64
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		if h.Uid != 0 || h.Gid != 0 {
			t.Errorf("%s: owner %d:%d, want 0:0", h.Name, h.Uid, h.Gid)
		}
		if mtime == 0 {
			mtime = h.ModTime.Unix()
		} else if h.ModTime.Unix() != mtime {
			t.Errorf("%s: mtime %v, want the same as the others", h.Name, h.ModTime)
		}
		if !strings.HasPrefix(h.Name, name+"/") {
			t.Errorf("%s is outside %s/", h.Name, name)
		}
		p := filepath.Join(unpacked, h.Name)
		switch h.Typeflag {
		case tar.TypeDir:
			err = os.MkdirAll(p, 0o755)
		case tar.TypeReg:
			var data []byte
			if data, err = io.ReadAll(tr); err == nil {
				err = os.WriteFile(p, data, h.FileInfo().Mode().Perm())
			}
		default:
			t.Errorf("%s: type %c", h.Name, h.Typeflag)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"install.sh", "node-setup.sh", "kubernetes/installer.yaml", "kubernetes/runtimeclass.yaml", "root/usr/local/bin/containerd-shim-colo-v2"} {
		if !slices.Contains(names, name+"/"+f) {
			t.Errorf("the tarball has no %s", f)
		}
	}

	// Its install.sh installs the same files as make install.
	dest := t.TempDir()
	run(t, "", "env", "DESTDIR="+dest, filepath.Join(unpacked, name, "install.sh"), "install")
	checkInstalled(t, dest, "/usr/local", build)
	run(t, "", "env", "DESTDIR="+dest, filepath.Join(unpacked, name, "install.sh"), "uninstall")
	checkEmpty(t, dest)
}

// TestNodeSetup runs node-setup.sh against a node made of directories, with
// nsenter (containerd, systemctl) and sleep faked.
func TestNodeSetup(t *testing.T) {
	stubs := t.TempDir()
	write := func(p, s string, mode os.FileMode) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(s), mode); err != nil {
			t.Fatal(err)
		}
	}
	// containerd config dump: the main config, and the drop-ins if it
	// imports them.
	write(filepath.Join(stubs, "nsenter"), `#!/bin/sh
while [ "$1" != -- ]; do shift; done
shift
main=$HOST_ROOT/etc/containerd/config.toml
case "$*" in
"containerd --version") echo "containerd github.com/containerd/containerd/v2 $FAKE_CONTAINERD nodeadbeef" ;;
"containerd config dump")
	cat "$main" 2>/dev/null
	if grep -q 'conf.d/\*.toml' "$main" 2>/dev/null; then cat "$HOST_ROOT"/etc/containerd/conf.d/*.toml 2>/dev/null; fi ;;
"systemctl restart containerd") echo restart >>"$HOST_ROOT/restarts" ;;
*) echo "nsenter: unexpected $*" >&2; exit 99 ;;
esac
`, 0o755)
	write(filepath.Join(stubs, "sleep"), "#!/bin/sh\nexit 0\n", 0o755)

	// The image: /opt/colo as the Dockerfile unpacks the tarball, with
	// small stand-ins for the binaries.
	image := t.TempDir()
	for _, s := range []string{"install.sh", "node-setup.sh"} {
		write(filepath.Join(image, s), string(read(t, s)), 0o755)
	}
	root := filepath.Join(image, "root")
	write(filepath.Join(root, "usr/local/bin/containerd-shim-colo-v2"), "shim\n", 0o755)
	write(filepath.Join(root, "usr/local/bin/colo"), "colo\n", 0o755)
	write(filepath.Join(root, "usr/share/colo/vmlinux"), "kernel\n", 0o644)
	write(filepath.Join(root, "usr/share/colo/initrd.img"), "initrd\n", 0o644)
	write(filepath.Join(root, "usr/share/colo/containerd-colo.toml"), string(read(t, "containerd-colo.toml")), 0o644)
	write(filepath.Join(root, "etc/colo/config.toml"), string(read(t, "config.toml")), 0o644)

	setup := func(host, containerd, mode string) (string, error) {
		cmd := exec.Command(filepath.Join(image, "node-setup.sh"), mode)
		cmd.Env = append(os.Environ(), "PATH="+stubs+":"+os.Getenv("PATH"), "HOST_ROOT="+host, "FAKE_CONTAINERD="+containerd)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	restarts := func(host string) int {
		data, _ := os.ReadFile(filepath.Join(host, "restarts"))
		return strings.Count(string(data), "restart")
	}
	dropin := func(host string) string { return filepath.Join(host, "etc/containerd/conf.d/colo.toml") }

	t.Run("no containerd config", func(t *testing.T) {
		host := t.TempDir()
		if out, err := setup(host, "v2.3.7", "install"); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if !bytes.Equal(read(t, dropin(host)), read(t, "containerd-colo.toml")) {
			t.Error("the drop-in is not containerd-colo.toml")
		}
		if !strings.Contains(string(read(t, filepath.Join(host, "etc/containerd/config.toml"))), `imports = ["/etc/containerd/conf.d/*.toml"]`) {
			t.Error("the config written does not import conf.d")
		}
		for _, f := range []string{"usr/local/bin/containerd-shim-colo-v2", "usr/share/colo/vmlinux", "etc/colo/config.toml", "usr/share/colo/installed-files"} {
			if _, err := os.Stat(filepath.Join(host, f)); err != nil {
				t.Error(err)
			}
		}
		if n := restarts(host); n != 1 {
			t.Errorf("%d containerd restarts, want 1", n)
		}
		// The pod restarted: nothing changed, no restart.
		if out, err := setup(host, "v2.3.7", "install"); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if n := restarts(host); n != 1 {
			t.Errorf("%d containerd restarts after a second run, want still 1", n)
		}
		if out, err := setup(host, "v2.3.7", "uninstall"); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if n := restarts(host); n != 2 {
			t.Errorf("%d containerd restarts after uninstall, want 2", n)
		}
		// What is left: the containerd config it wrote, the restarts log.
		if got := files(tree(t, host)); !slices.Equal(got, []string{"etc/containerd/config.toml", "restarts"}) {
			t.Errorf("after uninstall: %v", got)
		}
	})

	t.Run("config without imports", func(t *testing.T) {
		host := t.TempDir()
		write(filepath.Join(host, "etc/containerd/config.toml"), "version = 3\n", 0o644)
		out, err := setup(host, "2.1.4", "install")
		if err == nil || !strings.Contains(out, `imports = ["/etc/containerd/conf.d/*.toml"]`) {
			t.Errorf("no failure explaining the import: %v\n%s", err, out)
		}
		if _, err := os.Stat(dropin(host)); err == nil {
			t.Error("a drop-in containerd does not import was left")
		}
		if n := restarts(host); n != 0 {
			t.Errorf("%d containerd restarts, want 0", n)
		}
	})

	t.Run("containerd 1.7", func(t *testing.T) {
		host := t.TempDir()
		out, err := setup(host, "v1.7.27", "install")
		if err == nil || !strings.Contains(out, "containerd 2.x") {
			t.Errorf("no failure naming containerd 2.x: %v\n%s", err, out)
		}
		if tr := tree(t, host); len(tr) != 0 {
			t.Errorf("installed on a containerd 1.7 node: %v", files(tr))
		}
	})
}

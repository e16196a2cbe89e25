package sandbox

import (
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/config"
)

func TestHostNamespaces(t *testing.T) {
	pause := func(kinds ...specs.LinuxNamespaceType) *specs.Spec {
		s := &specs.Spec{Annotations: map[string]string{ContainerTypeAnnotation: "sandbox"}, Linux: &specs.Linux{}}
		for _, k := range kinds {
			s.Linux.Namespaces = append(s.Linux.Namespaces, specs.LinuxNamespace{Type: k})
		}
		return s
	}
	allowed := config.Default()
	allowed.Colocation.Annotations = []string{HostNamespacesAnnotation}
	for _, tc := range []struct {
		name   string
		cfg    config.Config
		spec   *specs.Spec
		optIn  string
		asked  string
		errHas string // "" for no error
	}{
		{name: "an ordinary pod", cfg: config.Default(), spec: pause(specs.NetworkNamespace, specs.PIDNamespace, specs.IPCNamespace, specs.UTSNamespace)},
		{name: "a container run by ctr", cfg: config.Default(), spec: &specs.Spec{Linux: &specs.Linux{}}},
		{name: "hostNetwork", cfg: config.Default(), spec: pause(specs.PIDNamespace, specs.IPCNamespace), asked: "network", errHas: "(hostNetwork): a colo pod runs in a VM"},
		{name: "hostPID and hostIPC", cfg: config.Default(), spec: pause(specs.NetworkNamespace), asked: "pid,ipc", errHas: "remove hostPID and hostIPC, or take the guest's own"},
		{name: "opted in, not allowed", cfg: config.Default(), spec: pause(specs.NetworkNamespace), optIn: "guest", asked: "pid,ipc", errHas: "is not allowed on this node"},
		{name: "opted in and allowed", cfg: allowed, spec: pause(specs.NetworkNamespace), optIn: "guest", asked: "pid,ipc"},
		{name: "a bad value", cfg: allowed, spec: pause(specs.NetworkNamespace), optIn: "node", asked: "pid,ipc", errHas: `io.colo.host-namespaces="node": want "guest"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.optIn != "" {
				tc.spec.Annotations[HostNamespacesAnnotation] = tc.optIn
			}
			asked := hostNamespacesOf(tc.spec)
			if got := strings.Join(asked, ","); got != tc.asked {
				t.Errorf("asked for %q, want %q", got, tc.asked)
			}
			err := checkHostNamespaces(tc.cfg, tc.spec.Annotations, asked)
			switch {
			case tc.errHas == "" && err != nil:
				t.Errorf("refused: %v", err)
			case tc.errHas != "" && (!errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tc.errHas)):
				t.Errorf("error %v, want an invalid argument with %q", err, tc.errHas)
			}
		})
	}
}

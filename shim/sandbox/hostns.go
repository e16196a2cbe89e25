package sandbox

import (
	"fmt"
	"slices"
	"strings"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/config"
)

// A pod that asks for the node's network, PID or IPC namespace
// (hostNetwork, hostPID, hostIPC) cannot have them: its containers run in
// a VM, with a kernel of their own. Silently giving it something else
// breaks what it was for (a host IPC segment is not there; the host's
// interfaces are not seen), so it is refused at create, naming the field,
// unless the node allows the documented fallback and the pod opts in:
// with HostNamespacesAnnotation=guest (and the annotation allowed in
// colocation.annotations) it gets the guest's own namespaces, shared by
// the pod's containers and the agent, and no pod network.

// HostNamespacesAnnotation set to "guest" takes the guest's namespaces
// for those of the node a pod asks for.
const HostNamespacesAnnotation = "io.colo.host-namespaces"

// ContainerTypeAnnotation is CRI's kind of container: "sandbox" for a
// pod's pause container.
const ContainerTypeAnnotation = "io.kubernetes.cri.container-type"

// hostNamespaceFields are Kubernetes' names of the node namespaces a pod
// may ask for, by /proc/PID/ns name.
var hostNamespaceFields = map[string]string{"network": "hostNetwork", "pid": "hostPID", "ipc": "hostIPC"}

// hostNamespacesOf are the node namespaces a CRI pod's pause container
// asks for: those its spec does not make or join ("network", "pid",
// "ipc"). Other specs (a container run by ctr) ask for none.
func hostNamespacesOf(spec *specs.Spec) []string {
	if spec.Annotations[ContainerTypeAnnotation] != "sandbox" || spec.Linux == nil {
		return nil
	}
	var asked []string
	for _, ns := range []struct {
		kind specs.LinuxNamespaceType
		name string
	}{{specs.NetworkNamespace, "network"}, {specs.PIDNamespace, "pid"}, {specs.IPCNamespace, "ipc"}} {
		if !slices.ContainsFunc(spec.Linux.Namespaces, func(n specs.LinuxNamespace) bool { return n.Type == ns.kind }) {
			asked = append(asked, ns.name)
		}
	}
	return asked
}

// checkHostNamespaces refuses a pod that asks for node namespaces (asked)
// unless the fallback is allowed and asked for in its annotations.
func checkHostNamespaces(cfg config.Config, annotations map[string]string, asked []string) error {
	if len(asked) == 0 {
		return nil
	}
	v, set := annotations[HostNamespacesAnnotation]
	allowed := slices.Contains(cfg.Colocation.Annotations, HostNamespacesAnnotation)
	if set && v != "guest" {
		return errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("annotation %s=%q: want \"guest\"", HostNamespacesAnnotation, clip(v)))
	}
	if set && allowed {
		return nil
	}
	var fields []string
	for _, ns := range asked {
		fields = append(fields, hostNamespaceFields[ns])
	}
	msg := fmt.Sprintf("the pod asks for the node's namespaces (%s): a colo pod runs in a VM with a kernel of its own and cannot share the node's; remove %s",
		strings.Join(fields, ", "), strings.Join(fields, " and "))
	if set {
		msg += fmt.Sprintf(" (annotation %s is not allowed on this node: colocation.annotations)", HostNamespacesAnnotation)
	} else {
		msg += fmt.Sprintf(", or take the guest's own with annotation %s=guest where the node allows it (colocation.annotations)", HostNamespacesAnnotation)
	}
	return errdefs.ErrInvalidArgument.WithMessage(msg)
}

#!/usr/bin/env bash
# Installs what building and testing colo needs on a Debian 12 machine:
# Debian packages, then Go tools into $TOOLS. Idempotent and quick when
# everything is already there.
set -euo pipefail

TOOLS=${TOOLS:?TOOLS must name the tools directory}
CONTAINERD_VERSION=v2.3.7
RUNC_VERSION=v1.4.3
PROTOBUF_GO_VERSION=v1.36.12
TTRPC_VERSION=v1.2.10
CRICTL_VERSION=v1.36.0

packages=(
	qemu-system-x86 qemu-utils    # the hypervisor and /usr/lib/qemu/virtiofsd
	busybox-static                # test and demo images
	e2fsprogs cpio xz-utils binutils kmod # guest image build (readelf, xz, cpio, depmod)
	protobuf-compiler libprotobuf-dev # agentproto generation
	libseccomp-dev gcc libc6-dev  # runc with seccomp; static builds: the agent (cgo), the test bed's pause
	iproute2 containernetworking-plugins
)
want=()
for p in "${packages[@]}"; do
	[[ $p == \#* ]] && continue
	dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || want+=("$p")
done
# guest/build.sh downloads the kernel package: apt lists must exist.
if ((${#want[@]})) || ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
	echo "setup: apt-get update; install: ${want[*]:-nothing}"
	apt-get update -qq
	((${#want[@]})) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
fi

mkdir -p "$TOOLS"
install_go() { # binary module@version [build flags...]
	local bin=$1 mod=$2
	shift 2
	local stamp="$TOOLS/.$bin.version"
	if [[ -x $TOOLS/$bin && $(cat "$stamp" 2>/dev/null) == "$mod" ]]; then
		return
	fi
	echo "setup: go install $mod"
	GOBIN=$TOOLS GOFLAGS=-buildvcs=false go install "$@" "$mod"
	echo "$mod" >"$stamp"
}
install_go containerd github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION
install_go ctr github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION
install_go containerd-shim-runc-v2 github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION
install_go runc github.com/opencontainers/runc@$RUNC_VERSION -tags seccomp
install_go protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go@$PROTOBUF_GO_VERSION
install_go protoc-gen-go-ttrpc github.com/containerd/ttrpc/cmd/protoc-gen-go-ttrpc@$TTRPC_VERSION

# crictl, for the CRI tests. `go install` of cri-tools fails here (the
# module proxy refuses its version list), so build it from the downloaded
# module, copied because the module cache is read-only.
install_crictl() ( # a subshell, so the EXIT trap removes its temp dir
	mod=sigs.k8s.io/cri-tools@$CRICTL_VERSION
	stamp="$TOOLS/.crictl.version"
	if [[ -x $TOOLS/crictl && $(cat "$stamp" 2>/dev/null) == "$mod" ]]; then
		exit 0
	fi
	echo "setup: go build crictl from $mod"
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	dir=$(cd "$tmp" && go mod download -json "$mod" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
	[[ -d $dir ]] || { echo "setup: go mod download $mod gave no directory" >&2; exit 1; }
	cp -r "$dir" "$tmp/src"
	chmod -R u+w "$tmp/src"
	cd "$tmp/src"
	GOFLAGS=-buildvcs=false go build -ldflags "-X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" \
		-o "$TOOLS/crictl" ./cmd/crictl
	echo "$mod" >"$stamp"
)
install_crictl

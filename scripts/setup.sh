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

packages=(
	qemu-system-x86 qemu-utils    # the hypervisor and /usr/lib/qemu/virtiofsd
	busybox-static                # test and demo images
	e2fsprogs cpio xz-utils binutils kmod # guest image build (readelf, xz, cpio, depmod)
	protobuf-compiler libprotobuf-dev # agentproto generation
	libseccomp-dev gcc            # runc with seccomp; the static agent (cgo)
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

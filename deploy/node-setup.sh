#!/bin/sh
# The colo installer DaemonSet's entrypoint (kubernetes/installer.yaml), in
# the installer image (Dockerfile: the release tarball in /opt/colo). It runs
# privileged with hostPID and the node's /usr/local/bin, /usr/share/colo,
# /etc/colo and /etc/containerd mounted under $HOST_ROOT (/host), and:
#
#   install    checks that the node's containerd is 2.x, installs colo's files
#              (install.sh), registers the runtime handler colo with a
#              drop-in, /etc/containerd/conf.d/colo.toml, and restarts
#              containerd when the drop-in changed; then sleeps.
#   uninstall  removes the drop-in (restarting containerd) and colo's files;
#              then sleeps. Drain the node's colo pods first.
#
# The drop-in counts only if containerd's /etc/containerd/config.toml imports
# /etc/containerd/conf.d/*.toml (containerd 2.x's `containerd config default`
# has that line). Where the node has no config.toml, one with only that
# import is written; where it has one without the import, nothing is edited:
# the pod fails, saying so. docs/install.md.
set -eu

HOST=${HOST_ROOT:-/host}
here=$(cd "$(dirname "$0")" && pwd)
SNIPPET=$here/root/usr/share/colo/containerd-colo.toml
DROPIN=/etc/containerd/conf.d/colo.toml
MAIN=/etc/containerd/config.toml

log() { echo "colo node-setup: $*"; }
die() {
	echo "colo node-setup: $*" >&2
	exit 1
}
# A command in the node's namespaces (hostPID: PID 1 is the node's init).
on_node() { nsenter --target 1 --mount --uts --ipc --net --pid -- "$@"; }

check_containerd() {
	v=$(on_node containerd --version) || die "cannot run containerd --version on the node"
	# "containerd github.com/containerd/containerd/v2 v2.1.4 <commit>",
	# or "containerd containerd.io 2.1.4 <commit>" from Docker's packages.
	ver=$(echo "$v" | awk '{print $3}')
	major=${ver#v}
	major=${major%%.*}
	case $major in
	'' | *[!0-9]*) die "cannot tell containerd's version from: $v" ;;
	esac
	[ "$major" -ge 2 ] || die "containerd $ver: colo's handler is a config version 3 drop-in, which needs containerd 2.x"
	log "containerd $ver"
}

restart_containerd() {
	log "restarting containerd (it reads its config only at start)"
	on_node systemctl restart containerd
}

sleep_forever() {
	trap 'exit 0' TERM INT
	sleep infinity &
	wait
}

do_install() {
	check_containerd
	DESTDIR=$HOST "$here/install.sh" install "$here/root"
	if [ ! -e "$HOST$MAIN" ]; then
		log "no $MAIN (containerd runs on its defaults): writing one that imports /etc/containerd/conf.d/*.toml"
		mkdir -p "$HOST$(dirname "$MAIN")"
		printf '%s\n' 'version = 3' 'imports = ["/etc/containerd/conf.d/*.toml"]' >"$HOST$MAIN"
	fi
	changed=false
	if ! cmp -s "$SNIPPET" "$HOST$DROPIN"; then
		mkdir -p "$HOST$(dirname "$DROPIN")"
		cp "$SNIPPET" "$HOST$DROPIN.colo-new"
		mv -f "$HOST$DROPIN.colo-new" "$HOST$DROPIN"
		changed=true
		log "wrote $DROPIN"
	fi
	# containerd's own view of its config, imports merged: a drop-in it
	# does not import, or cannot parse, is taken back before any restart.
	if ! dump=$(on_node containerd config dump 2>&1); then
		rm -f "$HOST$DROPIN"
		die "containerd config dump fails, so $DROPIN is removed and containerd not restarted: $dump"
	fi
	if ! echo "$dump" | grep -q 'io.containerd.colo.v2'; then
		rm -f "$HOST$DROPIN"
		die "$MAIN does not import $DROPIN: add the top-level line
  imports = [\"/etc/containerd/conf.d/*.toml\"]
to it (or the tables of /usr/share/colo/containerd-colo.toml), then restart this pod"
	fi
	if $changed; then
		if ! restart_containerd; then
			rm -f "$HOST$DROPIN"
			die "systemctl restart containerd failed: $DROPIN is removed; restart this pod to try again"
		fi
	fi
	log "colo is installed and containerd has the runtime handler colo"
	sleep_forever
}

do_uninstall() {
	if [ -e "$HOST$DROPIN" ]; then
		if cmp -s "$SNIPPET" "$HOST$DROPIN"; then
			rm -f "$HOST$DROPIN"
			log "removed $DROPIN"
			restart_containerd || die "systemctl restart containerd failed"
		else
			log "kept $DROPIN: it is not the one this image installs"
		fi
	fi
	DESTDIR=$HOST "$here/install.sh" uninstall "$here/root"
	log "colo is uninstalled"
	sleep_forever
}

case ${1:-install} in
install) do_install ;;
uninstall) do_uninstall ;;
*) die "usage: node-setup.sh install|uninstall" ;;
esac

#!/bin/sh
# colo's installer: copies a tree laid out as installed into $DESTDIR/, and
# lists what it installed in a manifest that uninstall removes again. It is
# what make install runs (on a tree staged from build/), the release
# tarball's install.sh (the tree is root/ beside it) and what the Kubernetes
# installer DaemonSet runs (node-setup.sh). docs/install.md.
#
#   install.sh install [ROOT]     ROOT: the tree, by default root/ beside this script
#   install.sh uninstall [ROOT]
#
# install never overwrites /etc/colo/config.toml; uninstall removes it only
# if install put it there and it is still byte-identical to the default
# (ROOT/etc/colo/config.toml, or $COLO_DEFAULT_CONFIG). Directories install
# created are removed when empty. Environment: DESTDIR (default: none, /),
# COLO_MANIFEST (default /usr/share/colo/installed-files).
set -eu

CONFIG=/etc/colo/config.toml
SNIPPET=/usr/share/colo/containerd-colo.toml
MANIFEST=${COLO_MANIFEST:-/usr/share/colo/installed-files}
DESTDIR=${DESTDIR:-}
case $DESTDIR in
'' | /*) ;;
*) DESTDIR=$(pwd)/$DESTDIR ;;
esac
DESTDIR=${DESTDIR%/}
here=$(cd "$(dirname "$0")" && pwd)
ROOT=${2:-$here/root}
DEFAULT_CONFIG=${COLO_DEFAULT_CONFIG:-$ROOT$CONFIG}

die() {
	echo "install.sh: $*" >&2
	exit 1
}

# record_dirs FILE: appends to $list the directories above FILE that do not
# exist under DESTDIR yet (install creates them).
record_dirs() {
	d=$(dirname "$1")
	while [ "$d" != / ] && [ ! -d "$DESTDIR$d" ]; do
		echo "$d/" >>"$list"
		d=$(dirname "$d")
	done
}

do_install() {
	[ -d "$ROOT" ] || die "no tree to install at $ROOT"
	ROOT=$(cd "$ROOT" && pwd)
	files=$(cd "$ROOT" && find . -type f | sed 's|^\.||' | LC_ALL=C sort)
	[ -n "$files" ] || die "nothing to install in $ROOT"
	list=$(mktemp)
	trap 'rm -f "$list"' EXIT
	# What an earlier install recorded stays recorded (a config it put
	# there and kept now, the directories it created).
	if [ -f "$DESTDIR$MANIFEST" ]; then
		cat "$DESTDIR$MANIFEST" >>"$list"
	fi
	for f in $files "$MANIFEST"; do
		record_dirs "$f"
		mkdir -p "$DESTDIR$(dirname "$f")"
	done
	for f in $files; do
		if [ "$f" = "$CONFIG" ] && [ -e "$DESTDIR$f" ]; then
			echo "kept $DESTDIR$f: an existing config is never overwritten (defaults: docs/config.md)"
			continue
		fi
		# A new file renamed over the old: running shims keep theirs.
		cp "$ROOT$f" "$DESTDIR$f.colo-new"
		chmod "$(stat -c %a "$ROOT$f")" "$DESTDIR$f.colo-new"
		mv -f "$DESTDIR$f.colo-new" "$DESTDIR$f"
		echo "$f" >>"$list"
		echo "installed $DESTDIR$f"
	done
	echo "$MANIFEST" >>"$list"
	LC_ALL=C sort -u "$list" >"$DESTDIR$MANIFEST.colo-new"
	chmod 0644 "$DESTDIR$MANIFEST.colo-new"
	mv -f "$DESTDIR$MANIFEST.colo-new" "$DESTDIR$MANIFEST"
	echo "installed $DESTDIR$MANIFEST (what uninstall removes)"
	if [ -f "$DESTDIR$SNIPPET" ]; then
		echo
		echo "containerd's runtime handler for colo ($SNIPPET; docs/kubernetes.md):"
		echo
		cat "$DESTDIR$SNIPPET"
	fi
}

do_uninstall() {
	m=$DESTDIR$MANIFEST
	if [ ! -f "$m" ]; then
		echo "nothing to uninstall: no $m"
		return 0
	fi
	# Files, then the manifest, then directories deepest first if empty.
	grep -v '/$' "$m" | while IFS= read -r f; do
		[ "$f" != "$MANIFEST" ] || continue
		[ -e "$DESTDIR$f" ] || [ -L "$DESTDIR$f" ] || continue
		if [ "$f" = "$CONFIG" ] && ! cmp -s "$DEFAULT_CONFIG" "$DESTDIR$f"; then
			echo "kept $DESTDIR$f: it is not the default ($DEFAULT_CONFIG)"
			continue
		fi
		rm -f "$DESTDIR$f"
		echo "removed $DESTDIR$f"
	done
	dirs=$(grep '/$' "$m" | LC_ALL=C sort -r)
	rm -f "$m"
	echo "removed $m"
	for d in $dirs; do
		if rmdir "$DESTDIR$d" 2>/dev/null; then
			echo "removed $DESTDIR$d"
		fi
	done
}

case ${1:-} in
install) do_install ;;
uninstall) do_uninstall ;;
*) die "usage: install.sh install|uninstall [ROOT]" ;;
esac

#!/usr/bin/env bash
# Builds the colo guest: the kernel as an uncompressed PVH vmlinux and an
# initrd with colo-agent as /init, both from Debian's linux-image-amd64, and
# Debian's static busybox as the shell of the debug console.
#
# Usage: guest/build.sh --agent PATH --out DIR [--cache DIR]
#
#   --agent PATH  the static colo-agent binary; it becomes /init
#   --out DIR     where vmlinux and initrd.img are written
#   --cache DIR   where the kernel and busybox packages are downloaded and
#                 unpacked
#                 (default: ${XDG_CACHE_HOME:-$HOME/.cache}/colo/guest);
#                 nothing is downloaded again while the .deb is there
#
# Environment: SOURCE_DATE_EPOCH sets the mtime of every initrd entry
# (default 0). The same inputs give byte-identical outputs.
#
# Why a vmlinux: QEMU boots an ELF kernel with a PVH note directly, so the
# guest skips the bzImage's xz decompressor, which costs seconds under TCG.
# Debian ships only the bzImage, so the xz payload is cut out of it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
prog=${0##*/}
meta_package=linux-image-amd64
busybox_package=busybox-static

die() {
	echo "$prog: $*" >&2
	exit 1
}

usage() {
	echo "usage: $prog --agent PATH --out DIR [--cache DIR]" >&2
	exit 2
}

agent= out= cache=
while [ $# -gt 0 ]; do
	case $1 in
	--agent) [ $# -ge 2 ] || usage; agent=$2; shift 2 ;;
	--out) [ $# -ge 2 ] || usage; out=$2; shift 2 ;;
	--cache) [ $# -ge 2 ] || usage; cache=$2; shift 2 ;;
	-h | --help) usage ;;
	*) echo "$prog: unknown argument: $1" >&2; usage ;;
	esac
done
[ -n "$agent" ] && [ -n "$out" ] || usage
[ -n "$cache" ] || cache=${XDG_CACHE_HOME:-$HOME/.cache}/colo/guest
epoch=${SOURCE_DATE_EPOCH:-0}
modules_list=$here/modules

for tool in apt-cache apt-get dpkg-deb xz readelf cpio; do
	command -v "$tool" >/dev/null || die "$tool not found (needs a Debian host with apt, dpkg, xz-utils, binutils, cpio)"
done
depmod=$(PATH=$PATH:/usr/sbin:/sbin command -v depmod) || die "depmod not found (package kmod)"

[ -f "$agent" ] || die "--agent $agent: no such file"
readelf -h "$agent" >/dev/null 2>&1 || die "--agent $agent: not an ELF binary"
# A dynamically linked /init dies before printing anything ("No working init
# found"): refuse it here instead.
if readelf -lW "$agent" | grep -q 'Requesting program interpreter'; then
	die "--agent $agent: dynamically linked; the initrd has no libc, build it static"
fi
[ -f "$modules_list" ] || die "$modules_list: no such file"

mkdir -p "$out" "$cache"
out=$(cd "$out" && pwd)
cache=$(cd "$cache" && pwd)

tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# The kernel package linux-image-amd64 points at today, e.g.
# linux-image-6.1.0-56-amd64.
package=$(apt-cache depends "$meta_package" 2>/dev/null |
	awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
[ -n "$package" ] || die "apt-cache depends $meta_package: no linux-image-* dependency (run apt-get update?)"

# fetch PACKAGE prints the path of the package's .deb in the cache,
# downloading the candidate version unless it is there.
fetch() {
	local package=$1 filename deb got
	filename=$(apt-cache show --no-all-versions "$package" | awk '$1 == "Filename:" { print $2; exit }')
	[ -n "$filename" ] || die "apt-cache show $package: no Filename (run apt-get update?)"
	deb=$cache/${filename##*/}
	if [ ! -f "$deb" ]; then
		echo "$prog: downloading $package" >&2
		rm -rf "$tmp/download"
		mkdir "$tmp/download"
		# APT::Sandbox::User=root: the _apt user cannot write the caller's cache.
		(cd "$tmp/download" && apt-get -q -o APT::Sandbox::User=root download "$package" >&2) ||
			die "apt-get download $package failed"
		got=$(find "$tmp/download" -maxdepth 1 -name '*.deb' | head -n 1)
		[ -n "$got" ] || die "apt-get download $package: no .deb written"
		mv "$got" "$deb"
	fi
	echo "$deb"
}
deb=$(fetch "$package")

# Unpack once per package version; depmod writes the modules.dep the .deb
# leaves to the postinst.
root=${deb%.deb}
if [ ! -f "$root/.unpacked" ]; then
	echo "$prog: unpacking ${deb##*/}" >&2
	rm -rf "$root" "$root.tmp"
	dpkg-deb -x "$deb" "$root.tmp"
	kver=$(cd "$root.tmp/lib/modules" && ls)
	[ "$(echo "$kver" | wc -l)" = 1 ] || die "${deb##*/}: expected one kernel version under lib/modules, found: $kver"
	"$depmod" -b "$root.tmp" "$kver"
	touch "$root.tmp/.unpacked"
	mv "$root.tmp" "$root"
fi
kver=$(cd "$root/lib/modules" && ls)
moddir=$root/lib/modules/$kver

# The kernel: the first xz stream in the bzImage is the compressed vmlinux.
vmlinuz=$root/boot/vmlinuz-$kver
[ -f "$vmlinuz" ] || die "${deb##*/}: no boot/vmlinuz-$kver"
vmlinux=$root/vmlinux
if [ ! -f "$vmlinux" ]; then
	offset=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$vmlinuz" | head -n 1 | cut -d: -f1) || true
	[ -n "$offset" ] || die "$vmlinuz: no xz payload (magic FD 37 7A 58 5A 00) found"
	# --single-stream stops at the end of the payload and ignores what the
	# bzImage has after it; tail then dies of SIGPIPE, which is fine.
	{ tail -c +$((offset + 1)) "$vmlinuz" || true; } | xz --single-stream -dc >"$tmp/vmlinux" ||
		die "$vmlinuz: xz payload at offset $offset does not decompress"
	[ "$(readelf -h "$tmp/vmlinux" 2>/dev/null | awk '$1 == "Type:" { print $2 }')" = EXEC ] ||
		die "$vmlinuz: the xz payload is not an ELF executable"
	# The PVH entry is the Xen ELF note type 0x12 (XEN_ELFNOTE_PHYS32_ENTRY).
	readelf -nW "$tmp/vmlinux" | grep -Eq '^[[:space:]]*Xen[[:space:]].*(0x00000012|PHYS32_ENTRY)' ||
		die "$vmlinuz: the vmlinux has no PVH entry note (Xen note 0x12); QEMU cannot boot it directly"
	mv "$tmp/vmlinux" "$vmlinux"
fi

# Modules: the listed names, each after its dependencies (modules.dep lists
# a module's dependencies transitively). Those before "[on-demand]" are
# loaded at boot, in this order; the others are only copied, for
# /sbin/modprobe (colo-agent) to load when the kernel asks for them.
declare -A path_of=() deps_of=() builtin=() placed=()
while IFS= read -r line; do
	mod=${line%%:*}
	name=${mod##*/}
	name=${name%%.ko*}
	name=${name//-/_}
	path_of[$name]=$mod
	deps_of[$mod]=${line#*:}
done <"$moddir/modules.dep"
while IFS= read -r mod; do
	name=${mod##*/}
	name=${name%%.ko*}
	builtin[${name//-/_}]=1
done <"$moddir/modules.builtin"

order=() on_demand=()
place() {
	local mod=$1 list=$2 dep
	[ -z "${placed[$mod]:-}" ] || return 0
	placed[$mod]=1
	for dep in ${deps_of[$mod]}; do
		place "$dep" "$list"
	done
	if [ "$list" = boot ]; then
		order+=("$mod")
	else
		on_demand+=("$mod")
	fi
}
section=boot
while read -r name _; do
	case $name in
	'' | '#'*) continue ;;
	'[on-demand]') section=on-demand; continue ;;
	'['*) die "$modules_list: unknown section $name (want [on-demand])" ;;
	esac
	key=${name//-/_}
	if [ -n "${path_of[$key]:-}" ]; then
		place "${path_of[$key]}" "$section"
	elif [ -n "${builtin[$key]:-}" ]; then
		echo "$prog: module $name is built into $kver: skipped" >&2
	else
		die "$modules_list: module $name is not in $kver"
	fi
done < <(sed 's/#.*//' "$modules_list")

# The debug console's shell (agent.debug_console): Debian's static busybox.
# Nothing else in the guest uses it. Its applets are linked in /bin only,
# none in /sbin: the kernel runs /sbin/modprobe (kernel.modprobe) and
# /sbin/poweroff when they exist, and a guest must behave the same with the
# console or without. /sbin/modprobe is colo-agent itself (below), which
# loads the on-demand modules; busybox's modprobe stays out of the kernel's
# way.
busybox_deb=$(fetch "$busybox_package")
mkdir "$tmp/busybox"
dpkg-deb -x "$busybox_deb" "$tmp/busybox"
busybox=$tmp/busybox/bin/busybox
[ -f "$busybox" ] || die "${busybox_deb##*/}: no bin/busybox"
if readelf -lW "$busybox" | grep -q 'Requesting program interpreter'; then
	die "${busybox_deb##*/}: bin/busybox is dynamically linked; the initrd has no libc"
fi
# The applets this busybox has; init and linuxrc would be other inits.
applets=$("$busybox" --list | grep -vxE 'busybox|init|linuxrc') ||
	die "${busybox_deb##*/}: bin/busybox --list failed"
echo "$applets" | grep -qx sh || die "${busybox_deb##*/}: busybox has no sh applet"

# The initrd tree.
stage=$tmp/initrd
mkdir -p "$stage"/{proc,sys,dev,run,tmp,bin,sbin,etc/colo}
cp "$agent" "$stage/init"
# The kernel's usermode helper for request_module: "/sbin/modprobe -q --
# NAME"; colo-agent acts as modprobe when called by that name.
ln -s ../init "$stage/sbin/modprobe"
cp "$busybox" "$stage/bin/busybox"
for applet in $applets; do
	case $applet in
	*/* | . | ..) die "busybox applet $applet: not a file name" ;;
	esac
	ln -s busybox "$stage/bin/$applet"
done
: >"$stage/etc/colo/modules"
for mod in "${order[@]}" "${on_demand[@]}"; do
	case $mod in
	*.ko) ;;
	*) die "$mod: compressed module; the agent loads plain .ko files only" ;;
	esac
	mkdir -p "$stage/lib/modules/$kver/${mod%/*}"
	cp "$moddir/$mod" "$stage/lib/modules/$kver/$mod"
done
for mod in "${order[@]}"; do
	echo "lib/modules/$kver/$mod" >>"$stage/etc/colo/modules"
done
# modules.dep, modules.alias and modules.devname of the modules in the
# initrd, for /sbin/modprobe and the static device nodes the agent makes at
# boot (such as /dev/net/tun, whose open loads tun); modules.builtin so that
# modprobe of a built-in module succeeds. Nothing else depmod writes.
cp "$moddir/modules.builtin" "$moddir/modules.builtin.modinfo" "$moddir/modules.order" "$stage/lib/modules/$kver/"
"$depmod" -b "$stage" "$kver" || die "depmod of the initrd's modules failed"
for f in "$stage/lib/modules/$kver"/modules.*; do
	case ${f##*/} in
	modules.dep | modules.alias | modules.devname | modules.builtin) ;;
	*) rm -f "$f" ;;
	esac
done

# Reproducible: fixed modes, owner and mtimes, sorted entries, no inode or
# device numbers (--reproducible). Uncompressed: the kernel would spend more
# time decompressing under TCG than it saves reading.
find "$stage" -type d -exec chmod 0755 {} +
find "$stage" -type f -exec chmod 0644 {} +
chmod 0755 "$stage/init" "$stage/bin/busybox"
find "$stage" -exec touch -h -d "@$epoch" {} +
(cd "$stage" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
	cpio --create --format=newc --reproducible --owner=0:0 --quiet) >"$tmp/initrd.img"

# Both outputs get a new mtime, as make expects of a rule's targets; an
# unchanged vmlinux is only touched rather than copied again.
if cmp -s "$vmlinux" "$out/vmlinux"; then
	touch "$out/vmlinux"
else
	cp "$vmlinux" "$tmp/vmlinux.out"
	mv "$tmp/vmlinux.out" "$out/vmlinux"
fi
mv "$tmp/initrd.img" "$out/initrd.img"
echo "$prog: $out/vmlinux $out/initrd.img (kernel $kver, ${#order[@]} modules at boot, ${#on_demand[@]} on demand, busybox with $(echo "$applets" | wc -l) applets)" >&2

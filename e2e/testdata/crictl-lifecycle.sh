#!/usr/bin/env bash
# Runs one pod's whole life through crictl, as an operator would: runp,
# create, start, exec, logs, stop, rm, stopp, rmp. Every step must succeed.
# It prints each step ("+ crictl ...") and the ids it made ("pod ID",
# "container ID") for the caller's leak check.
#
# Usage: crictl-lifecycle.sh HANDLER IMAGE UID CRICTL [CRICTL_FLAGS...]
#   HANDLER  the CRI runtime handler ("" for the runtime's default)
#   IMAGE    an image already present: nothing is pulled
#   UID      the pod's uid, also its label io.kubernetes.pod.uid
#   CRICTL   crictl and the flags pointing it at the runtime, e.g.
#            crictl --runtime-endpoint unix:///run/containerd/containerd.sock
# With POD_INIT=pause the first process of the pod's PID namespace must be
# the pause container's; with POD_INIT=colo, colo's holder of the pod's
# namespaces, and no pause process may run in the pod (sandboxer "shim").
set -euo pipefail
if (($# < 4)); then
	sed -n '7,15s/^# \{0,1\}//p' "$0" >&2
	exit 2
fi
handler=$1 image=$2 uid=$3
shift 3
crictl=("$@")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step() {
	echo "+ crictl $*" >&2
	"${crictl[@]}" "$@"
}
fail() {
	echo "crictl-lifecycle: $*" >&2
	exit 1
}

mkdir "$work/logs"
cat >"$work/pod.json" <<JSON
{
  "metadata": {"name": "crictl-lifecycle", "namespace": "default", "uid": "$uid", "attempt": 0},
  "hostname": "crictl-lifecycle",
  "log_directory": "$work/logs",
  "labels": {"io.kubernetes.pod.uid": "$uid"},
  "linux": {}
}
JSON
# The shell traps SIGTERM, so `stop` ends it gracefully.
cat >"$work/container.json" <<JSON
{
  "metadata": {"name": "main"},
  "image": {"image": "$image"},
  "command": ["sh", "-c", "trap 'exit 0' TERM; echo hello from crictl; sleep 3600 & wait"],
  "log_path": "main.log",
  "linux": {}
}
JSON

step inspecti "$image" >/dev/null
pod=$(step runp --runtime "$handler" "$work/pod.json")
echo "pod $pod"
container=$(step create "$pod" "$work/container.json" "$work/pod.json")
echo "container $container"
step start "$container"

out=$(step exec "$container" sh -c 'echo exec-ok; uname -n')
[[ $out == $'exec-ok\ncrictl-lifecycle' ]] || fail "exec printed: $out"

# The pod shares its PID namespace (crictl's default): what runs there.
init=$(step exec "$container" cat /proc/1/cmdline | tr '\0' ' ')
procs=$(step exec "$container" sh -c 'for p in /proc/[0-9]*/cmdline; do tr "\0" " " <"$p"; echo; done')
echo "PID 1: $init"
case ${POD_INIT:-} in
pause) [[ $init == "/pause " ]] || fail "PID 1 of the pod is $init, want the pause container's /pause" ;;
colo)
	[[ $init == *" pod-ns " ]] || fail "PID 1 of the pod is $init, want colo's holder of the pod's namespaces"
	[[ $procs != *pause* ]] || fail "a pause process runs in the pod: $procs"
	;;
esac

# The log is written as the container runs: wait for its line (30 s at most).
for ((i = 0; ; i++)); do
	logs=$(step logs "$container" 2>&1)
	[[ $logs == *"hello from crictl"* ]] && break
	((i < 300)) || fail "logs lack the container's output: $logs"
	sleep 0.1
done
echo "$logs"

step stop --timeout 30 "$container"
state=$(step inspect --output go-template --template '{{.status.state}} {{.status.exitCode}}' "$container")
[[ $state == "CONTAINER_EXITED 0" ]] || fail "after stop: $state"
step rm "$container"
step stopp "$pod"
step rmp "$pod"
echo "crictl-lifecycle: ok"

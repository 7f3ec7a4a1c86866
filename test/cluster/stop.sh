#!/usr/bin/env bash
# Stops the test cluster and removes everything it made on this machine: its processes (by the
# pids its start recorded), the pods' containers and shims, the mounts under the kubelet's root
# and containerd's state (volumes, root filesystems, pod network namespaces), the pod bridge,
# the pod cgroups, the iptables chains of kube-proxy and the kubelet, and the node's address.
# Also what a killed run left, which is why it runs at every start too. The start writes the
# names of what to remove into the run directory's layout.env.
#
#   bash test/cluster/stop.sh [--if-owner PID]   (only if PID started the cluster: jest's teardown)
set -uo pipefail

run="${MIRRORD_DEV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mirrord-dev}/cluster"
[[ -f $run/layout.env ]] || exit 0
# shellcheck source=/dev/null
source "$run/layout.env"
if [[ ${1:-} == --if-owner ]]; then
  [[ $(cat "$run/owner" 2>/dev/null) == "${2:-}" ]] || exit 0
fi

say() { echo "cluster: $*" >&2; }
alive() { kill -0 "$1" 2>/dev/null; }

# SIGTERM, then SIGKILL after 3 s: a test cluster has no state worth a longer graceful drain
# (the API server would otherwise wait for its clients' requests to finish).
stop_process() { # name
  local pid
  pid=$(cat "$run/pids/$1" 2>/dev/null) || return 0
  alive "$pid" || return 0
  kill -TERM "$pid"
  for _ in $(seq 30); do
    alive "$pid" || return 0
    sleep 0.1
  done
  kill -KILL "$pid"
}

for name in kube-proxy kubelet kube-scheduler kube-controller-manager kube-apiserver etcd; do
  stop_process "$name"
done

ctr=(ctr --address "$CONTAINERD_SOCKET" --namespace k8s.io)
if "${ctr[@]}" version >/dev/null 2>&1; then
  # While containerd runs, its own record of the pods' containers goes too.
  for id in $("${ctr[@]}" containers list --quiet); do
    "${ctr[@]}" tasks kill --signal SIGKILL "$id" >/dev/null 2>&1
    "${ctr[@]}" tasks delete --force "$id" >/dev/null 2>&1
    "${ctr[@]}" containers delete "$id" >/dev/null 2>&1
  done
fi
stop_process containerd

# Every container process lives in the kubelet's kubepods cgroups; shims name our socket.
pod_cgroups=(/sys/fs/cgroup/*/kubepods)
for _ in $(seq 50); do
  mapfile -t pids < <(
    cat "${pod_cgroups[@]/%//cgroup.procs}" 2>/dev/null
    find "${pod_cgroups[@]}" -mindepth 1 -name cgroup.procs -exec cat {} + 2>/dev/null
    pgrep -f -- "-address $CONTAINERD_SOCKET"
  )
  ((${#pids[@]})) || break
  kill -KILL "${pids[@]}" 2>/dev/null
  sleep 0.1
done

# Deepest first: volumes inside root filesystems inside the state directory.
awk -v a="$KUBELET_ROOT" -v b="$CONTAINERD_STATE" \
  '$5 == a || index($5, a "/") == 1 || $5 == b || index($5, b "/") == 1 { print length($5), $5 }' \
  /proc/self/mountinfo | sort -rn | cut -d' ' -f2- | while read -r target; do
  umount --lazy "$target" 2>/dev/null
done

ip link delete "$BRIDGE" 2>/dev/null
for cgroup in "${pod_cgroups[@]}"; do
  [[ -d $cgroup ]] && find "$cgroup" -depth -type d -exec rmdir {} + 2>/dev/null
done
# kube-proxy's chains and the kubelet's (KUBE-FIREWALL, KUBE-KUBELET-CANARY, …): first the jumps
# into them from the built-in chains, then the chains themselves.
for table in filter nat mangle; do
  iptables-save -t "$table" 2>/dev/null | sed -n 's/^-A \([A-Z]*\) \(.*-j KUBE-.*\)$/\1 \2/p' |
    while read -r chain rule; do
      eval "iptables -t $table -D $chain $rule" 2>/dev/null
    done
  for chain in $(iptables-save -t "$table" 2>/dev/null | sed -n 's/^:\(KUBE-[^ ]*\) .*/\1/p'); do
    iptables -t "$table" -F "$chain" 2>/dev/null
  done
  for chain in $(iptables-save -t "$table" 2>/dev/null | sed -n 's/^:\(KUBE-[^ ]*\) .*/\1/p'); do
    iptables -t "$table" -X "$chain" 2>/dev/null
  done
done
ip address delete "$NODE_IP/32" dev lo 2>/dev/null
rm -rf "$run/pids" "$run/owner"

# What is still there is a bug of this script: say what, and fail.
left=()
mapfile -t processes < <(pgrep -f -- "^$BIN/|^containerd --config $run/|-address $CONTAINERD_SOCKET")
((${#processes[@]})) && left+=("processes ${processes[*]}")
grep -qF -e " $KUBELET_ROOT" -e " $CONTAINERD_STATE" /proc/self/mountinfo && left+=("mounts")
[[ -e /sys/class/net/$BRIDGE ]] && left+=("bridge $BRIDGE")
compgen -G "/sys/fs/cgroup/*/kubepods" >/dev/null && left+=("cgroups kubepods")
iptables-save 2>/dev/null | grep -q -- '^:KUBE-\|-j KUBE-' && left+=("iptables KUBE-* chains")
if ((${#left[@]})); then
  say "stopped, but left: ${left[*]}"
  exit 1
fi

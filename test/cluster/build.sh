#!/usr/bin/env bash
# Builds the test cluster's binaries from their Go modules into a cache named after the pinned
# versions (outside the repository), once: kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, kube-proxy and kubectl (for trying the cluster by hand) from
# k8s.io/kubernetes, etcd at the version Kubernetes pins, and CoreDNS. Prints the cache's bin
# directory on stdout; progress goes to stderr, the Go tools' own output to build.log there.
#
# k8s.io/kubernetes cannot be `go install`ed (its go.mod replaces the k8s.io/* staging modules
# with local folders), so a wrapper module requires it and replaces each staging module with its
# published v0.x release of the same patch level.
set -euo pipefail

KUBERNETES_VERSION=v1.34.4
ETCD_VERSION=v3.6.4 # what k8s.io/kubernetes@v1.34.4 requires (go.etcd.io/etcd/server/v3)
COREDNS_VERSION=v1.12.1 # what kubeadm v1.34 deploys
cache="${MIRRORD_DEV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mirrord-dev}/k8s-${KUBERNETES_VERSION}"
bin="$cache/bin"
commands=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)

built() { # names…: true if every one of them is in bin/
  local name
  for name in "$@"; do [[ -x "$bin/$name" ]] || return 1; done
}
if built "${commands[@]}" etcd coredns; then
  echo "$bin"
  exit 0
fi

start=$SECONDS
step() { echo "cluster build: $* ($((SECONDS - start)) s so far)" >&3; }
# A long `go build` says nothing for minutes: a line every 30 s shows it is alive.
with_heartbeat() {
  local what=$1
  shift
  "$@" &
  local pid=$! status=0
  while ! wait_for "$pid" 30; do step "still building $what"; done
  wait "$pid" || status=$?
  return "$status"
}
wait_for() { # pid seconds: true once the process has ended
  local deadline=$((SECONDS + $2))
  while ((SECONDS < deadline)); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 1
  done
  ! kill -0 "$1" 2>/dev/null
}

mkdir -p "$bin" "$cache/kubernetes"
log="$cache/build.log"
: >"$log"
# The Go tools' chatter goes to the log; on a failure its end is shown.
exec 3>&2 2>>"$log"
trap 'status=$?; ((status == 0)) || { step "FAILED; the end of $log:"; tail -n 30 "$log" >&3; }' EXIT
minor=${KUBERNETES_VERSION#v1.}
staging=v0.$minor
version_flags="-s -w"
for package in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  version_flags+=" -X $package.gitVersion=$KUBERNETES_VERSION -X $package.gitMajor=1"
  version_flags+=" -X $package.gitMinor=${minor%%.*} -X $package.gitTreeState=clean"
done

if ! built "${commands[@]}" etcd; then
  step "resolving k8s.io/kubernetes@$KUBERNETES_VERSION and etcd $ETCD_VERSION"
  cd "$cache/kubernetes"
  rm -f go.mod go.sum
  go mod init mirrord.dev/test-cluster
  mkdir -p etcd
  cat >etcd/main.go <<'GO'
// etcd's own main, as a package of this wrapper module so it shares Kubernetes' pins.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  replaces=()
  for module in $(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" |
    sed -n 's/.*"GoMod": "\(.*\)",*/\1/p' | xargs sed -n 's#^\s*\(k8s.io/[a-z-]*\) => ./staging/.*#\1#p'); do
    replaces+=("-replace=$module=$module@$staging")
  done
  go mod edit "${replaces[@]}" "-require=k8s.io/kubernetes@$KUBERNETES_VERSION" \
    "-require=go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  packages=()
  for name in "${commands[@]}"; do packages+=("k8s.io/kubernetes/cmd/$name"); done
  # Each at its pinned version: without one, `go get` takes the newest release.
  go get "${packages[@]/%/@$KUBERNETES_VERSION}" "go.etcd.io/etcd/server/v3/etcdmain@$ETCD_VERSION"
  step "building ${commands[*]} and etcd (the longest step: 5-40 min cold on 2 cores)"
  CGO_ENABLED=0 with_heartbeat "Kubernetes" \
    go build -trimpath -ldflags "$version_flags" -o "$bin/" "${packages[@]}"
  CGO_ENABLED=0 with_heartbeat "etcd" go build -trimpath -ldflags "-s -w" -o "$bin/etcd" ./etcd
fi

if ! [[ -x "$bin/coredns" ]]; then
  step "building CoreDNS $COREDNS_VERSION"
  GOBIN="$bin" CGO_ENABLED=0 with_heartbeat "CoreDNS" \
    go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
fi

built "${commands[@]}" etcd coredns
step "done"
echo "$bin"

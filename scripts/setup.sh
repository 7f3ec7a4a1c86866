#!/usr/bin/env bash
# Installs what the build, the demo and the tests need and is missing (Debian packages, npm
# dependencies), then builds everything. Safe to run again: it only installs what is missing.
# With --cluster (npm test, npm run dev:cluster) also what the real test cluster needs: its
# Debian packages, and its binaries and images, built once into ~/.cache/mirrord-dev; and the
# editor tests' VS Code (code-server) with the browser that drives it, installed once there. With
# --bench (npm run bench) also vegeta, the benchmarks' constant-rate load generator, built once
# from its Go module into the same cache.
set -euo pipefail
cd "$(dirname "$0")/.."
cluster=false
bench=false
[[ "${1:-}" == --cluster ]] && cluster=true
[[ "${1:-}" == --bench ]] && bench=true

# clang/llvm/libbpf/bpftool build the tap; iproute2 makes the namespaces; tcpdump, wrk, curl
# python3, redis-server and redis-tools are the real programs the tests and benchmarks drive;
# python3-gunicorn is the real pre-fork server (workers forked after listen) the tests mirror
# into, and whose workers must all end with a killed mirror; openssl makes the test API
# server's certificate; tmux is the real terminal the status line is tested in. dnsmasq is the
# nameserver a test target's resolver asks, dig (bind9-dnsutils) the app that speaks DNS itself,
# python3-redis a Redis client library, for the outgoing tests.
# msgpack-c is linked into the layer (libmsgpack-c-dev since Debian 13, libmsgpack-dev before).
msgpack=libmsgpack-dev
apt-cache show libmsgpack-c-dev >/dev/null 2>&1 && msgpack=libmsgpack-c-dev
packages=(clang llvm libbpf-dev libelf-dev zlib1g-dev bpftool iproute2 clang-format make g++
  pkg-config tcpdump wrk curl python3 python3-gunicorn procps redis-server redis-tools openssl
  tmux dnsmasq-base bind9-dnsutils python3-redis nginx-light "$msgpack")
# The test cluster: the container runtime and pod network, iptables for kube-proxy, and what
# builds images without a Docker engine or registry (buildah, debootstrap).
$cluster && packages+=(containerd runc containernetworking-plugins iptables conntrack buildah
  debootstrap)
# The editor tests' VS Code (code-server, test/editor/install.sh): chromium is the browser they
# drive it with; its install builds VS Code's kerberos module (libkrb5-dev) and takes the search
# binary VS Code would download from GitHub from ripgrep.
$cluster && packages+=(chromium ripgrep libkrb5-dev)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed' || missing+=("$package")
done
if ((${#missing[@]})); then
  sudo=()
  ((EUID == 0)) || sudo=(sudo)
  echo "setup: installing Debian packages: ${missing[*]}"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

# npm ci only when the lock changed since the last install, so repeated runs stay fast. No
# install scripts: no dependency needs one (package.json's allowScripts), and this package's
# own would be npm's implicit `node-gyp rebuild`, a second full compile of the addon that the
# build below makes anyway.
if [[ ! -f node_modules/.package-lock.json || package-lock.json -nt node_modules/.package-lock.json ]]; then
  echo "setup: installing npm dependencies"
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null
fi

npm run --silent build

if $bench; then
  vegeta_version=v12.13.0
  vegeta_bin="${MIRRORD_DEV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mirrord-dev}/vegeta-$vegeta_version"
  if [[ ! -x "$vegeta_bin/vegeta" ]]; then
    if ! command -v go >/dev/null; then
      echo "setup: the benchmarks' load generator (vegeta) is built from its Go module: install Go 1.22 or newer" >&2
      exit 1
    fi
    echo "setup: building vegeta $vegeta_version (once, about a minute)" >&2
    GOBIN="$vegeta_bin" CGO_ENABLED=0 go install -trimpath "github.com/tsenart/vegeta/v12@$vegeta_version"
  fi
fi

if $cluster; then
  if ! command -v go >/dev/null; then
    echo "setup: the test cluster is built from Kubernetes' Go modules: install Go 1.24 or newer" >&2
    exit 1
  fi
  bin=$(bash test/cluster/build.sh)
  bash test/cluster/images.sh --coredns-bin "$bin/coredns" >/dev/null
  bash test/editor/install.sh >/dev/null
fi

#!/usr/bin/env bash
# Builds the container images the local test cluster runs, as OCI archives, without any
# registry (none can be pulled from here): a pause image of our own (pause.c) for containerd's
# sandbox_image; node:20 from a debootstrapped Debian bookworm plus this machine's Node 20, also
# tagged as the official node images docker/agent.Dockerfile starts FROM; redis on top of it;
# CoreDNS from the binary build.sh makes; and the mirrord agent from docker/agent.Dockerfile.
# The archives and buildah's storage are cached; each archive is rebuilt only when its inputs
# change. With --address, the archives are imported into that containerd (namespace k8s.io).
# Prints "<image> <archive> <archive's size in MB>" per image on stdout, progress on stderr.
#
#   bash test/cluster/images.sh [--address /run/containerd/containerd.sock] [--coredns-bin PATH]
set -euo pipefail

address=""
coredns_bin=""
while (($#)); do
  case $1 in
    --address) address=$2 ;;
    --coredns-bin) coredns_bin=$2 ;;
    *)
      echo "usage: $0 [--address SOCKET] [--coredns-bin PATH]" >&2
      exit 2
      ;;
  esac
  shift 2
done
if ((EUID != 0)); then
  echo "cluster images: needs root (debootstrap, chroot and buildah's storage)" >&2
  exit 1
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache="${MIRRORD_DEV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mirrord-dev}/images"
work="$cache/work"
log="$cache/build.log"
mkdir -p "$cache"
# Runs share one buildah storage and the archives: one at a time.
exec 9>"$cache/lock"
flock 9

# Tools write to the log; stdout (fd 3) carries the result lines, stderr (fd 4) the progress.
exec 3>&1 4>&2 >"$log" 2>&1
start=$SECONDS
doing="starting"
step() {
  doing=$*
  echo "cluster images: $* ($((SECONDS - start)) s so far)" >&4
}
on_exit() {
  local status=$?
  if ((status != 0)); then
    step "FAILED while $doing (exit $status); the end of $log:"
    tail -n 40 "$log" >&4
  fi
}
trap on_exit EXIT

packages=(buildah debootstrap gcc libc6-dev)
[[ -z $address ]] || packages+=(containerd) # ctr
missing=()
for package in "${packages[@]}"; do
  [[ $(dpkg-query -W -f '${db:Status-Abbrev}' "$package" 2>/dev/null) == ii* ]] ||
    missing+=("$package")
done
if ((${#missing[@]})); then
  step "installing ${missing[*]}"
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
if [[ $(node --version) != v20.* ]]; then
  step "the base image takes this machine's Node 20 (the nodejs package), found $(node --version)"
  exit 1
fi

storage=(--root "$cache/buildah/storage" --runroot "$cache/buildah/run" --storage-driver vfs)
bh() { buildah "${storage[@]}" "$@"; }
# Working containers left by an interrupted run are full copies of their image (vfs).
bh rm --all

clean_work() {
  # An interrupted debootstrap leaves /proc and /sys mounted in its target.
  findmnt -rn -o TARGET | awk -v work="$work/" 'index($0, work) == 1' | sort -r | xargs -r umount
  rm -rf "$work"
}

# build NAME IMAGE BUILDER INPUTS: unless CACHE/NAME.tar was made from the same INPUTS (a text
# naming everything the image is made from) and IMAGE is in the storage, runs BUILDER IMAGE
# and writes the archive, its manifest's digest (NAME.digest) and its stamp.
build() {
  local name=$1 image=$2 builder=$3 stamp
  stamp=$(sha256sum <<<"$4" | cut -d' ' -f1)
  if [[ -f $cache/$name.tar && -f $cache/$name.digest ]] &&
    [[ $(cat "$cache/$name.stamp" 2>/dev/null) == "$stamp" ]] &&
    bh inspect --type image "$image" >/dev/null; then
    step "$image is up to date"
    return
  fi
  rm -f "$cache/$name".{stamp,tar,digest}
  clean_work
  mkdir -p "$work"
  "$builder" "$image"
  step "writing $name.tar"
  bh push --digestfile "$cache/$name.digest" "$image" "oci-archive:$cache/$name.tar:$image"
  clean_work
  echo "$stamp" >"$cache/$name.stamp"
}

build_pause() {
  step "building $1"
  gcc -static -Os -s -o "$work/pause" "$here/pause.c"
  local container
  container=$(bh from scratch)
  bh copy "$container" "$work/pause" /pause
  bh config --entrypoint '["/pause"]' "$container"
  bh commit --rm "$container" "$1"
}
build "pause" "mirrord.test/pause:1" build_pause "$(
  declare -f build_pause
  cat "$here/pause.c"
)"

# This machine's Debian mirror ($(REPO_URI) is apt's syntax), or Debian's default.
# shellcheck disable=SC2016
mirror=$(apt-get indextargets --format '$(REPO_URI)' 'Label: Debian' 'Target-Of: deb' | head -n1)
: "${mirror:=http://deb.debian.org/debian/}"
build_base() {
  local rootfs="$work/rootfs" container
  step "debootstrapping Debian bookworm from $mirror"
  # ca-certificates: the official node:20-bookworm has it, and npm in the image needs it below.
  debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$mirror"
  step "adding Node $(node --version) to the base"
  # Laid out as in the official node images: node, npm and corepack under /usr/local, with
  # Node's headers in /usr/local/include/node for node-gyp (npm_config_nodedir=/usr/local). The
  # directories, not `dpkg -L nodejs`: npm may have been updated in place since the package.
  cp /usr/bin/node "$rootfs/usr/local/bin/node"
  cp -a /usr/include/node "$rootfs/usr/local/include/node"
  mkdir -p "$rootfs/usr/local/lib/node_modules"
  cp -a /usr/lib/node_modules/{npm,corepack} "$rootfs/usr/local/lib/node_modules/"
  ln -s ../lib/node_modules/npm/bin/npm-cli.js "$rootfs/usr/local/bin/npm"
  ln -s ../lib/node_modules/npm/bin/npx-cli.js "$rootfs/usr/local/bin/npx"
  ln -s ../lib/node_modules/corepack/dist/corepack.js "$rootfs/usr/local/bin/corepack"
  # The image trusts what this machine trusts (e.g. a TLS-intercepting proxy's CA), and npm
  # uses the system store, as npm here does: Node's bundled CAs alone cannot reach the registry.
  cp -a /usr/local/share/ca-certificates/. "$rootfs/usr/local/share/ca-certificates/"
  chroot "$rootfs" update-ca-certificates
  mkdir -p "$rootfs/usr/local/etc"
  echo "cafile=/etc/ssl/certs/ca-certificates.crt" >"$rootfs/usr/local/etc/npmrc"
  chroot "$rootfs" /usr/local/bin/node -e 'if (!process.version.startsWith("v20.")) process.exit(1)'
  chroot "$rootfs" /usr/local/bin/npm --version
  chroot "$rootfs" apt-get clean
  # As Debian's official images (and so the node images) do: apt keeps no package cache, so an
  # image's `apt-get install` layer holds the packages and nothing else.
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
  # debootstrap copied this machine's hostname and resolv.conf; containers get their own.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/etc/{hostname,resolv.conf}
  tar --numeric-owner -C "$rootfs" -cf "$work/rootfs.tar" .
  rm -rf "$rootfs"
  container=$(bh from scratch)
  bh add "$container" "$work/rootfs.tar" /
  bh config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd node "$container"
  bh commit --rm "$container" "$1"
  # The names docker/agent.Dockerfile's FROM lines resolve to.
  bh tag "$1" docker.io/library/node:20-bookworm docker.io/library/node:20-bookworm-slim
}
build "node" "mirrord.test/node:20" build_base "$(
  declare -f build_base
  # The npm that is copied, not the first on PATH (under `npm test`, node_modules/.bin has one).
  echo "$mirror $(node --version) npm $(node -p 'require("/usr/lib/node_modules/npm/package.json").version')"
  find /usr/local/share/ca-certificates -type f -exec cat {} +
)"
base_id=$(bh images --noheading --no-trunc --format '{{.ID}}' mirrord.test/node:20)

build_redis() {
  step "building $1"
  local container
  container=$(bh from --pull=never mirrord.test/node:20)
  bh run --network host --isolation chroot "$container" -- sh -c 'apt-get update &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server &&
    rm -rf /var/lib/apt/lists/*'
  bh config --entrypoint '["redis-server"]' \
    --cmd '["--protected-mode", "no", "--bind", "0.0.0.0"]' "$container"
  bh commit --rm "$container" "$1"
}
build "redis" "mirrord.test/redis:7" build_redis "$(
  declare -f build_redis
  echo "$base_id"
)"

build_coredns() {
  step "building $1"
  local container
  container=$(bh from scratch)
  bh copy "$container" "$coredns_bin" /coredns
  bh config --entrypoint '["/coredns"]' "$container"
  bh commit --rm "$container" "$1"
}
if [[ -n $coredns_bin ]]; then
  build "coredns" "mirrord.test/coredns:v1.12.1" build_coredns \
    "$(
      declare -f build_coredns
      sha256sum <"$coredns_bin"
    )"
else
  step "skipping mirrord.test/coredns:v1.12.1 (no --coredns-bin)"
fi

version=$(node -p 'require(process.argv[1]).version' "$repo/package.json")
agent="ghcr.io/mirrord-dev/mirrord-agent:$version"
# The files the build context admits: .dockerignore is "*", then "!path" lines that admit
# and plain lines that exclude again.
context_files() {
  local admitted ignored path excluded=()
  mapfile -t admitted < <(sed -n 's#^!\(.*[^/]\)/*$#\1#p' .dockerignore)
  mapfile -t ignored < <(sed -n -e '/^[#!]/d' -e '/^\*$/d' -e 's#^\(.*[^/]\)/*$#\1#p' .dockerignore)
  for path in "${ignored[@]}"; do excluded+=(-path "$path" -o); done
  find "${admitted[@]}" \( "${excluded[@]}" -false \) -prune -o -type f -print0 |
    LC_ALL=C sort -z | xargs -0 sha256sum
}
build_agent() {
  step "building $1 from docker/agent.Dockerfile"
  # --pull=never: the node:20-bookworm* it starts FROM are the base built above. No --layers:
  # with vfs every cached step is a full copy of its filesystem, which made a rebuild slower
  # than building from scratch, and took gigabytes per rebuild.
  bh bud --isolation chroot --network host --pull=never -f docker/agent.Dockerfile -t "$1" .
}
cd "$repo"
build "agent" "$agent" build_agent "$(
  declare -f build_agent context_files
  echo "$base_id"
  cat docker/agent.Dockerfile
  context_files
)"

# The images that rebuilt ones replaced: vfs keeps each as a full copy.
bh rmi --prune

images=(pause:mirrord.test/pause:1 node:mirrord.test/node:20 redis:mirrord.test/redis:7)
[[ -z $coredns_bin ]] || images+=(coredns:mirrord.test/coredns:v1.12.1)
images+=("agent:$agent")
for entry in "${images[@]}"; do
  name=${entry%%:*}
  image=${entry#*:}
  if [[ -n $address ]]; then
    # Importing reads the whole archive again: not when containerd has this very image.
    listed=$(ctr -a "$address" -n k8s.io images ls "name==$image")
    if [[ $listed != *"$(<"$cache/$name.digest")"* ]]; then
      step "importing $image into $address"
      ctr -a "$address" -n k8s.io images import "$cache/$name.tar"
    fi
  fi
  mb=$(awk -v bytes="$(stat -c %s "$cache/$name.tar")" 'BEGIN { printf "%.1f", bytes / 1e6 }')
  echo "$image $cache/$name.tar $mb" >&3
done
step "done"

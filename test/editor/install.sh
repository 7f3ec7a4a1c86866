#!/usr/bin/env bash
# Installs code-server, the real VS Code the editor tests start and drive (through
# test/support/code-server.ts, which finds it at the same path), once, into the developer cache
# outside the repository, and prints its directory as the last line of stdout. Called by
# scripts/setup.sh --cluster, after the Debian packages it needs: chromium (the browser the
# tests drive it with), ripgrep and libkrb5-dev (below).
#
# code-server 4.100.3 is VS Code 1.100.3, which runs on Node 20 (later ones need Node 22). It
# is not a dependency of the repository: its install scripts, which the repository's install
# does not run, build VS Code's native modules (node-pty, spdlog, kerberos, ...) for this Node.
set -euo pipefail

version=4.100.3
dir="${MIRRORD_DEV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mirrord-dev}/code-server-$version"
# Written last: a directory without it is a killed install, redone from scratch.
marker="$dir/.installed"

if [[ ! -f "$marker" ]]; then
  if ! command -v rg >/dev/null; then
    echo "setup: code-server's install takes ripgrep from Debian's: apt-get install ripgrep" >&2
    exit 1
  fi
  echo "setup: installing code-server $version (once, a few minutes)" >&2
  rm -rf "$dir"
  mkdir -p "$dir"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT

  # VS Code's @vscode/ripgrep downloads its binary from GitHub at install, which this machine
  # cannot reach; it takes a tarball already in its cache, so Debian's rg goes there, under the
  # name it would download: @vscode/ripgrep 1.15.11 (what code-server 4.100.3's
  # lib/vscode/npm-shrinkwrap.json pins) asks for ripgrep v13.0.0-10 (its lib/postinstall.js),
  # a tarball holding `rg` at its top.
  case "$(uname -m)" in
    x86_64) target=x86_64-unknown-linux-musl ;;
    aarch64) target=aarch64-unknown-linux-musl ;;
    *)
      echo "setup: code-server's ripgrep: no known download name for $(uname -m)" >&2
      exit 1
      ;;
  esac
  mkdir "$work/vscode-ripgrep-cache-1.15.11"
  tar -czf "$work/vscode-ripgrep-cache-1.15.11/ripgrep-v13.0.0-10-$target.tar.gz" \
    -C "$(dirname "$(command -v rg)")" rg

  # It is installed as the one dependency of a package.json of its own in $dir, from there: with
  # --global or --prefix, npm hands that setting on to the `npm install` that code-server's
  # postinstall runs in lib/vscode, which then installs VS Code's dependencies in the wrong place.
  # npm_config_unsafe_perm: that postinstall refuses to run as root without it.
  # npm_config_yes: node-pty's install script runs npx, which would ask (or, as ~/.npmrc may
  # say, refuse).
  # TMPDIR: where @vscode/ripgrep looks for its cache, and the build's scratch space.
  # The log goes to a file: it is long, and shown only when the install fails.
  echo '{ "private": true }' >"$dir/package.json"
  if ! (cd "$dir" && TMPDIR="$work" npm_config_unsafe_perm=true npm_config_yes=true \
    npm install --no-audit --no-fund --loglevel=error "code-server@$version") \
    >"$work/install.log" 2>&1; then
    tail -n 40 "$work/install.log" >&2
    echo "setup: installing code-server $version failed (the log's end is above)" >&2
    exit 1
  fi
  # What the install scripts make and a broken install would lack: the native modules, the
  # ripgrep binary and the bundled JavaScript debugger the tests debug with.
  vscode="$dir/node_modules/code-server/lib/vscode"
  for file in node_modules/node-pty/build/Release/pty.node \
    node_modules/@vscode/spdlog/build/Release/spdlog.node node_modules/@vscode/ripgrep/bin/rg \
    extensions/ms-vscode.js-debug/package.json; do
    if [[ ! -e "$vscode/$file" ]]; then
      echo "setup: code-server $version installed without lib/vscode/$file" >&2
      exit 1
    fi
  done
  touch "$marker"
fi
echo "$dir"

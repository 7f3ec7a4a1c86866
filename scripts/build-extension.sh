#!/usr/bin/env bash
# Builds the VS Code extension (extension/): compiles it with the project's tsc, records the CLI
# of this repository for it to run (extension/src/cli.ts), and packages it as
# extension/mirrord.vsix with @vscode/vsce. Packaging only when something in it changed.
set -euo pipefail
cd "$(dirname "$0")/../extension"
../node_modules/.bin/tsc -p tsconfig.json --incremental
repository="{ \"cli\": \"$(cd .. && pwd)/bin/run.js\" }"
[[ "$(cat out/repository.json 2>/dev/null)" == "$repository" ]] || echo "$repository" >out/repository.json
vsix=mirrord.vsix
if [[ -f $vsix && -z "$(find out package.json README.md -newer "$vsix" -print -quit)" ]]; then
  exit 0
fi
# No dependencies to bundle (the extension needs only Node and the vscode API); no repository
# or licence file to ask about.
npm_config_yes=true ../node_modules/.bin/vsce package --no-dependencies \
  --allow-missing-repository --skip-license --out "$vsix" >/dev/null

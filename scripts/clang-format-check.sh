#!/usr/bin/env bash
# Fails when a C/C++ file of ours is not clang-formatted (.clang-format at the root).
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(git ls-files --cached --others --exclude-standard '*.c' '*.cc' '*.h')
((${#files[@]} == 0)) || clang-format --dry-run --Werror "${files[@]}"

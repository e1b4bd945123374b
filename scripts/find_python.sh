#!/usr/bin/env bash
# Print the interpreter for one of the project's two environments (nothing, exit 1, if none):
#   primary: Python >= 3.12 (3.12 preferred, then 3.13): megatron-core 0.19.x, torch 2.14.1
#   second:  Python 3.11 or 3.10: megatron-core 0.16.1, torch 2.13.0 (CPU wheel)
# Candidates: python3.X on PATH, then $(pyenv root)/versions/3.X.*/bin/python3.X. Each is run
# once (a pyenv shim for a version that is not selected exits non-zero and is skipped).
# Usage: scripts/find_python.sh primary|second
set -euo pipefail
case "${1:-}" in
  primary) minors=(12 13) ;;
  second) minors=(11 10) ;;
  *) echo "usage: $0 primary|second" >&2; exit 2 ;;
esac
pyenv_root="$(pyenv root 2>/dev/null || true)"
for minor in "${minors[@]}"; do
  candidates=("python3.$minor")
  if [ -n "$pyenv_root" ]; then
    for dir in "$pyenv_root"/versions/3."$minor".*/bin; do
      candidates+=("$dir/python3.$minor")
    done
  fi
  for candidate in "${candidates[@]}"; do
    if path="$(command -v "$candidate" 2>/dev/null)" \
      && found="$("$path" -c 'import sys, venv; print(sys.executable) if sys.version_info[:2] == (3, '"$minor"') else exit(1)' 2>/dev/null)"; then
      echo "$found"
      exit 0
    fi
  done
done
exit 1

#!/usr/bin/env bash
# Create one of the project's virtual environments (idempotent): torch pinned first, then this
# package with the extras named in $EXTRAS, which resolves megatron-core by Python version
# (pyproject.toml's environment markers).
#
#   Python >= 3.12 (primary): torch==2.14.1, megatron-core>=0.19.2,<0.20
#   Python 3.10/3.11 (second, and the fallback where no 3.12+ exists): torch==2.13.0 (the CPU
#       wheel), megatron-core~=0.16.1
#
# The interpreter: --python PYTHON (or $TST_PYTHON), else scripts/find_python.sh primary, else
# scripts/find_python.sh second, else python3 (>= 3.10). A venv built by another Python version
# is rebuilt; one with other extras or an older pyproject.toml is updated in place.
# Usage: scripts/setup_env.sh [VENV_DIR] [--python PYTHON]
#        (env: EXTRAS=test,plot  TST_PYTHON=python3.11  TORCH_INDEX_URL=...)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv=.venv
python="${TST_PYTHON:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --python) python="$2"; shift 2 ;;
    --python=*) python="${1#--python=}"; shift ;;
    -*) echo "setup_env.sh: unknown option $1 (allowed: --python PYTHON)" >&2; exit 2 ;;
    *) venv="$1"; shift ;;
  esac
done
if [ -z "$python" ]; then
  python="$("$root/scripts/find_python.sh" primary || "$root/scripts/find_python.sh" second \
    || command -v python3)"
fi
if ! version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)"; then
  echo "setup_env.sh: cannot run the interpreter '$python'" >&2
  exit 2
fi
case "$version" in
  3.1[2-9]) torch=2.14.1 ;;
  3.1[01]) torch=2.13.0 ;;
  *) echo "setup_env.sh: $python is Python $version; tst-megatron needs 3.10 to 3.13 (3.12 for" \
       "megatron-core 0.19)" >&2; exit 2 ;;
esac
extras="${EXTRAS:-test,plot,data,hf}"
stamp="$venv/.tst-installed-py$version-torch$torch-$extras"
if [ -f "$stamp" ] && [ "$stamp" -nt "$root/pyproject.toml" ]; then
  exit 0
fi
echo "setup_env.sh: $venv: Python $version ($python), torch==$torch, .[$extras]" >&2
if [ -x "$venv/bin/python" ] \
  && [ "$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$version" ]; then
  rm -f "$venv"/.tst-installed-*
else
  "$python" -m venv --clear "$venv"
fi
pip=("$venv/bin/python" -m pip install -q)
"${pip[@]}" --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${pip[@]}" "torch==$torch" --index-url "$TORCH_INDEX_URL"
else
  "${pip[@]}" "torch==$torch"
fi
# torch stays at the pinned build: the constraint keeps pip from replacing it while resolving.
constraint="$(mktemp)"
trap 'rm -f "$constraint"' EXIT
echo "torch==$torch" >"$constraint"
"${pip[@]}" -c "$constraint" -e "$root[$extras]"
touch "$stamp"

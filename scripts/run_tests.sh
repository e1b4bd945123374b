#!/usr/bin/env bash
# The README's test command (`make test`, which `.ci/run` calls), in two environments:
#
# 1. The whole pytest suite in the project's venv (VENV_DIR, default .venv: Python >= 3.12 and
#    megatron-core 0.19 where the machine has such a Python, see scripts/setup_env.sh).
# 2. Where that venv runs Megatron-Core 0.17+ and a Python 3.10/3.11 exists
#    (scripts/find_python.sh second): the tests that pin down Megatron-Core behaviour
#    (SECOND_ENV_TESTS: parallel equivalence, checkpoint save/resume/formats, cross-version
#    checkpoints, conversion, the Megatron-Core fixes and differences, FSDP; TST_SECOND_ENV_TESTS
#    overrides) in a second venv with megatron-core 0.16.1
#    ($TST_SECOND_VENV, default .venv-mcore016; set up here by scripts/setup_env.sh).
#    TST_SECOND_ENV=0 skips it, =1 runs it also when PYTEST_ARGS are given (by default a run
#    with PYTEST_ARGS is the first environment's alone).
#
# The run fails when either fails; both pytest closing lines are repeated at the end.
# Where this machine allows it (root with apt-get), Debian's Slurm and MUNGE are installed
# first (scripts/setup_slurm.sh, idempotent) and tests/test_slurm.py must then run
# (TST_REQUIRE_SLURM=1: a failed local-Slurm bring-up fails instead of skipping). Elsewhere, or
# with TST_SKIP_SLURM_SETUP=1, the Slurm tests skip and say why.
# Most tests launch short pretrain_tst.py jobs whose start-up (imports) runs on one core, so
# the suite runs in TST_TEST_WORKERS pytest-xdist workers (default 2: the CI machine's cores),
# a whole test file per worker (--dist loadfile: a module's launches and fixtures stay
# together). TST_TEST_WORKERS=0 runs in one process.
# Usage: scripts/run_tests.sh [VENV_DIR] [PYTEST_ARGS...]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-.venv}"
shift || true
SECOND_ENV_TESTS=(
  tests/test_tst_parallel.py tests/test_pretrain.py tests/test_checkpoint_formats.py
  tests/test_convert.py tests/test_cross_version.py tests/test_mcore_fixes.py
  tests/test_mcore_compat.py tests/test_cpu_harness.py tests/test_fsdp.py
)
if [ -n "${TST_SECOND_ENV_TESTS:-}" ]; then  # a space-separated override (set-up checks)
  read -r -a SECOND_ENV_TESTS <<<"$TST_SECOND_ENV_TESTS"
fi
if [ -z "${TST_SKIP_SLURM_SETUP:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  if scripts/setup_slurm.sh; then
    export TST_REQUIRE_SLURM=1
  else
    echo "run_tests.sh: scripts/setup_slurm.sh failed: the Slurm tests will skip" >&2
  fi
fi
workers="${TST_TEST_WORKERS:-2}"
parallel=()
if [ "$workers" != 0 ]; then
  parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder)
fi
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT

describe() {  # "Python 3.12.1, megatron-core 0.19.2, torch 2.14.1" of a venv
  "$1/bin/python" -c "import sys, importlib.metadata as m; print('Python %s, megatron-core %s, \
torch %s' % (sys.version.split()[0], m.version('megatron-core'), m.version('torch')))"
}

last_line() {  # pytest's closing line ("N passed in ...")
  grep -v '^[[:space:]]*$' "$1" | tail -n 1
}

run_suite() {  # NAME VENV PYTEST_ARGS...: pytest's exit status; its output also in $logs/NAME
  local name="$1" env="$2"
  shift 2
  echo "run_tests.sh: $name environment: $(describe "$env")" >&2
  set +e
  "$env/bin/python" -m pytest -q "${parallel[@]}" "$@" 2>&1 | tee "$logs/$name"
  local status="${PIPESTATUS[0]}"
  set -e
  return "$status"
}

summary=()
status=0
first_args=("$@")
run_suite first "$venv" "${first_args[@]}" || status=$?
summary+=("first environment ($(describe "$venv")): $(last_line "$logs/first")")

second="${TST_SECOND_ENV:-}"
if [ -z "$second" ]; then
  second=$([ ${#first_args[@]} = 0 ] && echo 1 || echo 0)
fi
mcore_017_plus=$("$venv/bin/python" -c 'import sys; from tst_megatron.mcore_compat import MCORE_RELEASE as r; print(int(r >= (0, 17)))' 2>/dev/null || echo 0)
if [ "$second" = 1 ] && [ "$mcore_017_plus" = 1 ]; then
  if python_second="$("$root/scripts/find_python.sh" second)"; then
    second_venv="${TST_SECOND_VENV:-.venv-mcore016}"
    EXTRAS="${SECOND_ENV_EXTRAS:-test,data,hf}" "$root/scripts/setup_env.sh" "$second_venv" \
      --python "$python_second"
    second_status=0
    run_suite second "$second_venv" "${SECOND_ENV_TESTS[@]}" || second_status=$?
    summary+=("second environment ($(describe "$second_venv")): $(last_line "$logs/second")")
    [ "$second_status" = 0 ] || status="$second_status"
  else
    summary+=("second environment: no Python 3.10/3.11 found, megatron-core 0.16.1 not tested")
  fi
fi
for line in "${summary[@]}"; do
  echo "run_tests.sh: $line"
done
exit "$status"

#!/usr/bin/env bash
# The README's test command (`make test`, which `.ci/run` calls): the whole pytest suite in the
# project's venv. Where this machine allows it (root with apt-get), Debian's Slurm and MUNGE are
# installed first (scripts/setup_slurm.sh, idempotent) and tests/test_slurm.py must then run
# (TST_REQUIRE_SLURM=1: a failed local-Slurm bring-up fails instead of skipping). Elsewhere, or
# with TST_SKIP_SLURM_SETUP=1, the Slurm tests skip and say why.
# Most tests launch short pretrain_tst.py jobs whose start-up (imports) runs on one core, so
# the suite runs in TST_TEST_WORKERS pytest-xdist workers (default 2: the CI machine's cores),
# a whole test file per worker (--dist loadfile: a module's launches and fixtures stay
# together). TST_TEST_WORKERS=0 runs in one process.
# Usage: scripts/run_tests.sh [VENV_DIR] [PYTEST_ARGS...]
set -euo pipefail
venv="${1:-.venv}"
shift || true
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
exec "$venv/bin/python" -m pytest -q "${parallel[@]}" "$@"

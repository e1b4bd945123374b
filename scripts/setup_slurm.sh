#!/usr/bin/env bash
# Install Debian's Slurm (slurmctld, slurmd, the client commands) and MUNGE for the local-Slurm
# tests (tests/test_slurm.py). Idempotent: returns at once when they are installed. Starts no
# service: the tests run their own daemons, with their own configuration and state, in a
# temporary directory (tests/support/slurm_cluster.py).
# Needs root and apt-get; otherwise it says why and exits 0 (the tests then skip, saying why).
# Usage: sudo scripts/setup_slurm.sh   (`make test` calls it through scripts/run_tests.sh as root)
set -euo pipefail
packages=(slurmctld slurmd slurm-client munge)
binaries=(slurmctld slurmd sbatch munged)

have_all() {
  local binary
  for binary in "${binaries[@]}"; do
    command -v "$binary" >/dev/null 2>&1 || [ -x "/usr/sbin/$binary" ] || return 1
  done
}

if have_all; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_slurm.sh: not installing Slurm (needs root and apt-get): the Slurm tests will skip"
  exit 0
fi

echo "setup_slurm.sh: installing ${packages[*]}"
# Keep the packages' init scripts from starting system-wide daemons (policy-rc.d exit 101 =
# "action forbidden"); an existing policy (as in Docker images) is left alone.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  own_policy=1
fi
cleanup() { if [ "$own_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null; then
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null
fi
have_all || { echo "setup_slurm.sh: ${binaries[*]} still missing after the install" >&2; exit 1; }
echo "setup_slurm.sh: installed slurm-client $(dpkg-query -W -f '${Version}' slurm-client)"

#!/usr/bin/env bash
# Submit TST 3B as two dependent jobs: phase 1, then phase 2 once phase 1 has succeeded
# (afterok; a requeued phase 1 is still pending, so phase 2 keeps waiting for it).
# Run from anywhere; extra arguments go to both sbatch calls (e.g. --account=..., --partition=...).
#
#   examples/slurm/submit_two_phase.sh --account=myproj
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
mkdir -p logs
phase1=$(sbatch --parsable "$@" examples/slurm/tst_3b_phase1.sbatch)
phase1=${phase1%%;*}   # --parsable prints "jobid[;cluster]"
phase2=$(sbatch --parsable --dependency="afterok:$phase1" "$@" examples/slurm/tst_3b_phase2.sbatch)
echo "phase 1: job $phase1"
echo "phase 2: job ${phase2%%;*} (starts after $phase1 completes successfully)"
echo "logs: logs/tst-3b-phase1-$phase1.out, logs/tst-3b-phase2-${phase2%%;*}.out"

#!/usr/bin/env bash
# Submit TST as two dependent jobs: phase 1, then phase 2 once phase 1 has succeeded
# (afterok). A phase 1 that requeues itself before its time limit is pending again, not done,
# so phase 2 keeps waiting for it. Run from anywhere; extra arguments go to both sbatch calls
# (e.g. --account=..., --partition=...).
#
#   examples/slurm/submit_two_phase.sh --account=myproj
#
# The jobs (default: TST 3B) are sbatch scripts with their own arguments, split on spaces:
#   PHASE1="examples/slurm/cpu_smoke.sbatch 1" PHASE2="examples/slurm/cpu_smoke.sbatch 2" \
#       examples/slurm/submit_two_phase.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
read -r -a phase1_job <<<"${PHASE1:-examples/slurm/tst_3b_phase1.sbatch}"
read -r -a phase2_job <<<"${PHASE2:-examples/slurm/tst_3b_phase2.sbatch}"
mkdir -p logs
phase1=$(sbatch --parsable "$@" "${phase1_job[@]}")
phase1=${phase1%%;*}   # --parsable prints "jobid[;cluster]"
phase2=$(sbatch --parsable --dependency="afterok:$phase1" "$@" "${phase2_job[@]}")
phase2=${phase2%%;*}
echo "phase 1: job $phase1"
echo "phase 2: job $phase2 (starts after $phase1 completes successfully)"
for job in "$phase1" "$phase2"; do
    echo "log of job $job: $(scontrol show job "$job" | sed -n 's/^ *StdOut=//p')"
done

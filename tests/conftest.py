"""Shared pytest setup.

The repository root goes on ``sys.path`` so that ``tst_megatron`` imports without an
installation, both here and in the CPU ranks that ``tests.support.multirank`` starts
(they take the parent's ``sys.path``).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The suite runs in two pytest-xdist workers, a test file each (scripts/run_tests.sh). Files
# are handed out in collection order, so the ones that launch the most training jobs go first
# (longest first keeps one worker from finishing a long file alone at the end). Seconds of the
# serial run on the idle 2-core VM (2026-12-02, `--durations`); the others follow in name order.
LAUNCH_HEAVY_FILES = {
    "test_pretrain.py": 173,
    "test_reliability.py": 158,
    "test_checkpoint_faults.py": 149,
    "test_signal_routes.py": 132,
    "test_slurm.py": 111,
    "test_precision_runs.py": 100,
    "test_checkpoint_formats.py": 79,
    "test_convert.py": 51,
    "test_overlap_param_gather.py": 62,
    "test_rng_state.py": 47,
    "test_moe_pretrain.py": 44,
    "test_data_prefetch.py": 28,
}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -LAUNCH_HEAVY_FILES.get(Path(str(item.fspath)).name, 0))

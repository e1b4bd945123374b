"""Regenerate one checkpoint fixture of tests/golden/cross_version/ (tests/test_cross_version.py).

Run it with the Python of the environment whose Megatron-Core should write the fixture, e.g.

    PYTHONPATH=$PWD .venv-mcore016/bin/python scripts/make_cross_version_golden.py
    PYTHONPATH=$PWD .venv/bin/python scripts/make_cross_version_golden.py

It trains tests/golden/cross_version/run.yaml on 2 CPU ranks for 8 iterations, saving at
iteration 3, and writes ``tests/golden/cross_version/mcore-<version>/``: the checkpoint
(``iter_0000003/`` and ``latest_checkpointed_iteration.txt``) and ``losses.json``, the losses
the uninterrupted run logged after it (iterations 4-8, full precision).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from megatron.core import package_info

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "cross_version"
SAVED_AT = 3


def main() -> int:
    version = package_info.__version__
    target = GOLDEN / f"mcore-{version}"
    with tempfile.TemporaryDirectory() as tmp:
        save, metrics = Path(tmp) / "save", Path(tmp) / "metrics.jsonl"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
            "--master-port", "29517", str(ROOT / "pretrain_tst.py"),
            "--yaml-config", str(GOLDEN / "run.yaml"), "--save", str(save),
            "--save-interval", str(SAVED_AT), "--metrics-jsonl", str(metrics),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        losses = {
            str(r["iteration"]): r["lm_loss"]
            for r in records
            if "lm_loss" in r and r["iteration"] > SAVED_AT
        }
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        checkpoint = f"iter_{SAVED_AT:07d}"
        shutil.copytree(save / checkpoint, target / checkpoint)
        (target / "latest_checkpointed_iteration.txt").write_text(str(SAVED_AT))
        (target / "losses.json").write_text(json.dumps(losses, indent=2) + "\n")
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"wrote {target.relative_to(ROOT)} ({size / 1024:.0f} KiB), losses {losses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

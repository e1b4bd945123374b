"""Checkpoints across Megatron-Core releases: 0.16.1's resume under 0.19, 0.19's are refused
by 0.16.1 up front.

tests/golden/cross_version/mcore-<version>/ holds the iteration-3 checkpoint of a tiny 2-rank
TST run (run.yaml: data parallel, distributed optimizer, mock data) written under that
Megatron-Core, and the losses the uninterrupted run logged at iterations 4-8
(scripts/make_cross_version_golden.py regenerates them). Each fixture is resumed by a real
``torchrun`` launch under the installed Megatron-Core: where it can be read, the losses must
be the recorded ones; where not, the job must stop before training with one line naming
both versions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.multirank import free_port
from tst_megatron.mcore_compat import MCORE_RELEASE, MCORE_VERSION, release_of

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "cross_version"
FIXTURES = sorted(p.name for p in GOLDEN.glob("mcore-*"))
# Both fixtures' runs logged the same losses bit for bit (torch 2.13/2.14 on CPU); allow for
# another CPU's summation order.
LOSS_ATOL = 1e-5


def _resume(load: Path, tmp: Path) -> tuple[int, str, dict[int, float]]:
    metrics = tmp / "metrics.jsonl"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
        "--master-port", str(free_port()), str(ROOT / "pretrain_tst.py"),
        "--yaml-config", str(GOLDEN / "run.yaml"), "--load", str(load),
        "--metrics-jsonl", str(metrics),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if (
        metrics.exists()
    ) else []  # fmt: skip
    losses = {r["iteration"]: r["lm_loss"] for r in records if "lm_loss" in r}
    return proc.returncode, proc.stdout + proc.stderr, losses


def test_fixtures_exist_and_are_small():
    assert FIXTURES == ["mcore-0.16.1", "mcore-0.19.2"]
    for name in FIXTURES:
        size = sum(f.stat().st_size for f in (GOLDEN / name).rglob("*") if f.is_file())
        assert size < 1024**2, (name, size)


def test_both_releases_trained_the_same_losses():
    old, new = (json.loads((GOLDEN / name / "losses.json").read_text()) for name in FIXTURES)
    assert sorted(old, key=int) == ["4", "5", "6", "7", "8"] and old.keys() == new.keys()
    for iteration, loss in old.items():
        assert new[iteration] == pytest.approx(loss, abs=LOSS_ATOL), iteration


@pytest.mark.slow
@pytest.mark.parametrize("fixture", FIXTURES)
def test_checkpoint_of_another_release(tmp_path, fixture):
    source = GOLDEN / fixture
    saved_version = fixture.removeprefix("mcore-")
    checkpoint = source / "iter_0000003"
    meta = json.loads((checkpoint / "tst_checkpoint.json").read_text())
    assert meta["megatron_core"] == saved_version
    assert ("common.pt" in meta["files"]) == (release_of(saved_version) < (0, 19))
    load = tmp_path / "load"
    shutil.copytree(source, load)  # the job must not touch the committed fixture
    code, log, losses = _resume(load, tmp_path)
    if release_of(saved_version) >= (0, 19) and MCORE_RELEASE < (0, 19):
        expected = (
            f"checkpoint {load / 'iter_0000003'} was written by megatron-core {saved_version}, "
            f"which this megatron-core {MCORE_VERSION} cannot read"
        )
        assert code != 0
        assert expected in log, log[-3000:]
        assert not losses and " iteration " not in log  # refused before any training,
        assert "memory footprint" not in log  # before the model was built
        lines = [line for line in log.splitlines() if expected in line]
        assert len({line.strip() for line in lines}) == 1
        return
    assert code == 0, log[-4000:]
    recorded = json.loads((source / "losses.json").read_text())
    assert sorted(losses) == sorted(int(i) for i in recorded)
    for iteration, loss in losses.items():
        assert loss == pytest.approx(recorded[str(iteration)], abs=LOSS_ATOL), iteration

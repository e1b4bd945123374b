"""Issue 22 end to end: shuffled samples keep training steady on long documents of two kinds,
and the data budget (with the TST repeat warning) is logged before step 1.

Real single-rank ``pretrain_tst.py`` launches (the environment torchrun would give them).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from tests.support.multirank import free_port

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
TINY = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32", "--transformer-impl", "local",
    "--distributed-backend", "gloo", "--seed", "5", "--hidden-dropout", "0",
    "--attention-dropout", "0", "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "10",
    "--log-interval", "1", "--eval-iters", "0", "--split", "100,0,0",
]  # fmt: skip


def launch(tmp: Path, name: str, args: list[str]) -> tuple[list[dict], str]:
    """One single-rank pretrain_tst.py run: (JSONL records, stdout + stderr)."""
    metrics = tmp / f"{name}.jsonl"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip
    cmd = [sys.executable, str(ROOT / "pretrain_tst.py"), *TINY, "--metrics-jsonl", str(metrics),
           "--data-cache-path", str(tmp / "cache"), *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    return [json.loads(line) for line in metrics.read_text().splitlines()], log


def two_kind_corpus(prefix: Path) -> str:
    """60 documents of 6,000 uniform random ids below 500 and 60 of 6,000 copies of one id,
    alternating (the issue's corpus)."""
    rng = np.random.RandomState(0)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for i in range(120):
        doc = rng.randint(0, 500, 6000) if i % 2 == 0 else np.full(6000, 7)
        builder.add_document(torch.from_numpy(doc), [6000])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.mark.slow
def test_loss_is_steady_on_long_documents_of_two_kinds(tmp_path):
    """Global batch 64 x 32 tokens, 160 steps: with Megatron's shuffled samples every batch
    mixes both kinds. The document-shuffled contiguous stream this replaced gave a standard
    deviation of 2.8 over steps 81-160 (batches of one kind; issue 22)."""
    data = two_kind_corpus(tmp_path / "two_kind")
    records, _ = launch(tmp_path, "two_kind", [
        "--micro-batch-size", "16", "--global-batch-size", "64", "--train-iters", "160",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "512", "--data-path", data,
    ])  # fmt: skip
    losses = {r["iteration"]: r["lm_loss"] for r in records if "lm_loss" in r}
    late = np.array([losses[i] for i in range(81, 161)])
    assert late.std() < 1.0, late
    assert late.mean() < losses[1] - 1.0  # it trains


@pytest.fixture(scope="module")
def sample_corpus(tmp_path_factory) -> str:
    """The shipped sample corpus (train split) as a .bin/.idx dataset."""
    tmp = tmp_path_factory.mktemp("sample")
    with gzip.open(SAMPLE / "train.jsonl.gz", "rt") as src:
        (tmp / "train.jsonl").write_text(src.read())
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input",
         str(tmp / "train.jsonl"), "--output-prefix", str(tmp / "sample"), "--tokenizer-type",
         "HuggingFaceTokenizer", "--tokenizer-model", str(SAMPLE), "--append-eod"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(tmp / "sample_text_document")


def budget_run(tmp: Path, name: str, corpus: str, train_iters: int) -> str:
    """A TST run (s = 4, r = 0.5) planned for ``train_iters`` steps, stopped after one."""
    _, log = launch(tmp, name, [
        "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", str(train_iters),
        "--tst-bag-size", "4", "--tst-phase1-fraction", "0.5", "--exit-interval", "1",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(SAMPLE),
        "--data-path", corpus,
    ])  # fmt: skip
    return log


WARNING = "TST's gain is an equal-FLOPs gain that assumes fresh data"


@pytest.mark.slow
def test_a_tst_run_that_repeats_the_sample_corpus_is_warned_before_step_1(tmp_path, sample_corpus):
    log = budget_run(tmp_path, "repeats", sample_corpus, 4000)  # phase 1 alone: 2.1M tokens
    [line] = re.findall(rf"\] (data budget: dataset {re.escape(sample_corpus)}: .*)", log)
    held = int(re.search(r": ([\d,]+) training tokens", line).group(1).replace(",", ""))
    read1 = 2000 * 8 * (4 * 33 - 1) + 1
    assert f"phase 1 reads {read1:,} (" in line and held < read1
    assert float(line.rsplit("; ", 1)[1].split()[0]) > 1  # "N.NN epochs in all"
    [warning] = [x for x in log.splitlines() if WARNING in x]
    assert "--tst-mode output-only (reads no extra data)" in warning
    assert "smaller --tst-phase1-fraction (r) or --tst-bag-size (s)" in warning
    first_step = re.search(r"iteration +1/", log).start()
    assert log.index(line) < first_step and log.index(warning) < first_step


@pytest.mark.slow
def test_a_tst_run_that_fits_gets_the_budget_line_only(tmp_path, sample_corpus):
    log = budget_run(tmp_path, "fits", sample_corpus, 40)
    [line] = re.findall(r"\] (data budget: .*)", log)
    assert f"phase 1 reads {20 * 8 * 131 + 1:,} (" in line
    assert f"phase 2 reads {20 * 8 * 32 + 1:,} (" in line
    assert float(line.rsplit("; ", 1)[1].split()[0]) < 1
    assert WARNING not in log
    assert log.index(line) < re.search(r"iteration +1/", log).start()

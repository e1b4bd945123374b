"""The data path off the critical path: vectorised window reads and the step prefetcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from tests.support.multirank import free_port
from tst_megatron.config import PhaseSpec
from tst_megatron.data.prefetch import StepPrefetcher, StepRequest
from tst_megatron.data.samples import TrainingSamples
from tst_megatron.data.tokenizer import TokenizerSpec, build_training_tokenizer
from tst_megatron.testing.datasets import reference_windows


def write_dataset(prefix, lengths, seed, dtype=np.uint16):
    rng = np.random.RandomState(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for length in lengths:
        builder.add_document(torch.from_numpy(rng.randint(0, 50_000, length)), [length])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefetch")
    rng = np.random.RandomState(0)
    a = write_dataset(tmp / "a", rng.randint(1, 40, 60), seed=1)
    b = write_dataset(tmp / "b", rng.randint(1, 9, 50), seed=2, dtype=np.int32)
    return tmp, a, b


def blend(two_datasets, weights=(0.7, 0.3)) -> TrainingSamples:
    """Training samples of the blend: s = 4, L = 8, 2 samples a step, 50 steps per phase."""
    from tst_megatron.data.builders import build_train_samples
    from tst_megatron.training.run_config import settings_from_flags

    tmp, a, b = two_datasets
    settings = settings_from_flags([
        "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
        "--seq-length", "8", "--max-position-embeddings", "8", "--micro-batch-size", "1",
        "--global-batch-size", "2", "--lr", "1e-3", "--train-iters", "100",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "50000", "--split", "90,10,0",
        "--tst-bag-size", "4", "--tst-phase1-fraction", "0.5", "--seed", "3",
        "--data-cache-path", str(tmp / "cache"),
        "--data-path", str(weights[0]), a, str(weights[1]), b,
    ])  # fmt: skip
    tokenizer = build_training_tokenizer(TokenizerSpec.from_settings(settings.data, 50000))
    return build_train_samples(
        settings.data, settings.schedule, settings.batch, settings.tst, settings.model, tokenizer
    )


def test_vectorised_windows_equal_megatrons_per_sample_reads(two_datasets):
    samples = blend(two_datasets)
    for phase, spec in ((1, PhaseSpec(4, "full")), (2, PhaseSpec(1, "full"))):
        for step in range(11):  # windows cross documents; dataset b is read over epochs
            rows = slice(step % 3, 7)
            first = samples.state.phase_samples[phase - 1]
            got = samples.next_windows(spec, 9, rows)
            expected = reference_windows(samples.phases[phase], first, 9)[rows]
            np.testing.assert_array_equal(got, expected)
    assert samples.state.phase_samples == [99, 99]


# --------------------------------------------------------------------------------------------
# StepPrefetcher
# --------------------------------------------------------------------------------------------

FULL, STANDARD = StepRequest(PhaseSpec(4, "full"), 2), StepRequest(PhaseSpec(1, "full"), 2)


def produce(stream, request):
    """One step: ``num_microbatches`` windows of the request's phase."""
    return [torch.from_numpy(stream.next_windows(request.spec, request.num_microbatches))]


def run_steps(prefetcher, requests, guesses):
    out, states = [], []
    for i, request in enumerate(requests):
        out.append(prefetcher.next_step(request, guesses[i + 1 : i + 1 + prefetcher.depth]))
        states.append(prefetcher.state.as_dict())
    return out, states


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetch_gives_the_synchronous_batches_and_the_consumed_position(two_datasets, depth):
    requests = [FULL] * 4 + [STANDARD] * 4  # a phase boundary after step 4
    wrong = [FULL] * 8  # guesses that miss the boundary: rewound, still exact
    sync, sync_states = run_steps(StepPrefetcher(blend(two_datasets), produce, 0), requests, [])
    for guesses in (requests, wrong):
        prefetcher = StepPrefetcher(blend(two_datasets), produce, depth)
        batches, states = run_steps(prefetcher, requests, guesses)
        for got, expected in zip(batches, sync, strict=True):
            assert torch.equal(got[0], expected[0])
        assert states == sync_states  # what a checkpoint saves: the trained steps only
        prefetcher.close()


def test_saved_position_resumes_exactly_while_steps_are_read_ahead(two_datasets):
    prefetcher = StepPrefetcher(blend(two_datasets), produce, 2)
    run_steps(prefetcher, [FULL] * 3, [FULL] * 6)
    saved = prefetcher.state.as_dict()
    while prefetcher._results.qsize() < len(prefetcher._pending):  # let the thread read ahead
        time.sleep(0.01)
    assert len(prefetcher._pending) == 2 and prefetcher._stream.state.as_dict() != saved
    rest = prefetcher.next_step(FULL)
    resumed = StepPrefetcher(blend(two_datasets), produce, 2)
    resumed.load_state(saved)
    assert torch.equal(resumed.next_step(FULL)[0], rest[0])


def test_the_queue_is_bounded_by_the_depth(two_datasets):
    in_flight, most = [0], [0]
    lock = threading.Lock()

    def counting(stream, request):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0] + len(prefetcher._results.queue))
        try:
            return produce(stream, request)
        finally:
            with lock:
                in_flight[0] -= 1

    prefetcher = StepPrefetcher(blend(two_datasets), counting, 2)
    run_steps(prefetcher, [FULL] * 6, [FULL] * 20)
    assert len(prefetcher._pending) <= 2 and most[0] <= 2


def test_an_error_on_the_thread_is_raised_by_the_step_that_needs_it(two_datasets):
    calls = []

    def failing(stream, request):
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            raise OSError("read error on /data/a.bin")
        return produce(stream, request)

    prefetcher = StepPrefetcher(blend(two_datasets), failing, 2)
    prefetcher.next_step(FULL, [FULL, FULL])
    with pytest.raises(OSError, match=r"read error on /data/a\.bin"):
        prefetcher.next_step(FULL, [FULL, FULL])
    assert set(calls) == {"tst-data-prefetch"}


def test_notes_reach_the_log_once_whatever_is_read_ahead(two_datasets):
    prefetcher = StepPrefetcher(blend(two_datasets), produce, 3)
    first = prefetcher.pop_notices()  # the data budget, before the first step
    notes_by_step = []
    for _ in range(20):
        prefetcher.next_step(FULL, [FULL] * 3)
        notes_by_step.append(prefetcher.pop_notices())
    prefetcher.close()
    assert [line.split(":")[0] for line in first] == ["data budget"] * 2 + ["warning"]
    assert notes_by_step == [[]] * 20


# --------------------------------------------------------------------------------------------
# Real launches: prefetch keeps an interrupted + resumed run bit-exact
# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
EOD = 511  # NullTokenizer --vocab-size 512
LAUNCH = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32", "--transformer-impl", "local",
    "--distributed-backend", "gloo", "--seed", "5", "--hidden-dropout", "0",
    "--attention-dropout", "0", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "2", "--train-iters", "8",
    "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "2",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "512", "--split", "90,10,0",
    "--tst-bag-size", "4", "--tst-phase1-fraction", "0.5",
    "--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss",
]  # fmt: skip


def launch(tmp: Path, name: str, extra: list[str]) -> list[dict]:
    """One single-rank pretrain_tst.py run (the environment torchrun would give it)."""
    metrics = tmp / f"{name}.jsonl"
    port = str(free_port())
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
    cmd = [sys.executable, str(ROOT / "pretrain_tst.py"), *LAUNCH, "--metrics-jsonl",
           str(metrics), "--data-path", str(tmp / "corpus"), *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def losses(records: list[dict]) -> dict:
    return {
        (r["iteration"], key): r[key]
        for r in records
        for key in ("lm_loss", "valid_lm_loss")
        if key in r
    }


@pytest.mark.slow
def test_prefetched_interrupted_and_resumed_run_equals_the_synchronous_one(tmp_path):
    """``--num-workers 2`` stopped at iteration 3 (steps 4-5 already read ahead), resumed with
    ``--num-workers 3`` across the phase boundary (iteration 4), equals ``--num-workers 0``
    bit for bit, document masks on, validation included."""
    rng = np.random.RandomState(0)
    documents = [[*rng.randint(0, EOD, rng.randint(5, 60)), EOD] for _ in range(120)]
    builder = IndexedDatasetBuilder(str(tmp_path / "corpus.bin"), dtype=np.int32)
    for doc in documents:
        builder.add_document(torch.tensor(doc, dtype=torch.int32), [len(doc)])
    builder.finalize(str(tmp_path / "corpus.idx"))

    sync = losses(launch(tmp_path, "sync", ["--num-workers", "0"]))
    save = ["--save", str(tmp_path / "ckpt")]
    cut = losses(launch(tmp_path, "cut", ["--num-workers", "2", *save, "--exit-interval", "3"]))
    resumed = losses(
        launch(tmp_path, "resumed", ["--num-workers", "3", "--load", str(tmp_path / "ckpt")])
    )
    assert sorted({it for it, _ in cut}) == [1, 2, 3]
    assert {**cut, **resumed} == sync
    assert (3, "valid_lm_loss") in sync and (6, "valid_lm_loss") in sync


def test_negative_num_workers_is_refused():
    from tst_megatron.training.arguments import ConfigError, parse_args, validate_args

    args = parse_args([*LAUNCH, "--mock-data", "--num-workers", "-1"])
    with pytest.raises(ConfigError, match=r"^--num-workers must be >= 0, got -1$"):
        validate_args(args, 1)
    with pytest.raises(ValueError, match="prefetch depth must be >= 0, got -1"):
        StepPrefetcher(None, produce, -1)

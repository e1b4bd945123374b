"""Data path throughput: what one rank delivers for TST phase 1 against what a GPU consumes.

Four measurements in one run, on a synthetic corpus written to ``--dir`` (two int32 datasets,
blend 0.7 / 0.3 as ``examples/configs/tst-10b-a1b.yaml``, documents of log-normal length,
mean about 1,000 tokens, each ending with the EOD):

1. ``read_step`` (the code the prefetch thread runs) for phase 1 at s = 16, L = 4096: one
   data-parallel rank's share of the 10B-A1B global batch (1024 windows over DP 64 = 16
   windows of 16 * 4097 tokens, micro-batch 4), data tokens/s, with and without
   ``--reset-attention-mask``; the windows alone (`TrainingSamples.next_windows`: one gather
   per step from the ``.bin`` memory maps through Megatron-Core's `GPTDataset` indices) and
   the same samples read one by one through `GPTDataset.__getitem__` (same rank, same rows);
2. the ratio to what one B200 consumes in phase 1 of that config, from the planner's FLOPs
   model (`tst_megatron.planning.report.plan`, 8 nodes, EP 8, micro-batch 4, its default
   MFU);
3. a CPU training run (in-process `Trainer`, one gloo rank, tiny model, s = 16): the fraction
   of step time the training thread waits for data with ``--num-workers 0`` and ``2``;
4. the whole-file token range check: scan speed of the ``.bin`` and the cached lookup;
5. building the shuffled indices (Megatron-Core's document, sample and shuffle indices and
   the blend index) for a synthetic dataset of ``--index-documents`` documents (only their
   lengths matter), time and peak memory, extrapolated linearly to a 1T-token blend.

Usage::

    python benchmarks/data_loader.py [--tokens 200000000] [--steps 20] [--cpu-steps 12]
        [--index-documents 20000000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VOCAB = 128_256  # Llama-3 ids (int32 storage), as tst-10b-a1b
EOD = VOCAB - 1
CPU_VOCAB = 512  # the CPU training run: a vocabulary small enough that data costs show
BAG, SEQ, GLOBAL_BATCH, DP, MICRO = 16, 4096, 1024, 64, 4


def write_corpus(directory: Path, tokens: int, vocab: int = VOCAB) -> list[str]:
    """Two datasets holding 70% / 30% of ``tokens``, ids below ``vocab``, the last one the
    EOD (reused when already there)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType

    prefixes = []
    for name, share, seed in (("dclm", 0.7, 0), ("fineweb", 0.3, 1)):
        prefix = directory / f"{name}_{tokens}_v{vocab}"
        prefixes.append(str(prefix))
        if os.path.exists(f"{prefix}.idx"):
            continue
        rng = np.random.RandomState(seed)
        count = int(tokens * share)
        lengths = []
        while sum(lengths) < count:
            lengths.extend(np.maximum(rng.lognormal(6.5, 0.8, 100_000).astype(np.int64), 2))
        lengths = np.asarray(lengths, dtype=np.int64)
        lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), count)) + 1]
        with open(f"{prefix}.bin", "wb") as out:
            for start in range(0, len(lengths), 50_000):
                part = lengths[start : start + 50_000]
                ids = rng.randint(0, vocab - 1, int(part.sum())).astype(np.int32)
                ids[np.cumsum(part) - 1] = vocab - 1
                out.write(ids.tobytes())
        _write_index(f"{prefix}.idx", lengths, DType.code_from_dtype(np.int32))
    return prefixes


def _write_index(path: str, lengths, dtype_code: int) -> None:
    import struct

    import numpy as np

    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * 4
    with open(path, "wb") as out:
        header = struct.pack("<QBQQ", 1, dtype_code, len(lengths), len(lengths) + 1)
        out.write(b"MMIDIDX\x00\x00" + header)
        out.write(lengths.astype(np.int32).tobytes())
        out.write(pointers.astype(np.int64).tobytes())
        out.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())


def samples(prefixes: list[str], directory: Path, steps: int):
    """The 10B-A1B phase-1 samples of the 0.7 / 0.3 blend (s = 16, L = 4096, global batch
    1024), planned for ``steps`` phase-1 steps (the data repeats: the indices span epochs)."""
    from tst_megatron.data.builders import build_train_samples
    from tst_megatron.data.tokenizer import TokenizerSpec, build_training_tokenizer
    from tst_megatron.training.run_config import settings_from_flags

    settings = settings_from_flags([
        "--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ),
        "--micro-batch-size", str(GLOBAL_BATCH), "--global-batch-size", str(GLOBAL_BATCH),
        "--lr", "1e-4", "--train-iters", str(steps + 1), "--tst-phase1-iters", str(steps),
        "--tst-bag-size", str(BAG), "--tokenizer-type", "NullTokenizer",
        "--vocab-size", str(VOCAB), "--split", "100,0,0", "--seed", "1234",
        "--data-cache-path", str(directory / "cache"),
        "--data-path", "0.7", prefixes[0], "0.3", prefixes[1],
    ])  # fmt: skip
    tokenizer = build_training_tokenizer(TokenizerSpec.from_settings(settings.data, VOCAB))
    return build_train_samples(
        settings.data, settings.schedule, settings.batch, settings.tst, settings.model, tokenizer
    )


def _median_rate(tokens: int, run, steps: int) -> float:
    run()  # warm-up (epoch layouts, page cache)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return tokens / statistics.median(times)


def loader_throughput(prefixes: list[str], directory: Path, steps: int) -> dict:
    """Data tokens/s one rank gets at s = 16, L = 4096: the windows alone (vectorised, and
    Megatron's per-sample ``GPTDataset.__getitem__``), and the whole `read_step` with and
    without document masks."""

    from tst_megatron.config import PhaseSpec
    from tst_megatron.data.batches import StepLayout, read_step
    from tst_megatron.data.documents import DocumentMasking
    from tst_megatron.data.prefetch import StepRequest
    from tst_megatron.testing.datasets import reference_windows

    spec = PhaseSpec(BAG, "full")
    request = StepRequest(spec, GLOBAL_BATCH // DP // MICRO)
    per_rank = GLOBAL_BATCH // DP
    tokens = per_rank * spec.data_tokens_per_sample(SEQ)
    rows = slice(0, per_rank)
    plan_steps = 4 * steps + 8

    results = {}
    data = samples(prefixes, directory, plan_steps)
    phase1 = data.phases[1]

    def per_sample():  # the same rows through GPTDataset.__getitem__, one sample at a time
        first = data.state.phase_samples[0]
        data.state.phase_samples[0] += GLOBAL_BATCH
        return reference_windows(phase1, first, per_rank)

    results["windows: GPTDataset.__getitem__ per sample"] = _median_rate(
        tokens, per_sample, max(3, steps // 4)
    )
    results["windows: vectorised next_windows"] = _median_rate(
        tokens, lambda: data.next_windows(spec, GLOBAL_BATCH, rows), steps
    )
    for name, masking in (
        ("read_step (windows + layout + EOD loss mask)", DocumentMasking(EOD)),
        ("read_step + document masks", DocumentMasking(EOD, True, True)),
    ):
        layout = StepLayout(SEQ, MICRO, 0, DP, EOD, True, masking)
        step = partial(read_step, samples(prefixes, directory, plan_steps), request, layout)
        results[name] = _median_rate(tokens, step, steps)
    return results


def index_build(documents: int) -> dict:
    """Time and peak memory of building one `GPTDataset`'s indices, and a blend index, for a
    synthetic dataset of ``documents`` documents of log-normal length (mean ~1,000 tokens),
    L = 4096 (phase 2; phase 1's s*(L+1) samples make a sample index s times smaller), by
    Megatron-Core's own functions (`_build_document_index`, ``helpers.build_sample_idx``,
    `_build_shuffle_index`, ``helpers.build_blending_indices``)."""
    import numpy as np
    from megatron.core.datasets import helpers
    from megatron.core.datasets.gpt_dataset import _build_document_index, _build_shuffle_index

    from tst_megatron.data.budget import blend_indices

    rng = np.random.RandomState(0)
    lengths = np.maximum(rng.lognormal(6.5, 0.8, documents), 2).astype(np.int32)
    tokens = int(lengths.sum(dtype=np.int64))
    base = _peak_rss()
    timings = {}
    start = time.perf_counter()
    state = np.random.RandomState(1234)
    document_index = _build_document_index(np.arange(documents), 1, state, False)
    timings["document_index_s"] = time.perf_counter() - start
    start = time.perf_counter()
    sample_index = helpers.build_sample_idx(lengths, document_index, SEQ, 1, tokens, True, True)
    timings["sample_index_s"] = time.perf_counter() - start
    start = time.perf_counter()
    count = sample_index.shape[0] - 1
    shuffle_index = _build_shuffle_index(count, count, state)
    timings["shuffle_index_s"] = time.perf_counter() - start
    start = time.perf_counter()
    blend = blend_indices([0.7, 0.3], count)
    timings["blend_index_s"] = time.perf_counter() - start
    arrays = (document_index, sample_index, shuffle_index, *blend)
    return {
        "documents": documents,
        "tokens": tokens,
        "samples": count,
        **timings,
        "total_s": sum(timings.values()),
        "index_bytes": sum(a.nbytes for a in arrays),
        "peak_rss_growth_bytes": _peak_rss() - base,
    }


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def b200_consumption() -> dict:
    """Phase-1 data tokens/s one B200 consumes in tst-10b-a1b (planner: FLOPs, MFU)."""
    import subprocess

    planner = [sys.executable, str(REPO / "tools" / "plan.py"), "--json",
               "--config", str(REPO / "examples/configs/tst-10b-a1b.yaml"), "--nodes", "8",
               "--gpus-per-node", "8", "--gpu", "b200", "--ep", "8",
               "--micro-batch-size", str(MICRO)]  # fmt: skip
    report = json.loads(subprocess.run(planner, capture_output=True, text=True).stdout)
    return {
        "step_s": report["step_time_s"],
        "mfu": report["mfu"],
        "data_tokens_per_s_per_gpu": report["data_tokens_per_s_phase1"]
        / report["layout"]["world_size"],
    }


def training_wait(prefixes: list[str], steps: int) -> dict:
    """Fraction of step time the training thread waits for data, CPU, tiny model, s = 16.

    The model (1 layer, hidden 32, vocabulary 512) is small enough for the data path to be a
    visible part of a CPU step; at GPU scale see measurement 1-2.
    """
    from tst_megatron.training.loop import Trainer, initialize_distributed
    from tst_megatron.training.run_config import settings_from_flags

    port = str(29_400 + os.getpid() % 500)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
    common = [
        "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "256", "--max-position-embeddings", "256",
        "--transformer-impl", "local", "--distributed-backend", "gloo",
        "--micro-batch-size", "4", "--global-batch-size", "16", "--lr", "1e-3",
        "--train-iters", "1000", "--eval-iters", "0", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", str(CPU_VOCAB), "--split", "100,0,0", "--tst-bag-size", str(BAG),
        "--tst-phase1-fraction", "0.9", "--reset-attention-mask", "--eod-mask-loss",
        "--data-path", "0.7", prefixes[0], "0.3", prefixes[1],
    ]  # fmt: skip
    results, initialized = {}, False
    for workers in (0, 2):
        run = settings_from_flags([*common, "--num-workers", str(workers)], 1)
        if not initialized:
            initialize_distributed(run.parallel, run.batch, run.reliability, run.schedule.seed)
            initialized = True
        trainer = Trainer(run)
        trainer.set_phase(1)
        spec = trainer.phase_spec(1)
        trainer.train_step(spec)  # warm-up
        waited = step_time = 0.0
        for _ in range(steps):
            start = time.perf_counter()
            trainer.train_step(spec)
            trainer.progress.iteration += 1
            step_time += time.perf_counter() - start
            waited += trainer.stream.last_wait_s
        trainer.stream.close()
        results[workers] = {"wait_fraction": waited / step_time, "step_ms": 1e3 * step_time / steps}
    return results


def token_range_check(prefixes: list[str]) -> dict:
    """Scan speed of the whole-file check, and the cost of the check once cached."""
    from tst_megatron.data import checks
    from tst_megatron.data.builders import open_indexed_dataset

    prefix = prefixes[0]
    dataset = open_indexed_dataset(prefix)
    size = os.path.getsize(prefix + ".bin")
    checks._scan(dataset)  # page cache warm, as for the loader figures
    start = time.perf_counter()
    checks._scan(dataset)
    scan = time.perf_counter() - start
    Path(prefix + checks.STATS_SUFFIX).unlink(missing_ok=True)
    checks.token_range(dataset, prefix, None)  # scans and writes the cache beside the data
    start = time.perf_counter()
    checks.token_range(dataset, prefix, None)
    cached = time.perf_counter() - start
    return {"scan_gb_per_s": size / scan / 1e9, "scan_s": scan, "bytes": size, "cached_s": cached}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200_000_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpu-steps", type=int, default=12)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "tst_data_bench")
    parser.add_argument("--index-documents", type=int, default=20_000_000)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    args.dir.mkdir(parents=True, exist_ok=True)
    index = index_build(args.index_documents)  # first: the peak RSS growth is the build's
    prefixes = write_corpus(args.dir, args.tokens)
    loader = loader_throughput(prefixes, args.dir, args.steps)
    gpu = b200_consumption()
    wait = training_wait(write_corpus(args.dir, 5_000_000, CPU_VOCAB), args.cpu_steps)
    check = token_range_check(prefixes)

    need = gpu["data_tokens_per_s_per_gpu"]
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"corpus {args.tokens:,} tokens in {args.dir}")  # fmt: skip
    print(f"\n1-2. phase 1, s={BAG}, L={SEQ}, one rank of DP {DP} ({GLOBAL_BATCH // DP} windows"
          f"/step); a B200 in tst-10b-a1b consumes {need:,.0f} data tokens/s "
          f"(planner: step {gpu['step_s']:.2f} s at MFU {gpu['mfu']:.0%})")  # fmt: skip
    print(f"   {'loader':46s} {'data tokens/s':>15s} {'x B200 need':>12s}")
    for name, rate in loader.items():
        print(f"   {name:46s} {rate:15,.0f} {rate / need:12.1f}")
    print(f"\n3. CPU training run (1 layer, hidden 32, vocabulary {CPU_VOCAB}, L=256, s={BAG}, "
          "16 windows/step, document masks)")
    for workers, row in wait.items():
        print(f"   --num-workers {workers}: waiting for data {row['wait_fraction']:.1%} of step "
              f"time ({row['step_ms']:.0f} ms/step)")  # fmt: skip
    per_100gb = 100e9 / (check["scan_gb_per_s"] * 1e9)
    print(f"\n4. token range check: scan {check['scan_gb_per_s']:.2f} GB/s "
          f"({check['bytes'] / 1e9:.2f} GB in {check['scan_s']:.2f} s; 100 GB: {per_100gb:.0f} s "
          f"at this speed); cached lookup {check['cached_s'] * 1e3:.2f} ms")  # fmt: skip
    scale, ix = 1e12 / index["tokens"], index
    print(f"\n5. shuffled indices for {ix['documents']:,} documents "
          f"({ix['tokens'] / 1e9:.1f}B tokens, {ix['samples']:,} samples of L={SEQ}): "
          f"document {ix['document_index_s']:.1f} s, sample {ix['sample_index_s']:.1f} s, "
          f"shuffle {ix['shuffle_index_s']:.1f} s, blend {ix['blend_index_s']:.1f} s = "
          f"{ix['total_s']:.1f} s; arrays {ix['index_bytes'] / 1e9:.2f} GB, peak RSS growth "
          f"{ix['peak_rss_growth_bytes'] / 1e9:.2f} GB. Linear to 1T tokens (x{scale:.0f}): "
          f"{ix['total_s'] * scale / 60:.0f} min, {ix['index_bytes'] * scale / 1e9:.0f} GB of "
          f"index arrays, {ix['peak_rss_growth_bytes'] * scale / 1e9:.0f} GB peak")  # fmt: skip
    if args.json:
        figures = {"loader": loader, "b200": gpu, "wait": wait, "check": check, "index": index}
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

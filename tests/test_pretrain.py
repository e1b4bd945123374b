"""pretrain_tst.py end to end on CPU: phases, layouts, resharding, exact resume.

Each run is a real ``torchrun`` launch (gloo, 1-2 ranks) on a small slice of the shipped
sample corpus tokenized by tools/preprocess_data.py. Losses are read from the
``--metrics-jsonl`` record (full float precision) and compared between runs.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.multirank import free_port

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
TINY_MODEL = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--num-query-groups",
    "2",
    "--seq-length",
    "32",
    "--max-position-embeddings",
    "32",
    "--swiglu",
    "--normalization",
    "RMSNorm",
    "--disable-bias-linear",
    "--untie-embeddings-and-output-weights",
    "--position-embedding-type",
    "rope",
    "--transformer-impl",
    "local",
    "--distributed-backend",
    "gloo",
    "--seed",
    "5",
    "--hidden-dropout",
    "0",
    "--attention-dropout",
    "0",
]
OPTIM = [
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "8",
    "--lr",
    "3e-3",
    "--min-lr",
    "3e-4",
    "--lr-decay-style",
    "WSD",
    "--lr-wsd-decay-style",
    "linear",
    "--lr-wsd-decay-iters",
    "4",
    "--lr-warmup-iters",
    "2",
    "--clip-grad",
    "1.0",
    "--weight-decay",
    "0.01",
    "--log-interval",
    "1",
    "--eval-interval",
    "1000",
    "--eval-iters",
    "2",
]
TST = ["--tst-bag-size", "4", "--tst-phase1-fraction", "0.5"]
TRAIN_ITERS = 8
SLOW_ATOL = 2e-5  # resharded runs sum gradients in another order (fp32)


def run(tmp: Path, name: str, extra: list[str], nproc: int, data: str, expect_ok=True):
    """One torchrun launch; returns (per-iteration records, stdout+stderr)."""
    metrics = tmp / f"{name}.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-port",
        str(free_port()),
        str(ROOT / "pretrain_tst.py"),
        *TINY_MODEL,
        *OPTIM,
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        str(SAMPLE),
        "--data-path",
        data,
        "--split",
        "95,5,0",
        "--data-cache-path",
        str(tmp / "cache"),
        "--train-iters",
        str(TRAIN_ITERS),
        "--metrics-jsonl",
        str(metrics),
        *extra,
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    output = proc.stdout + proc.stderr
    if expect_ok:
        assert proc.returncode == 0, f"run {name} failed:\n" + output[-4000:]
    records = []
    if metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return records, output


def losses(records) -> dict[int, float]:
    return {r["iteration"]: r["lm_loss"] for r in records if "lm_loss" in r}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """200 documents of the sample corpus as a .bin/.idx dataset (shipped tokenizer)."""
    tmp = tmp_path_factory.mktemp("corpus")
    with gzip.open(SAMPLE / "train.jsonl.gz", "rt") as src, open(tmp / "docs.jsonl", "w") as dst:
        for i, line in enumerate(src):
            if i == 200:
                break
            dst.write(line)
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "preprocess_data.py"),
            "--input",
            str(tmp / "docs.jsonl"),
            "--output-prefix",
            str(tmp / "sample"),
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            str(SAMPLE),
            "--append-eod",
        ],
        check=True,
        capture_output=True,
    )
    return str(tmp / "sample_text_document")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """All launches, shared by the assertions below (launches dominate the cost)."""
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    dp2 = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    out["auto"] = run(tmp, "auto", [*TST, *dp2, "--save", str(tmp / "auto")], 2, corpus)
    out["phase1"] = run(
        tmp, "phase1", [*TST, *dp2, "--tst-phase", "1", "--save", str(tmp / "two")], 2, corpus
    )
    out["phase2"] = run(
        tmp,
        "phase2",
        [*TST, *dp2, "--tst-phase", "2", "--load", str(tmp / "two"), "--save", str(tmp / "two")],
        2,
        corpus,
    )
    tp2 = [
        "--tensor-model-parallel-size",
        "2",
        "--sequence-parallel",
        "--use-distributed-optimizer",
    ]
    reshardable = ["--ckpt-fully-reshardable"]  # these checkpoints load at other layouts
    out["tp2"] = run(
        tmp,
        "tp2",
        [*TST, *tp2, *reshardable, "--save", str(tmp / "tp2"), "--save-interval", "3"],
        2,
        corpus,
    )
    # interrupted at 3 then resumed, same layout: must reproduce "tp2" exactly
    out["tp2_cut"] = run(
        tmp,
        "tp2_cut",
        [*TST, *tp2, "--save", str(tmp / "tp2_cut"), "--exit-interval", "3"],
        2,
        corpus,
    )
    out["tp2_resume"] = run(
        tmp, "tp2_resume", [*TST, *tp2, "--load", str(tmp / "tp2_cut")], 2, corpus
    )
    # TP2 checkpoint (iteration 3, phase 1) resumed at DP2 with the distributed optimizer
    out["tp2_to_dp2"] = run(
        tmp, "tp2_to_dp2", [*TST, *dp2, "--load", str(tmp / "tp2" / "iter_0000003")], 2, corpus
    )
    pp2 = ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"]
    out["pp2"] = run(
        tmp,
        "pp2",
        [*TST, *pp2, *reshardable, "--save", str(tmp / "pp2"), "--save-interval", "6"],
        2,
        corpus,
    )
    out["pp2_to_pp1"] = run(
        tmp,
        "pp2_to_pp1",
        [*TST, "--use-distributed-optimizer", "--load", str(tmp / "pp2" / "iter_0000006")],
        1,
        corpus,
    )
    # interleaved (virtual) pipeline: a 4-layer 1-rank run saved at iteration 3 continues
    # under PP=2 with one layer per virtual stage (weights are only layout-independent
    # through a checkpoint: PP ranks draw their initial weights differently)
    four_layers = [*TST, "--num-layers", "4", "--use-distributed-optimizer"]
    out["vpp_reference"] = run(
        tmp,
        "vpp_reference",
        [*four_layers, *reshardable, "--save", str(tmp / "four"), "--save-interval", "3"],
        1,
        corpus,
    )
    out["vpp"] = run(
        tmp,
        "vpp",
        [
            *four_layers,
            "--pipeline-model-parallel-size",
            "2",
            "--num-layers-per-virtual-pipeline-stage",
            "1",
            "--load",
            str(tmp / "four" / "iter_0000003"),
        ],
        2,
        corpus,
    )
    # context parallelism: CP=2 (2 ranks, DP=1) saves at iteration 3 and a second job resumes
    cp2 = ["--context-parallel-size", "2", "--use-distributed-optimizer"]
    out["cp2"] = run(
        tmp, "cp2", [*TST, *cp2, "--save", str(tmp / "cp2"), "--save-interval", "3"], 2, corpus
    )
    out["cp2_resume"] = run(
        tmp, "cp2_resume", [*TST, *cp2, "--load", str(tmp / "cp2" / "iter_0000003")], 2, corpus
    )
    out["dirs"] = tmp
    return out


@pytest.mark.slow
def test_in_process_boundary_equals_two_jobs(runs):
    auto, phase1, phase2 = (losses(runs[k][0]) for k in ("auto", "phase1", "phase2"))
    assert sorted(phase1) == [1, 2, 3, 4]
    assert sorted(phase2) == [5, 6, 7, 8]
    assert {**phase1, **phase2} == auto  # bit-for-bit on CPU
    log = runs["auto"][1]
    assert "TST phase boundary at iteration 4" in log
    assert "phase: 1 (s=4, full)" in log and "phase: 2" in log


@pytest.mark.slow
def test_phase2_continues_the_token_stream(runs):
    records = runs["auto"][0]
    tokens = {r["iteration"]: r["data_tokens"] for r in records if "data_tokens" in r}
    window1, window2 = 4 * (32 + 1) - 1, 32  # tokens a phase-1 / phase-2 sample advances by
    assert tokens[4] == 4 * 8 * window1
    assert tokens[8] - tokens[4] == 4 * 8 * window2
    meta = json.loads((runs["dirs"] / "two" / "iter_0000004" / "tst_checkpoint.json").read_text())
    assert meta["tst"]["phase"] == 1 and meta["consumed_data_tokens"] == tokens[4]


@pytest.mark.slow
def test_interrupt_and_resume_is_exact(runs):
    full, cut, resumed = (losses(runs[k][0]) for k in ("tp2", "tp2_cut", "tp2_resume"))
    assert sorted(cut) == [1, 2, 3]
    assert "--exit-interval 3 reached" in runs["tp2_cut"][1]
    assert {**cut, **resumed} == full


@pytest.mark.slow
def test_context_parallel_trains_saves_and_resumes(runs):
    """CP=2 over 2 ranks: the losses are the TP=2 run's (same global batch, another summation
    order), and a job resumed from its iteration-3 checkpoint continues exactly."""
    cp2, resumed, tp2 = (losses(runs[k][0]) for k in ("cp2", "cp2_resume", "tp2"))
    assert sorted(cp2) == list(range(1, TRAIN_ITERS + 1))
    for iteration, loss in cp2.items():
        assert loss == pytest.approx(tp2[iteration], abs=SLOW_ATOL), iteration
    meta = json.loads((runs["dirs"] / "cp2" / "iter_0000003" / "tst_checkpoint.json").read_text())
    assert meta["layout"]["context_parallel_size"] == 2 and meta["tst"]["phase"] == 1
    assert sorted(resumed) == list(range(4, TRAIN_ITERS + 1))
    assert resumed == {i: cp2[i] for i in resumed}


@pytest.mark.slow
@pytest.mark.parametrize(("source", "resumed"), [("tp2", "tp2_to_dp2"), ("pp2", "pp2_to_pp1")])
def test_checkpoint_reshards_to_another_layout(runs, source, resumed):
    original, continued = losses(runs[source][0]), losses(runs[resumed][0])
    assert continued, runs[resumed][1][-3000:]
    assert "layout changed: resharded" in runs[resumed][1]
    for iteration, loss in continued.items():
        assert loss == pytest.approx(original[iteration], abs=SLOW_ATOL), iteration


@pytest.mark.slow
def test_interleaved_pipeline_matches_single_rank(runs):
    got, ref = losses(runs["vpp"][0]), losses(runs["vpp_reference"][0])
    assert sorted(got) == list(range(4, TRAIN_ITERS + 1))
    for iteration, loss in got.items():
        assert loss == pytest.approx(ref[iteration], abs=SLOW_ATOL), iteration


@pytest.mark.slow
def test_loss_decreases_on_real_text_and_validation_is_standard(runs):
    records = runs["auto"][0]
    loss = losses(records)
    assert loss[4] < loss[1] - 0.1  # phase 1 learns
    assert loss[8] < loss[5]  # phase 2 learns (after the boundary spike)
    valid = [r["valid_lm_loss"] for r in records if "valid_lm_loss" in r]
    assert len(valid) == 1 and valid[0] < 9.0  # ln(8192) = 9.01: better than uniform
    assert "final validation loss at iteration 8" in runs["auto"][1]


@pytest.mark.slow
def test_phase2_checkpoint_is_a_stock_gpt_model(runs):
    """The final (phase-2) checkpoint loads strictly into plain Megatron-Core `GPTModel`."""
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt import GPTModel

    from tests.model_settings import config_of
    from tst_megatron.training import model_builder
    from tst_megatron.training.run_config import settings_from_flags

    path = runs["dirs"] / "auto" / "iter_0000008"
    meta = json.loads((path / "tst_checkpoint.json").read_text())
    assert meta["tst"]["phase"] == 2
    settings = settings_from_flags(
        [*TINY_MODEL, *OPTIM, "--train-iters", "8", "--mock-data", "--vocab-size", "8192"]
    )
    config = config_of(settings)
    with model_builder.single_process_parallel_state():
        stock = GPTModel(
            config,
            model_builder.layer_spec(settings.model, settings.kernels, config),
            vocab_size=settings.model.vocab,
            max_sequence_length=settings.model.max_position_embeddings,
            position_embedding_type="rope",
            share_embeddings_and_output_weights=False,
        )
        sharded = {
            k: v for k, v in stock.sharded_state_dict().items() if not k.endswith("_extra_state")
        }
        loaded = dist_checkpointing.load({"model": sharded}, str(path))
    result = stock.load_state_dict(loaded["model"], strict=False)
    assert not result.unexpected_keys
    assert all(key.endswith("_extra_state") for key in result.missing_keys)
    assert set(loaded["model"]) == {k for k in stock.state_dict() if "_extra_state" not in k}


@pytest.mark.slow
def test_startup_memory_estimate_is_logged(runs):
    """The planner's per-GPU estimate appears at start-up, with hand-computed numbers.

    The "auto" run: fp32 (4 B weights, 4 B grads, Adam 8 B sharded over DP=2), one stage of
    2 layers; activations per micro-batch (b=2, L=32: 64 tokens) are 2 layers of
    ``tokens (8h + 4(q + kv) + 10f)`` (this host runs no fused SwiGLU: mcore's unfused one
    keeps 10f, the fused kernel of a GPU 6f), plus the phase-1 bag inputs: the s lookups per latent
    position (fp32 here) and their fp32 mean before the reduction, ``tokens h (4 s + 4)``.
    """
    from tst_megatron.planning.params import count_parameters, meta_parameters
    from tst_megatron.training.run_config import settings_from_flags

    shape = settings_from_flags([*TINY_MODEL, *OPTIM, "--train-iters", "8", "--mock-data",
                                 "--vocab-size", "8192"]).model  # fmt: skip
    params = count_parameters(shape, meta_parameters(shape)).total  # meta model, not the run's
    mb = 1024**2
    h, f, tokens = 64, shape.ffn_hidden_size, 2 * 32
    q, kv = 4 * 16, 2 * 16
    per_micro = 2 * tokens * (8 * h + 4 * (q + kv) + 10 * f)
    bags = tokens * h * (4 * 4 + 4)
    log = runs["auto"][1]
    expected = (
        "theoretical memory footprint per GPU of pipeline stage 0 of 1 (tst_megatron.planning, "
        f"as tools/plan.py): weights+grads+optimizer={12 * params / mb:.2f} MB (weights "
        f"{4 * params / mb:.2f}, grads {4 * params / mb:.2f}, optimizer {4 * params / mb:.2f}), "
        f"activations per micro-batch: phase 1 {(per_micro + bags) / mb:.2f} MB, phase 2 "
        f"{per_micro / mb:.2f} MB"
    )
    assert expected in log, log[:3000]
    assert log.count("theoretical memory footprint") == 1  # printed by the logging rank only
    assert "max_memory_allocated" not in log  # CUDA only
    pp2 = runs["pp2"][1]
    assert "pipeline stage 0 of 2" in pp2 and "pipeline stage 1 of 2" in pp2

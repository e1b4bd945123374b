"""The issue-13 TST options at the command line: bag-loss weighting, the batch fold and the
fused output loss reach `args.tst` / the model, bad values are refused naming the flag, a
phase-1 resume checks them, and the FLOPs follow the fold."""

from __future__ import annotations

import argparse

import pytest

from tests.model_settings import model_of
from tst_megatron.config import PhaseSpec, TSTConfig
from tst_megatron.kernels import KernelAvailability
from tst_megatron.settings import CheckpointConfig, Environment, ModelConfig
from tst_megatron.training import checkpointing as ckpt
from tst_megatron.training import model_builder
from tst_megatron.training.arguments import ConfigError, parse_args, validate_args
from tst_megatron.training.checkpoint_settings import CheckpointedRun
from tst_megatron.training.flops import flops_per_step, phase_flops_per_step
from tst_megatron.training.run_config import settings_from_flags

BASE = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 2 --train-iters 10 --lr 1e-3 --mock-data --vocab-size 512"
).split()
TST = "--tst-bag-size 4 --tst-phase1-iters 3"


# A CPU host with Transformer Engine installed (the CPU test machine has none).
CPU_WITH_TE = Environment(kernels=KernelAvailability(cuda=False, transformer_engine=True))


def validated(
    *extra: str, world_size: int = 1, env: Environment | None = None
) -> argparse.Namespace:
    args = parse_args([*BASE, *" ".join(extra).split()])
    validate_args(args, world_size=world_size, env=env)
    return args


def rejected(*extra: str, world_size: int = 1, env: Environment | None = None) -> str:
    args = parse_args([*BASE, *" ".join(extra).split()])
    with pytest.raises(ConfigError) as info:
        validate_args(args, world_size=world_size, env=env)
    return str(info.value)


def test_flags_reach_the_tst_config():
    args = validated(TST, "--tst-bag-weighting power-law --tst-fold batch")
    assert args.tst == TSTConfig(bag_size=4, phase1_iters=3, fold="batch",
                                 bag_weighting="power-law")  # fmt: skip
    assert args.tst.phase_spec(1) == PhaseSpec(4, "full", "batch", (1.0, 0.5, 1 / 3, 0.25))
    # the report's fitted power law C0 + a * i^k (docs/method.md), passed explicitly
    fitted = " ".join(f"{3.63 + 1.35 * i**-1.25:.4f}" for i in range(1, 5))
    args = validated(TST, f"--tst-bag-weights {fitted}")
    assert args.tst.phase_spec(1).target_weights == pytest.approx((4.98, 4.198, 3.972, 3.869),
                                                                  abs=1e-3)  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "parts"),
    [
        ("--tst-bag-weighting power-law", ["--tst-bag-weighting power-law needs TST on"]),
        ("--tst-fold batch", ["--tst-fold batch needs TST on (--tst-bag-size > 1)"]),
        ("--tst-bag-weights 1 2", ["--tst-bag-weights needs TST on"]),
        (f"{TST} --tst-bag-weights 1 2 3", ["gives 3 weights; --tst-bag-size 4 needs 4"]),
        (f"{TST} --tst-bag-weights 1 -2 3 4", ["finite, >= 0 and not all 0", "-2.0"]),
        (f"{TST} --tst-bag-weights 0 0 0 0", ["finite, >= 0 and not all 0"]),
        (
            f"{TST} --tst-bag-weights 1 1 1 1 --tst-bag-weighting exponential",
            ["give either --tst-bag-weights or --tst-bag-weighting", "exponential"],
        ),
        (
            f"{TST} --tst-mode input-only --tst-bag-weighting first-token",
            ["--tst-bag-weighting first-token", "input-only has one target per position"],
        ),
        (
            f"{TST} --tst-mode output-only --tst-fold batch",
            ["--tst-fold batch splits the s-token input bags", "output-only reads one token"],
        ),
        (
            "--tst-bag-size 3 --tst-phase1-iters 3 --tst-fold batch",
            ["--seq-length 32", "multiple of --tst-bag-size 3"],
        ),
    ],
)
def test_bad_values_are_refused_naming_the_flag(extra, parts):
    message = rejected(extra)
    for part in parts:
        assert part in message, f"{part!r} missing from: {message}"


def test_batch_fold_layout_checks_use_the_latent_length():
    # L = 32, s = 16: two latent positions per phase-1 sample
    fold = "--tst-bag-size 16 --tst-phase1-iters 3 --tst-fold batch"
    message = rejected(fold, "--context-parallel-size 2", world_size=2)
    assert "the 2 phase-1 latent positions" in message and "2 x --context-parallel-size 2" in (
        message
    )
    tp = "--tensor-model-parallel-size 4 --sequence-parallel"
    message = rejected(fold, tp, world_size=4)
    assert "splits the 2 phase-1 latent positions" in message
    assert "--tensor-model-parallel-size 4: L/s must be a multiple of it" in message
    assert validated(fold.replace("16", "8"), tp, world_size=4).tst.fold == "batch"


def test_fp8_token_count_is_checked():
    fp8 = "--fp8-format hybrid --transformer-impl transformer_engine --micro-batch-size 1"
    message = rejected("--tst-bag-size 2 --tst-phase1-iters 3 --tst-fold batch", fp8,
                       "--seq-length 24 --max-position-embeddings 24", env=CPU_WITH_TE)  # fmt: skip
    assert message == (
        "--tst-fold batch with --fp8-format hybrid --fp8-recipe delayed: a phase-1 micro-batch "
        "puts 24 tokens per rank into each GEMM (L/s = 12 / 1 x s*b = 2); Transformer "
        "Engine's FP8 GEMMs with this recipe need a multiple of 16"
    )


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_fp8_token_multiple_is_per_recipe(recipe):
    """48 tokens per GEMM (L/s = 24, s*b = 2) suit every recipe but MXFP8 (blocks of 32)."""
    fold = "--tst-bag-size 2 --tst-phase1-iters 3 --tst-fold batch"
    fp8 = ("--fp8-format e4m3 --transformer-impl transformer_engine --micro-batch-size 1 "
           f"--fp8-recipe {recipe}")  # fmt: skip
    shape = "--seq-length 48 --max-position-embeddings 48"
    if recipe != "mxfp8":
        assert validated(fold, fp8, shape, env=CPU_WITH_TE).fp8_recipe == recipe
        return
    message = rejected(fold, fp8, shape, env=CPU_WITH_TE)
    assert message == (
        "--tst-fold batch with --fp8-format e4m3 --fp8-recipe mxfp8: a phase-1 micro-batch "
        "puts 48 tokens per rank into each GEMM (L/s = 24 / 1 x s*b = 2); Transformer "
        "Engine's FP8 GEMMs with this recipe need a multiple of 32"
    )
    assert validated(fold, fp8.replace("--micro-batch-size 1", "--micro-batch-size 2"), shape,
                     "--global-batch-size 2", env=CPU_WITH_TE).fp8_recipe == "mxfp8"  # fmt: skip


def test_fused_output_loss_flag_reaches_the_model():
    settings = settings_from_flags([*BASE, "--tst-fused-output-loss"]).with_padded_vocab_size(512)
    with model_builder.single_process_parallel_state():
        model = model_of(settings)
    assert model.fused_output_loss
    assert not validated().tst_fused_output_loss


def resumed(*extra: str) -> tuple[CheckpointedRun, CheckpointConfig]:
    """The checkpointed sections and the checkpoint section of a run of ``extra`` flags."""
    run = settings_from_flags([*BASE, *" ".join(extra).split()], env=Environment.cpu())
    return CheckpointedRun.of(run.with_padded_vocab_size(512)), run.checkpoint


def _phase1_meta(**tst) -> dict:
    run, _ = resumed(TST)
    saved = {**ckpt.tst_state(run.tst, run.schedule.train_iters, phase=1), **tst}
    return {"model": ckpt.model_shape(run.model), "tst": saved,
            "use_distributed_optimizer": False, "iteration": 2}  # fmt: skip


def test_phase1_resume_checks_fold_and_weighting():
    run, checkpoint = resumed(TST, "--tst-bag-weighting power-law --tst-fold batch")
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.check_compatible(run, checkpoint, _phase1_meta(), "ckpt/iter_0000002")
    for part in ("--tst-fold: checkpoint 'sequence', this run 'batch'",
                 "--tst-bag-weighting: checkpoint 'uniform', this run 'power-law'"):  # fmt: skip
        assert part in str(err.value)
    explicit = resumed(TST, "--tst-bag-weights 4 3 2 1")
    with pytest.raises(ckpt.CheckpointError, match=r"--tst-bag-weights: checkpoint None, this "
                       r"run \[4.0, 3.0, 2.0, 1.0\]"):  # fmt: skip
        ckpt.check_compatible(*explicit, _phase1_meta(), "ckpt")
    # a checkpoint written before these keys existed means sequence fold, uniform weights
    old = _phase1_meta()
    for key in ("fold", "bag_weighting", "bag_weights"):
        del old["tst"][key]
    ckpt.check_compatible(*resumed(TST), old, "ckpt")
    # phase 2 (or a phase-1 checkpoint continued with --tst-phase 2) does not care
    ckpt.check_compatible(run, checkpoint, {**old, "tst": {**old["tst"], "phase": 2}}, "ckpt")


def tiny_model(vocab: int) -> ModelConfig:
    """The FLOP-relevant shape of the tiny test models (2 layers, h 64, 4 heads, no MoE)."""
    return ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
                       num_query_groups=4, kv_channels=16, seq_length=32,
                       max_position_embeddings=32, padded_vocab_size=vocab)  # fmt: skip


def test_flops_follow_the_fold():
    shape = tiny_model(vocab=512)
    seq, batch = PhaseSpec(4, "full"), PhaseSpec(4, "full", fold="batch")
    L, b = 32, 3
    assert phase_flops_per_step(shape, seq, L, b) == flops_per_step(shape, L, b)
    folded = phase_flops_per_step(shape, batch, L, b)
    assert folded == flops_per_step(shape, L // 4, 4 * b)
    attention = b * L**2 * 6 * 64 * 2  # the causal core of flops_per_step, both layers
    assert flops_per_step(shape, L, b) - folded == attention - attention // 4


def test_kl_form_reaches_the_log_line_the_jsonl_and_tensorboard(tmp_path, capsys):
    """`MetricsLogger` with the trainer's step dicts: phase 1 (multi-hot) shows MCE and its KL
    form in all three sinks; phase 2 (one target) has them equal and no KL field in the log."""
    import json
    from types import SimpleNamespace

    from tst_megatron.config import STANDARD_PHASE
    from tst_megatron.training.metrics import MetricsLogger
    from tst_megatron.training.run_config import settings_from_flags

    class Board:  # the SummaryWriter calls the logger makes
        def __init__(self):
            self.scalars: dict[tuple[str, int], float] = {}

        def add_scalar(self, tag, value, step):
            self.scalars[(tag, step)] = value

        def flush(self):
            pass

    jsonl = tmp_path / "metrics.jsonl"
    flags = [*BASE, *f"{TST} --tst-fold batch --log-interval 1 --metrics-jsonl {jsonl}".split()]
    settings = settings_from_flags(flags)
    with model_builder.single_process_parallel_state():
        sections = (settings.logging, settings.model, settings.schedule, settings.precision)
        logger = MetricsLogger(*sections, phase1_iters=3)
        board = Board()
        logger._writers.append(("tb", board))
        stream = SimpleNamespace(consumed_tokens=0)
        for iteration, phase, spec, kl in ((3, 1, settings.tst.phase_spec(1), 2.5),
                                            (4, 2, STANDARD_PHASE, 4.0)):  # fmt: skip
            progress = SimpleNamespace(iteration=iteration, consumed_samples=0, phase=phase)
            step = {"loss": 4.0, "loss_kl": kl, "grad_norm": 1.0, "updated": True,
                    "nan": False, "global_batch_size": 2, "lr": 1e-3}  # fmt: skip
            logger.step(progress, spec, step, 0.1, stream, stop_at=10)
        for _, writer in logger._writers:
            if hasattr(writer, "close"):
                writer.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if "iteration" in line]
    assert "phase: 1 (s=4, full, batch fold)" in lines[0]
    assert "lm loss: 4.000000E+00 | lm loss KL (MCE - target entropy): 2.500000E+00 |" in lines[0]
    assert "lm loss KL" not in lines[1]
    records = {r["iteration"]: r for r in map(json.loads, jsonl.read_text().splitlines())}
    assert (records[3]["lm_loss"], records[3]["lm_loss_kl"]) == (4.0, 2.5)
    assert records[4]["lm_loss_kl"] == records[4]["lm_loss"] == 4.0
    assert board.scalars[("lm_loss_kl", 3)] == 2.5 and board.scalars[("lm_loss", 3)] == 4.0


@pytest.mark.parametrize("per_token", [False, True])
def test_target_entropy_rides_with_the_loss_report_into_one_reduction(per_token):
    """`loss_func` reports the entropy summed over the loss's positions; `check_step` divides it
    by the same count in its one all-reduce (KL form = loss - mean entropy)."""
    import torch

    from tst_megatron.training.faults import check_step
    from tst_megatron.training.loop import loss_func

    position_mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    output = torch.tensor([[2.0, 9.0, 4.0], [3.0, 7.0, 9.0]])
    entropy = torch.tensor([[0.5, 9.0, 1.5], [1.0, 1.0, 9.0]])
    with model_builder.single_process_parallel_state():
        result = loss_func(position_mask, output, per_token=per_token, target_entropy=entropy)
        plain = loss_func(position_mask, output, per_token=per_token)
        health = check_step([result[-1], plain[-1]], [])
    assert (health.loss, health.target_entropy) == (4.0, 0.5)  # (16 + 16) / 8, (4 + 0) / 8
    assert "target entropy" not in plain[-1]
    if per_token:
        assert result[0].item() == 16.0 and int(result[1]) == 4
    else:
        assert result[0].item() == 4.0


def test_planner_follows_the_fold_and_the_fused_output_loss(tmp_path):
    import yaml

    from tests.tool_import import import_tool
    from tst_megatron.planning.layout import PlanRequest

    plan = import_tool("plan").plan

    config = {
        "num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "seq-length": 64,
        "micro-batch-size": 2, "global-batch-size": 8, "train-iters": 10, "lr": 1e-3,
        "vocab-size": 4096, "mock-data": True, "tst-bag-size": 4, "tst-phase1-iters": 4,
    }  # fmt: skip
    reports = {}
    both = {"tst-fold": "batch", "tst-fused-output-loss": True}
    for name, extra in (("sequence", {}), ("batch", both)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**config, **extra}))
        reports[name] = plan(PlanRequest(config=str(path), gpus_per_node=1))
        assert reports[name]["ok"], reports[name]["errors"]
    seq, batch = reports["sequence"], reports["batch"]
    shape = tiny_model(vocab=4096)
    assert batch["tst"]["fold"] == "batch"
    assert batch["flops_per_step_phase1"] == flops_per_step(shape, 16, 32)
    assert batch["flops_per_step_phase2"] == seq["flops_per_step_phase1"]
    assert batch["step_time_s_phase1"] < batch["step_time_s"] == seq["step_time_s_phase1"]
    assert batch["run_hours"] < seq["run_hours"]
    logits = seq["memory_stages"][-1]["logits_bytes"]
    fused_logits = batch["memory_stages"][-1]["logits_bytes"]
    tokens, h, vocab = 128, 64, 4096  # 128 tokens fit one 256-token chunk here
    assert logits - fused_logits == 4 * tokens * vocab - (4 * tokens * vocab + 4 * vocab * h
                                                          + 4 * tokens * h)  # fmt: skip


def test_the_data_path_reads_the_batch_fold():
    """`read_step` (the prefetch thread's producer) under the batch fold: each micro-batch holds
    s*b samples, each the sequence-fold layout of one L/s window (document masks included), and
    the stream advances by the same windows."""
    import torch

    from tst_megatron.data.batches import StepLayout, read_step
    from tst_megatron.data.budget import PhasePlan
    from tst_megatron.data.builders import mock_samples
    from tst_megatron.data.documents import DocumentMasking, apply_document_masking
    from tst_megatron.data.prefetch import StepRequest
    from tst_megatron.targets import build_batch

    s, L, b, micro, dp = 4, 16, 2, 3, 2
    fold, short = PhaseSpec(s, "full", "batch"), PhaseSpec(s, "full")
    documents = DocumentMasking(eod=5, reset_position_ids=True, reset_attention_mask=True)
    layout = StepLayout(seq_length=L, micro_batch_size=b, dp_rank=1, dp_size=dp, eod=5,
                        eod_mask_loss=True, documents=documents)  # fmt: skip
    plans = [PhasePlan(1, 1000, short.window_length(L // s)), PhasePlan(2, 0, L + 1)]
    got_stream, ref_stream = (mock_samples(32, 7, plans) for _ in range(2))
    got = read_step(got_stream, StepRequest(fold, micro), layout)
    rows = s * b
    windows = torch.from_numpy(ref_stream.next_windows(short, dp * micro * rows,
                                                       slice(micro * rows, 2 * micro * rows)))
    assert got_stream.state.as_dict() == ref_stream.state.as_dict()
    assert len(got) == micro
    for i, batch in enumerate(got):
        w = windows[i * rows : (i + 1) * rows]
        eod_mask = torch.ones_like(w, dtype=torch.float)
        eod_mask[:, 1:] = (w[:, :-1] != 5).float()
        ref = apply_document_masking(build_batch(w, short, L // s, eod_mask).as_dict(), w,
                                     short, documents)  # fmt: skip
        assert batch.keys() == ref.keys() and batch["tokens"].shape == (rows, s * L // s)
        for key, value in ref.items():
            assert torch.equal(batch[key], value), key

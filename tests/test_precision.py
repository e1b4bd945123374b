"""Mixed precision as Megatron-LM sets it up, on CPU: every precision x position x TST phase.

One CPU rank builds the tiny TST model through the trainer's own path (`model_builder`,
`precision.wrap_model_chunk`) for each precision (fp32, bf16, fp16) and position embedding
(learned, RoPE, none), and runs one forward/backward in each phase (standard, and TST phase 1
in modes full, input-only, output-only). The fp32 run of the same weights is the reference:
the half-precision loss must match it and every gradient must be finite, with a norm close to
fp32's (the learned-position crash and the zero fp16 gradients of the issue fail this).

The loss scale: a tiny MoE model with a large load-balancing loss takes one training step
through the trainer's pieces (`build_model_chunks`, `build_optimizer`, mcore's schedule,
``optimizer.step()``) in fp32, bf16 and fp16 (initial loss scale 1024). The gradient norms must
agree, which needs ``config.grad_scale_func`` on both the LM loss and the MoE aux loss; the
same fp16 step without `precision.attach_loss_scale` is the control (its norm is ~1/1024).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.support.multirank import run_single

PRECISIONS = ("fp32", "bf16", "fp16")
POSITIONS = ("learned_absolute", "rope", "none")
PHASES = ("standard", "full", "input-only", "output-only")
BAG = 4
SEQ = 32
TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 "
    f"--seq-length {SEQ} --micro-batch-size 2 --train-iters 10 --lr 1e-3 --mock-data "
    "--vocab-size 512 --swiglu --normalization RMSNorm --disable-bias-linear "
    "--hidden-dropout 0 --attention-dropout 0 --transformer-impl local"
).split()
# bf16 has 8 mantissa bits: a 6.2-nat loss through 2 layers lands within ~1e-2 of fp32.
LOSS_RTOL = {"bf16": 2e-2, "fp16": 5e-3}
GRAD_NORM_RTOL = {"bf16": 0.1, "fp16": 0.02}


def precision_matrix() -> dict:
    """Rank side: {(precision, position, phase): (loss, grad norm, all grads finite)}."""
    from tst_megatron.config import STANDARD_PHASE, PhaseSpec
    from tst_megatron.targets import build_batch
    from tst_megatron.training import precision as prec
    from tst_megatron.training.model_builder import build_model, transformer_config
    from tst_megatron.training.run_config import settings_from_flags

    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 512, (2, BAG * (SEQ + 1)), generator=generator)
    results = {}
    for position in POSITIONS:
        reference_weights = None
        for name in PRECISIONS:
            flag = [] if name == "fp32" else [f"--{name}"]
            s = settings_from_flags([*TINY, *flag, "--position-embedding-type", position])
            config = transformer_config(s.model, s.parallel, s.precision, s.kernels, s.recompute)
            model = build_model(s.model, s.kernels, config, pre_process=True, post_process=True)
            if reference_weights is None:
                reference_weights = {k: v.detach().clone() for k, v in model.named_parameters()}
            with torch.no_grad():  # the fp32 weights, rounded to this precision
                for key, param in model.named_parameters():
                    param.copy_(reference_weights[key])
            wrapped = prec.wrap_model_chunk(model, config)
            for phase in PHASES:
                spec = STANDARD_PHASE if phase == "standard" else PhaseSpec(BAG, phase)
                model.set_phase(spec)
                width = spec.window_length(SEQ)
                batch = build_batch(windows[:, :width], spec, SEQ).as_dict()
                model.zero_grad(set_to_none=True)
                loss = wrapped(
                    batch["tokens"],
                    batch["position_ids"],
                    None,
                    labels=batch["labels"],
                    loss_mask=batch["loss_mask"],
                )
                mask = batch["loss_mask"]
                mask = mask.amax(-1) if mask.dim() == 3 else mask
                mean = (loss.float() * mask).sum() / mask.sum()
                mean.backward()
                grads = [p.grad.float() for p in model.parameters() if p.grad is not None]
                finite = all(bool(torch.isfinite(g).all()) for g in grads)
                norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
                results[(name, position, phase)] = (
                    float(mean),
                    norm,
                    finite,
                    loss.dtype,
                    len(grads) == sum(1 for _ in model.parameters()),
                )
    return results


MOE = [
    *TINY,
    *"--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 32 --moe-aux-loss-coeff 30 "
    "--position-embedding-type rope --use-distributed-optimizer".split(),
]
MOE_RUNS = {
    "fp32": ([], True),
    "fp32_no_aux": (["--moe-aux-loss-coeff", "0"], True),
    "bf16": (["--bf16"], True),
    "fp16": (["--fp16", "--initial-loss-scale", "1024"], True),
    "fp16_loss_not_scaled": (["--fp16", "--initial-loss-scale", "1024"], False),
}


def moe_grad_norms() -> dict:
    """Rank side: {run: grad norm of one optimizer step} (see the module docstring)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tst_megatron.config import STANDARD_PHASE
    from tst_megatron.targets import build_batch
    from tst_megatron.training import precision as prec
    from tst_megatron.training.arguments import parse_args, validate_args
    from tst_megatron.training.loop import build_model_chunks, forward_step
    from tst_megatron.training.model_builder import transformer_config
    from tst_megatron.training.optimizer import build_optimizer
    from tst_megatron.training.run_config import from_validated_args

    windows = torch.randint(0, 512, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))
    batch = build_batch(windows, STANDARD_PHASE, SEQ).as_dict()
    reference, norms = None, {}
    for name, (flags, attach) in MOE_RUNS.items():
        args = parse_args([*MOE, *flags])
        validate_args(args, world_size=1)
        args.padded_vocab_size = 512
        s = from_validated_args(args)
        config = transformer_config(s.model, s.parallel, s.precision, s.kernels, s.recompute)
        chunks = build_model_chunks(
            config,
            s.model,
            s.parallel,
            s.precision,
            s.kernels,
            document_attention=False,
            checkpointed=False,
        )
        params = dict(prec.unwrap(chunks[0]).named_parameters())
        if reference is None:
            reference = {k: v.detach().clone() for k, v in params.items()}
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(reference[key])
        run = from_validated_args(args)
        optimizer = build_optimizer(  # copies the weights into fp32 main params
            run.optimizer, run.schedule, run.precision, run.parallel, chunks
        )
        if attach:
            prec.attach_loss_scale(chunks, optimizer)
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([batch]),
            model=chunks[0],
            num_microbatches=1,
            seq_length=SEQ,
            micro_batch_size=2,
            forward_only=False,
        )
        updated, grad_norm, _ = optimizer.step()
        assert updated, name
        norms[name] = float(grad_norm)
    return norms


@pytest.fixture(scope="module")
def matrix():
    return run_single(precision_matrix, timeout_s=240)


@pytest.fixture(scope="module")
def moe_norms():
    return run_single(moe_grad_norms, timeout_s=240)


def test_loss_scale_reaches_the_lm_loss_and_the_moe_aux_loss(moe_norms):
    ref = moe_norms["fp32"]
    assert abs(moe_norms["fp32_no_aux"] - ref) > 0.1 * ref  # the aux loss matters here
    assert moe_norms["bf16"] == pytest.approx(ref, rel=0.05)
    assert moe_norms["fp16"] == pytest.approx(ref, rel=0.02)
    assert moe_norms["fp16_loss_not_scaled"] < 0.01 * ref  # the bug: gradients / 1024


@pytest.mark.parametrize("half", ["bf16", "fp16"])
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("phase", PHASES)
def test_half_precision_trains_like_fp32(matrix, half, position, phase):
    loss, norm, finite, dtype, all_grads = matrix[(half, position, phase)]
    ref_loss, ref_norm, ref_finite, _, _ = matrix[("fp32", position, phase)]
    assert ref_finite and ref_norm > 0
    assert finite, f"{half} {position} {phase}: non-finite gradient"
    assert all_grads, "a parameter got no gradient"
    assert dtype == torch.float32  # Float16Module returns the last stage's loss in fp32
    assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL[half])
    assert norm == pytest.approx(ref_norm, rel=GRAD_NORM_RTOL[half])

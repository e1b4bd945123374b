"""Multi-hot CE (every bag weighting), the fused output-layer loss and the target entropy,
against naive references built from s ordinary cross-entropies (TP = 1).

The TP = 2 (vocabulary split across ranks) checks are in test_tst_parallel.py.
"""

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tst_megatron.config import BAG_WEIGHTINGS, bag_weights
from tst_megatron.loss import (
    fused_output,
    fused_output_multi_hot_cross_entropy,
    multi_hot_cross_entropy,
    target_entropy,
)

WEIGHTINGS = [*BAG_WEIGHTINGS, "explicit"]
# the report's power law fitted to token mutual information on DCLM: C0 + a * i^k
FITTED = dict(c0=3.63, a=1.35, k=-1.25)


def weights_for(weighting: str, s: int) -> torch.Tensor | None:
    if weighting == "explicit":
        explicit = [FITTED["c0"] + FITTED["a"] * i ** FITTED["k"] for i in range(1, s + 1)]
        return torch.tensor(bag_weights("uniform", s, tuple(explicit)))
    values = bag_weights(weighting, s)
    return None if values is None else torch.tensor(values)


def naive_multi_hot_ce(logits, targets, mask, weights=None):
    """s separate F.cross_entropy calls on full-vocab logits, weighted by ``g(k) * mask`` and
    normalised per position (0 where no weight is left)."""
    per_target = torch.stack(
        [
            F.cross_entropy(
                logits.transpose(0, 1).reshape(-1, logits.shape[-1]),
                targets[..., k].reshape(-1),
                reduction="none",
            ).view(targets.shape[:2])
            for k in range(targets.shape[-1])
        ],
        dim=-1,
    )
    mass = mask.float() * (1.0 if weights is None else weights)
    total = mass.sum(-1)
    return torch.where(total > 0, (per_target * mass).sum(-1) / total.clamp(min=1e-30), 0.0)


def make_case(s: int, seed: int = 0, L: int = 7, b: int = 3, V: int = 97):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(L, b, V, generator=g) * 3
    targets = torch.randint(0, V, (b, L, s), generator=g)
    if s > 1:
        targets[0, 0, :] = 5  # a bag of one repeated token
        targets[1, 2, 1] = targets[1, 2, 0]  # a repeat inside a bag
    mask = torch.rand(b, L, s, generator=g) > 0.25
    mask[-1, 3, :] = False  # a fully masked position
    mask[0, 1, 0] = False  # first target masked: first-token weighting leaves nothing
    grad_out = torch.randn(b, L, generator=g)
    return logits, targets, mask, grad_out


def loss_and_grad(fn, logits, *args, grad_out, **kwargs):
    leaf = logits.clone().requires_grad_()
    loss = fn(leaf.clone(), *args, **kwargs)
    (loss * grad_out).sum().backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("s", [1, 4, 16])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_naive_reference(s, weighting, masked):
    logits, targets, mask, grad_out = make_case(s)
    weights = weights_for(weighting, s)
    if not masked:
        mask = torch.ones_like(mask)
    got, got_grad = loss_and_grad(
        multi_hot_cross_entropy, logits, targets, mask if masked else None, None, weights,
        grad_out=grad_out,
    )  # fmt: skip
    ref, ref_grad = loss_and_grad(
        naive_multi_hot_ce, logits, targets, mask, weights, grad_out=grad_out
    )
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, ref_grad, atol=1e-5, rtol=1e-5)
    if masked:
        assert got[-1, 3] == 0 and torch.all(got_grad[3, -1] == 0)
    if weighting == "first-token":  # only the first target counts
        first = naive_multi_hot_ce(logits, targets[..., :1], mask[..., :1])
        torch.testing.assert_close(got, first, atol=1e-5, rtol=1e-5)


def test_weightings_differ_and_power_law_values():
    assert bag_weights("power-law", 4) == (1.0, 0.5, 1 / 3, 0.25)
    assert bag_weights("exponential", 2) == (math.exp(-1), math.exp(-2))
    assert bag_weights("first-token", 3) == (1.0, 0.0, 0.0)
    assert bag_weights("uniform", 3) is None
    logits, targets, _, _ = make_case(4)
    losses = {w: multi_hot_cross_entropy(logits.clone(), targets, weights=weights_for(w, 4))
              for w in WEIGHTINGS}  # fmt: skip
    values = [v.sum().item() for v in losses.values()]
    assert len({round(v, 4) for v in values}) == len(WEIGHTINGS)


def test_gradient_formula_with_repeats_and_weights():
    """d/dz = softmax(z) - sum_k w_k onehot(y_k) / sum_k w_k: a repeat adds its weight."""
    V = 11
    z = torch.randn(1, 1, V)
    y = torch.tensor([[[3, 3, 7, 1]]])
    w = torch.tensor([4.0, 2.0, 1.0, 1.0])
    _, grad = loss_and_grad(multi_hot_cross_entropy, z, y, grad_out=torch.ones(1, 1), weights=w)
    expected = torch.softmax(z, -1).clone()
    expected[0, 0, 3] -= 6 / 8
    expected[0, 0, 7] -= 1 / 8
    expected[0, 0, 1] -= 1 / 8
    torch.testing.assert_close(grad, expected)


def test_bf16_logits_compute_in_fp32():
    logits, targets, _, _ = make_case(4)
    got = multi_hot_cross_entropy(logits.bfloat16(), targets)
    ref = naive_multi_hot_ce(logits.bfloat16().float(), targets, torch.ones_like(targets))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_s_copies_of_the_logits():
    s = 16
    logits, targets, _, grad_out = make_case(s, L=8, b=3, V=1000)
    leaf = logits.clone().requires_grad_()
    with _LargestTensor() as probe:
        loss = multi_hot_cross_entropy(leaf.clone(), targets, weights=weights_for("power-law", s))
        (loss * grad_out).sum().backward()
    assert probe.largest <= logits.numel()
    with _LargestTensor() as naive_probe:  # the probe does see an expanded [L, b, s, V] copy
        expanded = logits.unsqueeze(2).expand(-1, -1, s, -1).reshape(-1, logits.shape[-1])
        F.cross_entropy(expanded, targets.transpose(0, 1).reshape(-1))
    assert naive_probe.largest >= s * logits.numel()


@pytest.mark.parametrize(
    ("logits_shape", "targets_shape", "mask_shape", "message"),
    [
        ((4, 2, 10), (2, 4), None, "expected logits [L, b, V/TP] and targets [b, L, s]"),
        ((4, 2, 10), (4, 2, 3), None, "targets (4, 2, 3) do not match logits [L, b] = (4, 2)"),
        ((4, 2, 10), (2, 4, 3), (2, 4), "loss_mask (2, 4) must have the targets' shape"),
    ],
)
def test_rejects_bad_shapes(logits_shape, targets_shape, mask_shape, message):
    logits = torch.randn(logits_shape)
    targets = torch.zeros(targets_shape, dtype=torch.long)
    mask = None if mask_shape is None else torch.ones(mask_shape)
    with pytest.raises(ValueError) as err:
        multi_hot_cross_entropy(logits, targets, mask)
    assert message in str(err.value)


def test_rejects_weights_of_the_wrong_length():
    logits, targets, _, _ = make_case(4)
    with pytest.raises(ValueError, match=r"weights \(3,\) must hold one weight per target, \[4\]"):
        multi_hot_cross_entropy(logits, targets, weights=torch.ones(3))


# ---------------------------------------------------------------------------- fused output


def _unfused(hidden, weight, targets, mask, weights):
    logits = torch.einsum("lbh,vh->lbv", hidden, weight)
    if targets.dim() == 2:  # standard CE, masked by the loss mask like loss_func does
        ce = F.cross_entropy(logits.transpose(0, 1).reshape(-1, weight.shape[0]),
                             targets.reshape(-1), reduction="none").view(targets.shape)  # fmt: skip
        return ce * (mask if mask is not None else 1.0)
    return multi_hot_cross_entropy(logits, targets, mask, None, weights)


def _fused_case(s: int, seed: int = 1, L: int = 9, b: int = 2, h: int = 16, V: int = 53):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(L, b, h, generator=g)
    weight = torch.randn(V, h, generator=g) * 0.5
    shape = (b, L) if s == 0 else (b, L, s)
    targets = torch.randint(0, V, shape, generator=g)
    mask = (torch.rand(shape, generator=g) > 0.2).float()
    return hidden, weight, targets, mask


def _grads(fn, hidden, weight, *args, grad_out, **kwargs):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, *args, **kwargs)
    (loss * grad_out).sum().backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("s", [0, 1, 4, 16])  # 0: standard [b, L] labels
@pytest.mark.parametrize("weighting", ["uniform", "power-law"])
@pytest.mark.parametrize("chunk", [5, 1000])
@pytest.mark.parametrize("uniform_grad", [True, False])
def test_fused_output_loss_equals_unfused(s, weighting, chunk, uniform_grad):
    hidden, weight, targets, mask = _fused_case(s)
    weights = weights_for(weighting, s) if s > 1 else None
    positions = mask if s == 0 else (mask.amax(-1) > 0).float()
    # Megatron's schedule feeds back one value per unmasked position; anything else recomputes
    grad_out = positions * 0.37 if uniform_grad else torch.randn(positions.shape)
    got = _grads(fused_output_multi_hot_cross_entropy, hidden, weight, targets, mask,
                 weights=weights, chunk_tokens=chunk, grad_out=grad_out)  # fmt: skip
    ref = _grads(_unfused, hidden, weight, targets, mask, weights, grad_out=grad_out)
    for a, b, name in zip(got, ref, ("loss", "hidden grad", "weight grad"), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_output_loss_without_grad_and_in_half_precision(dtype):
    hidden, weight, targets, mask = _fused_case(4)
    with torch.no_grad():
        loss = fused_output_multi_hot_cross_entropy(hidden, weight, targets, mask, chunk_tokens=4)
    torch.testing.assert_close(loss, _unfused(hidden, weight, targets, mask, None), atol=1e-5,
                               rtol=1e-5)  # fmt: skip
    active = (mask.amax(-1) > 0).float()
    varying = active * torch.linspace(0.5, 1.5, active.numel()).view(active.shape)
    for grad_out in (active, varying):  # Megatron's one value, and the exact recompute path
        got = _grads(fused_output_multi_hot_cross_entropy, hidden.to(dtype), weight.to(dtype),
                     targets, mask, chunk_tokens=4, grad_out=grad_out)  # fmt: skip
        ref = _grads(_unfused, hidden.to(dtype), weight.to(dtype), targets, mask, None,
                     grad_out=grad_out)  # fmt: skip
        assert got[1].dtype == got[2].dtype == dtype
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def _half_grads(dtype=torch.bfloat16):
    hidden, weight, targets, mask = _fused_case(4)
    grad_out = (mask.amax(-1) > 0).float() * 0.5
    got = _grads(fused_output_multi_hot_cross_entropy, hidden.to(dtype), weight.to(dtype),
                 targets, mask, chunk_tokens=4, grad_out=grad_out)  # fmt: skip
    ref = _grads(_unfused, hidden.to(dtype), weight.to(dtype), targets, mask, None,
                 grad_out=grad_out)  # fmt: skip
    for a, b, name in zip(got, ref, ("loss", "hidden grad", "weight grad"), strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2, msg=name)


def _accumulation_lines(capsys) -> list[str]:
    out = capsys.readouterr().out.splitlines()
    return [line for line in out if "weight-gradient accumulation" in line]


@pytest.fixture
def fresh_accumulation(monkeypatch):
    probe = fused_output.weight_grad_accumulation
    monkeypatch.setattr(fused_output, "_reported", set())
    probe.cache_clear()
    yield
    probe.cache_clear()


def test_fused_output_loss_fallback_accumulation_is_reported_once(capsys, fresh_accumulation):
    """On the CPU the weight gradient takes the fallback (separate GEMM, fp32 add): equal to
    the unfused reference, and one line per device and dtype says so."""
    for dtype in (torch.bfloat16, torch.bfloat16, torch.float16, torch.float32):
        _half_grads(dtype)
    assert _accumulation_lines(capsys) == [
        "fused output loss: weight-gradient accumulation on cpu, torch.bfloat16: "
        "separate GEMM + fp32 add",
        "fused output loss: weight-gradient accumulation on cpu, torch.float16: "
        "separate GEMM + fp32 add",
        "fused output loss: weight-gradient accumulation on cpu, torch.float32: fp32 addmm_",
    ]


def test_fused_output_loss_calls_apex_like_megatron(capsys, fresh_accumulation, monkeypatch):
    """Where apex's kernel is chosen it is called as Megatron-Core's linears call it,
    ``wgrad_gemm_accum_fp32(input [c, h], grad_output [c, V], main_grad [V, h] fp32)``
    (a stand-in module on the CPU), and imported only then."""
    calls = []

    def wgrad_gemm_accum_fp32(inputs, grad_output, main_grad):
        calls.append((inputs.shape, grad_output.shape, main_grad.dtype))
        main_grad.add_(grad_output.t().float() @ inputs.float())

    fake = type(sys)("fused_weight_gradient_mlp_cuda")
    fake.wgrad_gemm_accum_fp32 = wgrad_gemm_accum_fp32
    monkeypatch.setitem(sys.modules, "fused_weight_gradient_mlp_cuda", fake)
    monkeypatch.setattr(fused_output, "weight_grad_accumulation",
                        lambda device, dtype: fused_output.APEX_ACCUMULATION)  # fmt: skip
    _half_grads()
    assert calls and calls[0] == ((4, 16), (4, 53), torch.float32)
    assert _accumulation_lines(capsys) == [
        "fused output loss: weight-gradient accumulation on cpu, torch.bfloat16: "
        "apex wgrad_gemm_accum_fp32"
    ]


def test_fused_output_loss_adds_to_main_grad_with_gradient_accumulation_fusion():
    """Like mcore's linear: main_grad += dW, a dummy is returned (zeros for a tied weight)."""
    hidden, weight, targets, mask = _fused_case(4)
    grad_out = (mask.amax(-1) > 0).float() * 0.5
    _, _, ref_w = _grads(_unfused, hidden, weight, targets, mask, None, grad_out=grad_out)
    for tied in (False, True):
        w = weight.clone().requires_grad_()
        w.main_grad = torch.full_like(w, 2.0)
        w.grad_added_to_main_grad = False
        if tied:
            w.zero_out_wgrad = True
        loss = fused_output_multi_hot_cross_entropy(
            hidden, w, targets, mask, chunk_tokens=4, gradient_accumulation_fusion=True
        )
        (loss * grad_out).sum().backward()
        torch.testing.assert_close(w.main_grad, ref_w + 2.0, atol=1e-5, rtol=1e-5)
        assert w.grad_added_to_main_grad
        if tied:
            assert torch.all(w.grad == 0)


def test_fused_output_loss_keeps_no_logits():
    """The largest tensor alive is the weight-sized gradient, never [tokens, V]."""
    hidden, weight, targets, mask = _fused_case(4, L=64, b=2, h=8, V=500)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _LargestTensor() as probe:
        loss = fused_output_multi_hot_cross_entropy(h, w, targets, mask, chunk_tokens=8)
        loss.sum().backward()
    assert probe.largest <= max(w.numel(), 8 * 500) < 128 * 500


def test_fused_output_loss_rejects_bad_input():
    hidden, weight, targets, _ = _fused_case(4)
    message = r"output_weight \(53, 15\) must be \[V/TP, h\] with h = 16"
    with pytest.raises(ValueError, match=message):
        fused_output_multi_hot_cross_entropy(hidden, weight[:, :15], targets)
    with pytest.raises(ValueError, match=r"targets \(2, 8, 4\) do not match hidden \[L, b\]"):
        fused_output_multi_hot_cross_entropy(hidden, weight, targets[:, :8])
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1, got -2"):
        fused_output_multi_hot_cross_entropy(hidden, weight, targets, chunk_tokens=-2)


# ---------------------------------------------------------------------------- KL form


def _entropy_by_counting(targets, mask, weights):
    b, L, s = targets.shape
    out = torch.zeros(b, L)
    for i in range(b):
        for j in range(L):
            mass: dict[int, float] = {}
            for k in range(s):
                w = float(mask[i, j, k]) * (1.0 if weights is None else float(weights[k]))
                mass[int(targets[i, j, k])] = mass.get(int(targets[i, j, k]), 0.0) + w
            total = sum(mass.values())
            if total > 0:
                out[i, j] = -sum(m / total * math.log(m / total) for m in mass.values() if m)
    return out


@pytest.mark.parametrize("weighting", ["uniform", "power-law", "first-token"])
def test_target_entropy_and_kl_floor(weighting):
    _, targets, mask, _ = make_case(4)
    weights = weights_for(weighting, 4)
    entropy = target_entropy(targets, mask, weights)
    torch.testing.assert_close(entropy, _entropy_by_counting(targets, mask, weights))
    distinct = torch.tensor([[[1, 2, 3, 4]]])
    assert target_entropy(distinct, None, None).item() == pytest.approx(math.log(4))
    # at the optimum (softmax = target distribution) MCE equals the entropy: KL form is 0
    p = torch.zeros(1, 1, 10)
    for k, w in zip([1, 1, 2, 3], [1.0, 2.0, 3.0, 2.0], strict=True):
        p[0, 0, k] += w / 8
    opt_logits = torch.log(p.clamp(min=1e-12))
    bag = torch.tensor([[[1, 1, 2, 3]]])
    w = torch.tensor([1.0, 2.0, 3.0, 2.0])
    mce = multi_hot_cross_entropy(opt_logits, bag, weights=w)
    assert (mce - target_entropy(bag, None, w)).item() == pytest.approx(0.0, abs=1e-5)

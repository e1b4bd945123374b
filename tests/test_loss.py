"""Multi-hot CE against a naive reference built from s ordinary cross-entropies (TP = 1).

The TP = 2 (vocab split across ranks) checks are in test_parallel_equivalence.py.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tst_megatron.loss import multi_hot_cross_entropy


def naive_multi_hot_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor):
    """s separate F.cross_entropy calls on full-vocab logits, averaged over unmasked targets."""
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
    mask = mask.float()
    return (per_target * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def make_case(s: int, seed: int = 0, L: int = 7, b: int = 3, V: int = 97):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(L, b, V, generator=g) * 3
    targets = torch.randint(0, V, (b, L, s), generator=g)
    if s > 1:
        targets[0, 0, :] = 5  # a bag of one repeated token
        targets[1, 2, 1] = targets[1, 2, 0]  # a repeat inside a bag
    mask = torch.rand(b, L, s, generator=g) > 0.25
    mask[-1, 3, :] = False  # a fully masked position
    grad_out = torch.randn(b, L, generator=g)
    return logits, targets, mask, grad_out


def loss_and_grad(fn, logits, *args, grad_out):
    leaf = logits.clone().requires_grad_()
    loss = fn(leaf.clone(), *args)
    (loss * grad_out).sum().backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("s", [1, 2, 4, 16])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_naive_reference(s, masked):
    logits, targets, mask, grad_out = make_case(s)
    if not masked:
        mask = torch.ones_like(mask)
    got, got_grad = loss_and_grad(
        multi_hot_cross_entropy, logits, targets, mask if masked else None, grad_out=grad_out
    )
    ref, ref_grad = loss_and_grad(naive_multi_hot_ce, logits, targets, mask, grad_out=grad_out)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, ref_grad, atol=1e-5, rtol=1e-5)
    if masked:
        assert got[-1, 3] == 0 and torch.all(got_grad[3, -1] == 0)


def test_gradient_formula_with_repeats():
    """d/dz = softmax(z) - (1/s) * sum_k onehot(y_k): a repeated token gets 2/s."""
    V = 11
    z = torch.randn(1, 1, V)
    y = torch.tensor([[[3, 3, 7, 1]]])
    _, grad = loss_and_grad(multi_hot_cross_entropy, z, y, grad_out=torch.ones(1, 1))
    expected = torch.softmax(z, -1).clone()
    expected[0, 0, 3] -= 2 / 4
    expected[0, 0, 7] -= 1 / 4
    expected[0, 0, 1] -= 1 / 4
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
        loss = multi_hot_cross_entropy(leaf.clone(), targets)
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
        ((4, 2, 10), (4, 2, 3), None, "targets (4, 2, 3) do not match logits (4, 2, 10)"),
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

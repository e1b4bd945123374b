"""Output layer and (multi-hot) cross-entropy in one pass over token chunks: no logits kept.

The unfused path materialises the logits ``[L*b, V/TP]`` (and their fp32 copy) and keeps
them for the backward: about 12 GB for a 16k-token micro-batch of a 128k vocabulary. Here,
for each chunk of ``c`` tokens, the forward computes the logits ``x_c W^T`` ``[c, V/TP]``,
the vocab-parallel log-sum-exp, the loss, and at once the gradient with respect to the
logits for a unit loss gradient, which it turns into the chunk's hidden-state gradient
``[c, h]`` and adds to the output-weight gradient ``[V/TP, h]`` (fp32). Only those two
gradients outlive the chunk. The backward then scales them by the incoming loss gradient:

- hidden-state gradient: row ``i`` scales by ``dloss_i`` (exact for any loss gradient);
- weight gradient: ``sum_i dloss_i G_i`` equals ``dloss * sum_i G_i`` when ``dloss_i`` is
  one value on every position that has a loss, which is what Megatron-Core's schedule feeds
  back (mean over unmasked positions, divided by the micro-batch count, times the loss
  scale). Any other loss gradient is handled exactly by recomputing the chunks' logits with
  the saved log-sum-exp (one more GEMM per chunk, no extra communication).

Like `ColumnParallelLinear`, sequence-parallel hidden states ``[L/TP, b, h]`` are all-gathered
in the forward and their gradient reduce-scattered in the backward; without sequence
parallelism the hidden-state gradient is all-reduced over the tensor-parallel group. With
``gradient_accumulation_fusion`` the weight gradient is added to ``weight.main_grad`` (the
DDP buffer) and a dummy gradient is returned, exactly as
`LinearWithGradAccumulationAndAsyncCommunication` does; otherwise autograd receives it and
DDP's hook adds it to ``main_grad``.

Each chunk's weight gradient is added to the fp32 one by the first of apex's
``wgrad_gemm_accum_fp32`` (Megatron-Core's kernel for ``main_grad``), torch's fp32-accumulating
``addmm`` and a separate GEMM + fp32 add that runs (`weight_grad_accumulation`); one line per
process, device and dtype names it.

Vocab-parallel statistics need one collective per chunk: an all-gather of each rank's
``(max, sum of exp, owned target logits)`` ``[c, 2+s]``, combined locally.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import mappings

from tst_megatron.loss.multi_hot import IGNORE_TARGET, check_targets, owned_targets, rank_and_size
from tst_megatron.loss.target_weights import normalized_target_weights

MIN_CHUNK_TOKENS = 256


def default_chunk_tokens(hidden_size: int) -> int:
    """Tokens per chunk: a quarter of the hidden size, at least `MIN_CHUNK_TOKENS`.

    The chunk's fp32 logits ``[c, V/TP]`` are then a quarter of the fp32 weight gradient
    ``[V/TP, h]`` that the loss keeps anyway, and a chunk's GEMMs stay large (``c >= 256``).
    """
    return max(MIN_CHUNK_TOKENS, hidden_size // 4)


APEX_ACCUMULATION = "apex wgrad_gemm_accum_fp32"
TORCH_ACCUMULATION = "torch.addmm(out_dtype=torch.float32)"
SEPARATE_ACCUMULATION = "separate GEMM + fp32 add"
FP32_ACCUMULATION = "fp32 addmm_"
ACCUMULATION_PATHS = (APEX_ACCUMULATION, TORCH_ACCUMULATION, SEPARATE_ACCUMULATION,
                      FP32_ACCUMULATION)  # fmt: skip


def _apex_wgrad_accumulate():
    """apex's ``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32`` (imported lazily, as
    Megatron-Core's linears use it), or None where apex's CUDA extension is not installed."""
    try:
        import fused_weight_gradient_mlp_cuda
    except ImportError:
        return None
    return fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32


def _accumulates(add, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``add(fp32 C, low-precision ones)`` runs and leaves ``C + A^T B`` in ``C``."""
    out = torch.ones(2, 2, device=device)
    ones = torch.ones(2, 2, device=device, dtype=dtype)
    try:
        add(out, ones)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return bool((out == 3).all())  # accumulated in place: 1 + (1*1 + 1*1)


@functools.cache
def weight_grad_accumulation(device: torch.device, dtype: torch.dtype) -> str:
    """How a chunk's weight gradient ``[V/TP, h]`` is added to the fp32 one for ``dtype``
    operands on ``device`` (probed once per pair), the first that runs of:

    1. `APEX_ACCUMULATION`: apex's ``wgrad_gemm_accum_fp32``, the kernel Megatron-Core's
       linears accumulate ``main_grad`` with (one GEMM that adds into fp32);
    2. `TORCH_ACCUMULATION`: ``torch.addmm(C, A, B, out_dtype=fp32, out=C)``, one cuBLAS GEMM
       that adds into fp32 (PyTorch 2.8/2.9 refuse an fp32 ``C`` with low-precision
       operands, pytorch issue 154086; later releases take it);
    3. `SEPARATE_ACCUMULATION`: the product in the operands' dtype into a reused buffer, then
       an fp32 add: about one more GEMM's time per chunk on a GPU (the CPU's only path).

    fp32 operands take `FP32_ACCUMULATION` (``C.addmm_``).
    """
    if dtype == torch.float32:
        return FP32_ACCUMULATION
    if device.type == "cpu":
        return SEPARATE_ACCUMULATION
    apex = _apex_wgrad_accumulate()
    if apex is not None and _accumulates(lambda c, ones: apex(ones, ones, c), device, dtype):
        return APEX_ACCUMULATION

    def torch_add(c, ones):
        torch.addmm(c, ones, ones, out_dtype=torch.float32, out=c)

    if _accumulates(torch_add, device, dtype):
        return TORCH_ACCUMULATION
    return SEPARATE_ACCUMULATION


_reported: set[tuple[torch.device, torch.dtype]] = set()


def _report_accumulation(device: torch.device, dtype: torch.dtype, path: str) -> None:
    """One line per process, device and dtype at the first backward that accumulates (on
    global rank 0 only when torch.distributed is initialised)."""
    if (device, dtype) in _reported:
        return
    _reported.add((device, dtype))
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    print(
        f"fused output loss: weight-gradient accumulation on {device}, {dtype}: {path}",
        flush=True,
    )


class _ChunkWorkspace:
    """Buffers every chunk reuses: the logits ``[c, V/TP]`` in fp32 (and in the weight's
    dtype when that is lower), and, where the weight gradient takes
    `SEPARATE_ACCUMULATION` (the CPU, or a GPU without apex's kernel or torch's
    fp32-accumulating mixed GEMM), the ``[V/TP, h]`` product a chunk adds to the fp32 weight
    gradient.

    Reusing them is what keeps the chunk loop as fast as one big GEMM on a CPU: a fresh
    32 MiB buffer per chunk is a fresh mapping that page-faults on first touch (measured:
    the chunk's output GEMM took 1.2x as long into a new tensor as into a reused one). CUDA's
    caching allocator would reuse the blocks anyway; the peak memory is the same. On CUDA
    the weight gradient is accumulated by the GEMM itself: a separate product and add would
    move ``3 x V/TP x h`` elements per chunk, as many bytes as the GEMM's own work takes time.
    """

    def __init__(self, chunk_tokens: int, weight: torch.Tensor, weight_grad: bool) -> None:
        rows, device = chunk_tokens, weight.device
        self.logits = torch.empty(rows, weight.shape[0], dtype=torch.float32, device=device)
        self.low = self.product = self.accumulation = None
        if weight.dtype != torch.float32:
            self.low = torch.empty(rows, weight.shape[0], dtype=weight.dtype, device=device)
        if weight_grad:
            self.accumulation = weight_grad_accumulation(device, weight.dtype)
            _report_accumulation(device, weight.dtype, self.accumulation)
            if self.accumulation == SEPARATE_ACCUMULATION:
                self.product = torch.empty_like(weight)

    def chunk_logits(self, x_c: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x_c W^T`` ``[c, V/TP]`` in fp32 (rounded through the weight's dtype, as the
        unfused output layer's logits are), written into the reused buffer."""
        rows = x_c.shape[0]
        if self.low is None:
            return torch.mm(x_c, weight.t(), out=self.logits[:rows])
        low = torch.mm(x_c, weight.t(), out=self.low[:rows])
        return self.logits[:rows].copy_(low)

    def low_precision(self, grad_logits: torch.Tensor) -> torch.Tensor:
        """``grad_logits`` in the weight's dtype (the GEMM operands' dtype)."""
        if self.low is None:
            return grad_logits
        return self.low[: grad_logits.shape[0]].copy_(grad_logits)

    def add_weight_grad(self, grad_w: torch.Tensor, grad_logits: torch.Tensor,
                        x_c: torch.Tensor) -> None:  # fmt: skip
        """``grad_w += grad_logits^T x_c``, ``grad_w`` fp32 (`weight_grad_accumulation`)."""
        if self.accumulation == FP32_ACCUMULATION:
            grad_w.addmm_(grad_logits.t(), x_c)
        elif self.accumulation == APEX_ACCUMULATION:  # main_grad += grad_output^T input
            _apex_wgrad_accumulate()(x_c, grad_logits, grad_w)
        elif self.accumulation == TORCH_ACCUMULATION:
            torch.addmm(grad_w, grad_logits.t(), x_c, out_dtype=torch.float32, out=grad_w)
        else:
            grad_w.add_(torch.mm(grad_logits.t(), x_c, out=self.product))


class _FusedOutputCrossEntropy(torch.autograd.Function):
    """``hidden [T, b, h]`` (SP: ``[T/TP, b, h]``), ``weight [V/TP, h]`` -> loss ``[T, b]``."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        target_probs: torch.Tensor,
        tp_group: dist.ProcessGroup | None,
        sequence_parallel: bool,
        gradient_accumulation_fusion: bool,
        chunk_tokens: int,
        compute_grads: bool,
    ) -> torch.Tensor:
        tp_rank, tp_size = rank_and_size(tp_group)
        full = mappings._gather_along_first_dim(hidden, tp_group) if sequence_parallel else hidden
        seq, batch, h = full.shape
        x = full.reshape(seq * batch, h)
        tokens, width = x.shape[0], targets.shape[-1]
        flat_targets = targets.reshape(tokens, width)
        probs = target_probs.reshape(tokens, width)
        active = probs.sum(dim=-1) > 0
        partition_vocab = weight.shape[0]
        local_index, owned = owned_targets(
            flat_targets, tp_rank * partition_vocab, partition_vocab
        )

        loss = torch.empty(tokens, dtype=torch.float32, device=x.device)
        lse = torch.empty(tokens, dtype=torch.float32, device=x.device)
        grad_x = grad_w = None
        if compute_grads:
            grad_x = torch.empty(tokens, h, dtype=torch.float32, device=x.device)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
        workspace = _ChunkWorkspace(min(chunk_tokens, tokens), weight, compute_grads)
        for start in range(0, tokens, chunk_tokens):
            rows = slice(start, min(start + chunk_tokens, tokens))
            loss[rows], lse[rows] = _forward_chunk(
                x[rows], weight, local_index[rows], owned[rows], probs[rows], active[rows],
                tp_group, tp_size, workspace, None if grad_x is None else grad_x[rows], grad_w,
            )  # fmt: skip

        ctx.tp_group, ctx.sequence_parallel = tp_group, sequence_parallel
        ctx.gradient_accumulation_fusion = gradient_accumulation_fusion
        ctx.chunk_tokens = chunk_tokens
        ctx.save_for_backward(hidden, weight, grad_x, grad_w, local_index, owned, probs, lse)
        return loss.view(seq, batch)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, weight, grad_x, grad_w, local_index, owned, probs, lse = ctx.saved_tensors
        if grad_x is None:
            raise RuntimeError(
                "fused output loss: the forward ran without gradients (under no_grad, or with "
                "neither the hidden states nor the weight requiring grad)"
            )
        group, size = ctx.tp_group, rank_and_size(ctx.tp_group)[1]
        g = grad_loss.reshape(-1).float()
        active = probs.sum(dim=-1) > 0
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            grad_x.mul_(g.unsqueeze(-1))
            grad_full = grad_x.to(hidden.dtype).view(-1, *hidden.shape[1:])
            if ctx.sequence_parallel:
                grad_hidden = mappings._reduce_scatter_along_first_dim(grad_full, group)
            else:
                grad_hidden = mappings._reduce(grad_full, group) if size > 1 else grad_full
        grad_weight = None
        if ctx.needs_input_grad[1]:
            g_active = g[active]
            if not g_active.numel():
                grad_w.zero_()
            elif bool(g_active.amax() == g_active.amin()):  # one value: Megatron's schedule
                grad_w.mul_(g_active[0])
            else:  # a loss gradient that differs between positions: recompute exactly
                full = hidden
                if ctx.sequence_parallel:
                    full = mappings._gather_along_first_dim(hidden, group)
                x = full.reshape(-1, full.shape[-1])
                grad_w.zero_()
                _weight_grad(grad_w, x, weight, g * active, lse, local_index, owned, probs,
                             ctx.chunk_tokens)  # fmt: skip
            grad_weight = _hand_over_weight_grad(weight, grad_w, ctx.gradient_accumulation_fusion)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def _forward_chunk(x_c, weight, index_c, owned_c, probs_c, active_c, tp_group, tp_size,
                   workspace, grad_x_c, grad_w) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Loss and log-sum-exp ``[c]`` of one chunk of ``c`` tokens; with ``grad_x_c`` also its
    hidden-state gradient (written there) and weight gradient (added to ``grad_w``) for a
    unit loss gradient. The chunk's ``[c, V/TP]`` logits live in ``workspace``'s buffers."""
    logits = workspace.chunk_logits(x_c, weight)
    stats = torch.empty(x_c.shape[0], 2 + index_c.shape[-1], dtype=torch.float32,
                        device=x_c.device)  # fmt: skip
    stats[:, 2:] = logits.gather(-1, index_c).masked_fill_(~owned_c, 0.0)
    local_max = logits.max(dim=-1)[0]
    stats[:, 0] = local_max
    logits.sub_(local_max.unsqueeze(-1)).exp_()
    stats[:, 1] = logits.sum(dim=-1)
    lse_c, target_logits = _combine_vocab_shards(stats, tp_group, tp_size)
    loss_c = (lse_c - (probs_c * target_logits).sum(dim=-1)) * active_c
    if grad_x_c is None:
        return loss_c, lse_c
    # logits now hold exp(z - local max): the softmax is one row scale away
    grad_logits = logits.mul_((torch.exp(local_max - lse_c) * active_c).unsqueeze(-1))
    grad_logits.scatter_add_(-1, index_c, -(probs_c * owned_c))
    grad_logits = workspace.low_precision(grad_logits)
    if grad_x_c.dtype == grad_logits.dtype:
        torch.mm(grad_logits, weight, out=grad_x_c)
    else:
        grad_x_c.copy_(torch.mm(grad_logits, weight))
    workspace.add_weight_grad(grad_w, grad_logits, x_c)
    return loss_c, lse_c


def _combine_vocab_shards(
    stats: torch.Tensor, group: dist.ProcessGroup | None, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(log-sum-exp over the whole vocabulary, target logits)`` from each shard's
    ``[c, 2+s]`` ``(max, sum exp(z - max), owned target logits)``."""
    if size == 1:
        return stats[:, 0] + torch.log(stats[:, 1]), stats[:, 2:]
    gathered = torch.empty(size * stats.shape[0], stats.shape[1], dtype=stats.dtype,
                           device=stats.device)  # fmt: skip
    dist.all_gather_into_tensor(gathered, stats.contiguous(), group=group)
    shards = gathered.view(size, *stats.shape)
    global_max = shards[:, :, 0].amax(dim=0)
    sum_exp = (shards[:, :, 1] * torch.exp(shards[:, :, 0] - global_max)).sum(dim=0)
    return global_max + torch.log(sum_exp), shards[:, :, 2:].sum(dim=0)


def _weight_grad(grad_w, x, weight, g, lse, local_index, owned, probs, chunk_tokens) -> None:
    """``grad_w += sum_i g_i * dloss_i/dW`` over chunks, from the saved log-sum-exp."""
    workspace = _ChunkWorkspace(min(chunk_tokens, x.shape[0]), weight, weight_grad=True)
    for start in range(0, x.shape[0], chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, x.shape[0]))
        logits = workspace.chunk_logits(x[rows], weight)
        grad_logits = logits.sub_(lse[rows].unsqueeze(-1)).exp_().mul_(g[rows].unsqueeze(-1))
        target_grad = probs[rows] * g[rows].unsqueeze(-1) * owned[rows]
        grad_logits.scatter_add_(-1, local_index[rows], -target_grad)
        workspace.add_weight_grad(grad_w, workspace.low_precision(grad_logits), x[rows])


def _hand_over_weight_grad(
    weight: torch.Tensor, grad_w: torch.Tensor, gradient_accumulation_fusion: bool
) -> torch.Tensor | None:
    """The weight gradient as `LinearWithGradAccumulationAndAsyncCommunication` returns it.

    With gradient-accumulation fusion and a DDP ``main_grad``, add it there and return a
    dummy (zeros where ``zero_out_wgrad`` asks for them: a weight shared with the embedding on
    the same stage, whose gradient DDP's hook adds to ``main_grad`` after this one).
    """
    if not (gradient_accumulation_fusion and hasattr(weight, "main_grad")):
        return grad_w if grad_w.dtype == weight.dtype else grad_w.to(weight.dtype)
    weight.main_grad.add_(grad_w)
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    dummy = grad_w if grad_w.dtype == weight.dtype else torch.empty_like(weight)
    return dummy.zero_() if getattr(weight, "zero_out_wgrad", False) else dummy


def fused_output_multi_hot_cross_entropy(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    targets: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    weights: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    *,
    sequence_parallel: bool = False,
    gradient_accumulation_fusion: bool = False,
) -> torch.Tensor:
    """Output layer + multi-hot (or standard) cross-entropy without keeping the logits.

    Equal to ``multi_hot_cross_entropy(hidden @ output_weight.T, targets, ...)`` (and, for
    ``[b, L]`` targets, to Megatron's vocab-parallel cross-entropy) in value and gradients.

    Args:
        hidden: ``[L, b, h]`` final hidden states (``[L/TP, b, h]`` with sequence parallel).
        output_weight: ``[V/TP, h]`` this rank's vocabulary shard of the output layer (the
            embedding table when tied).
        targets: ``[b, L, s]`` target ids (multi-hot), or ``[b, L]`` (standard CE); a
            negative id (``IGNORE_TARGET``) is masked.
        loss_mask: optional, the targets' shape; 0 drops a target.
        tp_group: tensor-parallel group of the vocabulary split (None: whole vocabulary).
        weights: optional ``[s]`` bag-loss weights (None = uniform).
        chunk_tokens: tokens per chunk (default `default_chunk_tokens`).
        sequence_parallel: ``hidden`` is sharded along the sequence over ``tp_group``.
        gradient_accumulation_fusion: add the weight gradient to ``output_weight.main_grad``
            (Megatron-Core's DDP buffer) instead of returning it.

    Returns:
        ``[b, L]`` fp32 per-position loss (0 where no target of positive weight is left).
    """
    standard = targets.dim() == 2
    if standard:
        targets = targets.unsqueeze(-1)
        loss_mask = None if loss_mask is None else loss_mask.unsqueeze(-1)
    seq = hidden.shape[0] * (rank_and_size(tp_group)[1] if sequence_parallel else 1)
    check_targets(torch.Size((seq, hidden.shape[1])), targets, loss_mask, "hidden",
                  "[L, b, h]", hidden.dim())  # fmt: skip
    if output_weight.dim() != 2 or output_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"output_weight {tuple(output_weight.shape)} must be [V/TP, h] with h = "
            f"{hidden.shape[-1]} (the hidden states' last dimension)"
        )
    chunk = chunk_tokens or default_chunk_tokens(hidden.shape[-1])
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if loss_mask is not None:
        targets = targets.masked_fill(loss_mask == 0, IGNORE_TARGET)
    targets = targets.transpose(0, 1).contiguous()
    probs = normalized_target_weights(targets >= 0, None if standard else weights)
    compute_grads = torch.is_grad_enabled() and (
        hidden.requires_grad or output_weight.requires_grad
    )
    loss = _FusedOutputCrossEntropy.apply(
        hidden, output_weight, targets, probs, tp_group, sequence_parallel,
        gradient_accumulation_fusion, chunk, compute_grads,
    )  # fmt: skip
    return loss.transpose(0, 1)

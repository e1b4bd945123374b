"""`TSTGPTModel`: Megatron-Core's `GPTModel` with the TST hooks and nothing else.

Why a subclass rather than a wrapper: the hooks sit on seams `GPTModel` already has —
the ``decoder_input`` argument of `GPTModel.forward` (input side), and
`compute_language_model_loss` / `_postprocess` (output side) — so the pipeline schedules,
DDP, the distributed optimizer and `dist_checkpointing` see an ordinary `GPTModel`. The
subclass adds no parameters or buffers: its ``state_dict`` and ``sharded_state_dict`` keys
are exactly stock `GPTModel`'s, so any checkpoint it writes loads into plain Megatron-Core.

What a forward does depends on `phase_spec` (set with `set_phase`):
- standard (s = 1, phase 2, baseline): exactly `GPTModel.forward`.
- bag input (modes full, input-only): on the first pipeline stage, the ``[b, s*L]`` token
  ids are embedded with the model's own (vocab-parallel) word embedding and averaged per bag
  *before* the tensor-parallel reduction, so the reduce(-scatter) moves ``[L, b, h]`` like a
  standard step; then the latent position embedding, the sequence-parallel scatter and
  dropout follow as in `LanguageModelEmbedding`. The result is the ``[L, b, h]`` decoder
  input (``[L/TP, b, h]`` under sequence parallel). Later stages receive hidden states.
- multi-hot targets (modes full, output-only; ``labels`` of shape ``[b, L, s]``): the loss
  is `tst_megatron.loss.multi_hot_cross_entropy` on the vocab-parallel logits, weighted by
  the phase's bag-loss weights.
- ``fused_output_loss``: the output layer and the loss (multi-hot or standard) run as
  `tst_megatron.loss.fused_output_multi_hot_cross_entropy`, which never keeps the logits.

Both hooks read parameters outside their module's ``forward`` (the word and position
embeddings, the output weight). They run as methods of those modules
(``embedding.tst_embed_bags``, ``output_layer.tst_fused_output_loss``, listed by
`TSTGPTModel.fsdp_forward_methods`), so a fully sharded wrapper can register them as forward
methods: torch FSDP2 then all-gathers the unit's parameters before them and reduce-scatters
their gradients as for ``forward``. Before reading a module's weight they also run that
module's plain forward pre-hooks (`run_forward_pre_hooks`), where Megatron-Core's DDP waits for
the weight's all-gather under ``--overlap-param-gather``.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel

from tst_megatron.bags import average_bags_batch_first
from tst_megatron.config import STANDARD_PHASE, PhaseSpec, TSTConfigError
from tst_megatron.loss import (
    IGNORE_TARGET,
    fused_output_multi_hot_cross_entropy,
    multi_hot_cross_entropy,
)


class TSTGPTModel(GPTModel):
    """A `GPTModel` (dense or MoE, local or Transformer Engine spec) that can run TST.

    Args:
        fused_output_loss: compute the output layer and the loss chunk by chunk without
            keeping the logits (``--tst-fused-output-loss``); the rest as `GPTModel`.
    """

    def __init__(self, *args, fused_output_loss: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.phase_spec: PhaseSpec = STANDARD_PHASE
        self.fused_output_loss = fused_output_loss
        if fused_output_loss and getattr(self.config, "mtp_num_layers", None):
            raise TSTConfigError(
                "the fused output loss replaces the output layer's logits, which multi-token "
                f"prediction needs (mtp_num_layers={self.config.mtp_num_layers})"
            )
        self._weights_on: dict[torch.device, torch.Tensor] = {}
        if self.pre_process:
            self.embedding.tst_embed_bags = MethodType(_embed_bags, self.embedding)
        if self.post_process:
            self.output_layer.tst_fused_output_loss = MethodType(
                _fused_output_loss, self.output_layer
            )

    def fsdp_forward_methods(self) -> list[tuple[torch.nn.Module, str]]:
        """``(module, method name)`` of the hooks that read a module's parameters outside its
        ``forward`` (for ``torch.distributed.fsdp.register_fsdp_forward_method``)."""
        methods = []
        if self.pre_process:
            methods.append((self.embedding, "tst_embed_bags"))
        if self.post_process:
            methods.append((self.output_layer, "tst_fused_output_loss"))
        return methods

    def set_phase(self, spec: PhaseSpec) -> None:
        """Switch how inputs and labels are interpreted; weights are untouched."""
        if not spec.is_standard and getattr(self.config, "mtp_num_layers", None):
            raise TSTConfigError(
                "TST phase 1 replaces the next-token target; it cannot be combined with "
                f"multi-token prediction (mtp_num_layers={self.config.mtp_num_layers})"
            )
        self.phase_spec = spec
        self._weights_on = {}

    def target_weights(self, device: torch.device) -> torch.Tensor | None:
        """``[s]`` fp32 bag-loss weights of the current phase on ``device`` (None = uniform)."""
        weights = self.phase_spec.target_weights
        if weights is None:
            return None
        if device not in self._weights_on:
            self._weights_on[device] = torch.tensor(weights, dtype=torch.float32, device=device)
        return self._weights_on[device]

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        decoder_input: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *args,
        loss_mask: torch.Tensor | None = None,
        bag_token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """`GPTModel.forward` plus the TST hooks.

        Args:
            input_ids: ``[b, s*L]`` in a bag phase, else ``[b, L]``.
            position_ids: ``[b, L]`` latent positions.
            labels: ``[b, L]`` (standard) or ``[b, L, s]`` (multi-hot).
            loss_mask: with multi-hot labels, ``[b, L, s]`` per-target mask.
            bag_token_mask: ``[b, s*L]`` bool, the tokens each bag averages
                (``--reset-attention-mask``, `tst_megatron.data.documents`); None = all.

        Returns:
            Per-position loss ``[b, L]`` when labels are given, else logits ``[b, L, V/TP]``.
        """
        bag_size = self.phase_spec.input_bag_size
        if bag_size > 1 and decoder_input is None and self.pre_process:
            decoder_input = self.embed_bags(input_ids, position_ids, bag_size, bag_token_mask)
        if labels is not None and labels.dim() == 3:
            if loss_mask is not None:
                labels = labels.masked_fill(loss_mask == 0, IGNORE_TARGET)
            loss_mask = None
        return super().forward(
            input_ids,
            position_ids,
            attention_mask,
            decoder_input,
            labels,
            *args,
            loss_mask=loss_mask,
            **kwargs,
        )

    def embed_bags(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        bag_size: int,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[b, s*L]`` token ids -> ``[L, b, h]`` bag-averaged decoder input.

        `LanguageModelEmbedding.forward` with the bag mean moved before the tensor-parallel
        reduction (averaging is linear): each rank averages its vocabulary shard's partial
        lookups in fp32, then ``[L, b, h]`` is all-reduced (or, under sequence parallel
        without a learned position table, reduce-scattered to this rank's ``[L/TP, b, h]``):
        the bytes of a standard step, not ``s`` times them. The latent position embedding is
        added once per bag (the mean of ``e_k + p_i`` is ``mean(e_k) + p_i``); dropout acts
        on the averaged decoder input, as on a standard step's embedding.
        ``token_mask`` ``[b, s*L]`` (bool) limits each average to the kept tokens (document
        masking); partial lookups of dropped tokens are left out of the sum before the
        reduction as well.
        """
        config = self.config
        latent = input_ids.shape[1] // bag_size
        tp_size = config.tensor_model_parallel_size
        if config.sequence_parallel and latent % tp_size:
            raise TSTConfigError(
                f"sequence parallel splits the {latent} latent positions of this sample over "
                f"tensor-parallel size {tp_size}; the latent sequence length must be a "
                "multiple of it"
            )
        return self.embedding.tst_embed_bags(input_ids, position_ids, bag_size, token_mask)

    def compute_language_model_loss(
        self, labels: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        """Standard CE for ``[b, L]`` labels; multi-hot CE for ``[b, L, s]`` labels.

        Args:
            labels: ``[b, L]`` or ``[b, L, s]`` (masked targets set to ``IGNORE_TARGET``).
            logits: ``[L, b, V/TP]`` vocab-parallel logits.

        Returns:
            ``[b, L]`` per-position loss.
        """
        if labels.dim() == 2:
            return super().compute_language_model_loss(labels, logits)
        return multi_hot_cross_entropy(
            logits, labels, tp_group=self.tp_group, weights=self.target_weights(logits.device)
        )

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        """`GPTModel._postprocess`, or the fused output loss when it is on and labels given."""
        if not (
            self.fused_output_loss
            and self.post_process
            and labels is not None
            and kwargs.get("inference_context") is None
            and not kwargs.get("mtp_in_postprocess")
        ):
            return super()._postprocess(
                hidden_states, input_ids, position_ids, labels, *args, **kwargs
            )
        shared = None
        if self.share_embeddings_and_output_weights:
            shared = self.shared_embedding_or_output_weight()
        standard = labels.dim() == 2
        return self.output_layer.tst_fused_output_loss(
            hidden_states,
            shared,
            labels,
            # a standard step masks positions in loss_func; masked positions skip the loss
            kwargs.get("loss_mask") if standard else None,
            None if standard else self.target_weights(hidden_states.device),
        )


def run_forward_pre_hooks(module: torch.nn.Module, *args: torch.Tensor) -> None:
    """Run ``module``'s own plain forward pre-hooks on ``args``, as ``module(*args)`` would.

    For code that reads ``module``'s parameters without calling it. Megatron-Core's DDP with
    ``overlap_param_gather`` registers such a hook on every module
    (``DistributedDataParallel._make_forward_pre_hook``): it waits for the all-gather of the
    module's own parameters (``finish_param_sync``) and dispatches the next bucket group's;
    until then the weight holds stale shards of the other data-parallel ranks. Running the
    hooks keeps this a property of the module (any hook there runs, whatever registered it)
    instead of a call into DDP's buckets. Hooks registered ``with_kwargs`` are left out: torch
    FSDP2 registers its pre-forward that way, and runs it for these methods itself through
    ``register_fsdp_forward_method``. Global hooks are not run (as for a module with
    none). A hook may not replace the inputs: nothing here would feed them on.
    """
    for hook_id, hook in module._forward_pre_hooks.items():
        if hook_id in module._forward_pre_hooks_with_kwargs:
            continue
        if hook(module, args) is not None:
            raise RuntimeError(
                f"a forward pre-hook of {type(module).__name__} ({hook!r}) returned new inputs; "
                "TST reads this module's weight outside its forward and cannot pass them on"
            )


def _vocab_shard_lookup(words, input_ids: torch.Tensor) -> torch.Tensor:
    """``[b, n, h]`` this rank's partial lookups: `VocabParallelEmbedding.forward` without
    the tensor-parallel reduction (ids outside the shard give zeros)."""
    if words.tp_group.size() == 1:
        ids, foreign = input_ids, None
    else:
        foreign = (input_ids < words.vocab_start_index) | (input_ids >= words.vocab_end_index)
        ids = (input_ids - words.vocab_start_index).masked_fill(foreign, 0)
    out = words.weight[ids] if words.deterministic_mode else F.embedding(ids, words.weight)
    if foreign is not None:
        out = out.masked_fill(foreign.unsqueeze(-1), 0.0)
    return out


def _embed_bags(
    embedding,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    bag_size: int,
    token_mask: torch.Tensor | None,
) -> torch.Tensor:
    """``embedding.tst_embed_bags``: the body of `TSTGPTModel.embed_bags` on the model's
    `LanguageModelEmbedding` (``[b, s*L]`` ids -> ``[L, b, h]``, see there)."""
    config = embedding.config
    words = embedding.word_embeddings
    run_forward_pre_hooks(embedding)  # GPTModel calls it with keyword arguments only
    run_forward_pre_hooks(words, input_ids)
    partial = average_bags_batch_first(
        _vocab_shard_lookup(words, input_ids), bag_size, token_mask
    )
    partial = partial.transpose(0, 1).contiguous()  # [L, b, h]
    if embedding.reduce_scatter_embeddings:
        out = tensor_parallel.reduce_scatter_to_sequence_parallel_region(
            partial, group=words.tp_group
        )
    else:
        out = tensor_parallel.reduce_from_tensor_model_parallel_region(
            partial, group=words.tp_group
        )
    if embedding.add_position_embedding:
        out = out + embedding.position_embeddings(position_ids).transpose(0, 1)
    if config.fp32_residual_connection:
        out = out.float()
    if not config.sequence_parallel:
        return embedding.embedding_dropout(out)
    if not embedding.reduce_scatter_embeddings and embedding.scatter_to_sequence_parallel:
        out = tensor_parallel.scatter_to_sequence_parallel_region(out, group=words.tp_group)
    if config.clone_scatter_output_in_embedding and embedding.scatter_to_sequence_parallel:
        out = out.clone()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        return embedding.embedding_dropout(out)


def _fused_output_loss(
    output_layer,
    hidden_states: torch.Tensor,
    shared_weight: torch.Tensor | None,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None,
    weights: torch.Tensor | None,
) -> torch.Tensor:
    """``output_layer.tst_fused_output_loss``: the output layer (its own weight, or the tied
    embedding weight ``shared_weight``) and the loss without logits; ``[b, L]`` per position.
    A tied ``shared_weight`` belongs to the word embedding, whose hooks ran earlier in this
    forward on the same stage (as for `GPTModel`, whose output layer owns no weight then)."""
    run_forward_pre_hooks(output_layer, hidden_states)
    return fused_output_multi_hot_cross_entropy(
        hidden_states,
        output_layer.weight if shared_weight is None else shared_weight,
        labels,
        loss_mask=loss_mask,
        tp_group=output_layer.tp_group,
        weights=weights,
        sequence_parallel=output_layer.sequence_parallel,
        gradient_accumulation_fusion=output_layer.gradient_accumulation_fusion,
    )

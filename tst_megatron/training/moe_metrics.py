"""What a MoE user reads per step: load-balancing / z losses per layer and expert-load imbalance.

- Auxiliary losses: Megatron-Core's routers record every layer's load-balancing and z loss in
  its aux-loss tracker (transformer/moe/moe_utils.py); `track_moe_metrics` reduces it over
  the pipeline, tensor/context and data-parallel ranks and clears it, exactly as Megatron-LM's
  ``training_log`` calls it once per step. The values are the raw losses (without their
  coefficients), averaged over the step's micro-batches.
- Imbalance: a forward hook on every router counts the tokens routed to each expert during
  training forwards (not evaluation; under activation recomputation only the pass that builds
  the graph counts, as for mcore's own expert-bias counts). After the step the counts are
  summed over every rank that saw other tokens (tensor x data x context parallel, then the
  pipeline, which holds the other layers), and each MoE layer reports
  ``max_e(tokens_e) / mean_e(tokens_e)``: 1.0 is perfect balance, ``E / topk`` the worst.
  With token dropping the counts are the tokens the experts kept (padding included with
  ``--moe-pad-expert-input-to-capacity``).

`MoEStepMetrics.collect` is a collective: every rank calls it once per training step.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.moe_utils import track_moe_metrics
from megatron.core.transformer.moe.router import TopKRouter

from tst_megatron.settings.model import ModelConfig, MoEConfig, moe_layer_pattern

IMBALANCE = "expert_load_max_over_mean"
"""Name of the per-layer imbalance metric (``max / mean`` tokens per expert)."""


def _moe(model: ModelConfig) -> MoEConfig:
    if model.moe is None:
        raise ValueError("a dense model has no MoE metrics (--num-experts is not set)")
    return model.moe


def moe_layer_numbers(model: ModelConfig) -> list[int]:
    """Global 1-based numbers of the MoE layers (``--moe-layer-freq``): per-layer list order."""
    pattern = moe_layer_pattern(model.num_layers, _moe(model).moe_layer_freq)
    return [i + 1 for i, moe in enumerate(pattern) if moe]


def tracked_aux_losses(moe: MoEConfig) -> list[str]:
    """Names of the aux losses the routers record (Megatron-LM's list in ``training_log``)."""
    types = moe.load_balancing_types
    names = [
        name
        for kind, name in (
            ("aux_loss", "load_balancing_loss"),
            ("seq_aux_loss", "seq_load_balancing_loss"),
            ("global_aux_loss", "global_load_balancing_loss"),
        )
        if kind in types
    ]
    if moe.moe_z_loss_coeff is not None:
        names.append("z_loss")
    return names


class _Capture:
    """A TensorBoard-writer stand-in that keeps what `track_moe_metrics` writes."""

    def __init__(self) -> None:
        self.scalars: dict[str, float] = {}

    def add_scalar(self, name: str, value, iteration: int) -> None:
        self.scalars[name] = float(value)


class MoEStepMetrics:
    """Per-step MoE figures of this rank's model chunks: ``{name: [value per MoE layer]}``."""

    def __init__(self, model: ModelConfig, model_chunks: list) -> None:
        moe = _moe(model)
        self.num_layers = model.num_layers
        self.moe_layer_freq = moe.moe_layer_freq
        self.num_experts = moe.num_experts
        self.layers = moe_layer_numbers(model)
        self.loss_names = tracked_aux_losses(moe)
        self._counts: dict[int, torch.Tensor] = {}
        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._count_tokens)

    def _count_tokens(self, router: TopKRouter, inputs, outputs) -> None:
        if not (router.training and torch.is_grad_enabled()):
            return
        routing_map = outputs[1]  # [tokens, experts] bool
        counts = routing_map.sum(dim=0).float()
        layer = router.layer_number
        self._counts[layer] = self._counts[layer] + counts if layer in self._counts else counts

    def collect(self, num_microbatches: int) -> dict[str, list[float]]:
        """This step's per-layer aux losses and imbalance; clears the step's state."""
        capture = _Capture()
        track_moe_metrics(
            loss_scale=1.0 / num_microbatches,
            iteration=0,  # only passed on to the capture writer
            writer=capture,
            per_layer_logging=True,
            force_initialize=True,
            track_names=self.loss_names,
            num_layers=self.num_layers,
            moe_layer_freq=self.moe_layer_freq,
        )
        out = {
            name: [capture.scalars[f"moe/{name}_layer_{layer - 1}"] for layer in self.layers]
            for name in self.loss_names
        }
        out[IMBALANCE] = self._imbalance()
        return out

    def _imbalance(self) -> list[float]:
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        counts = torch.zeros(self.num_layers, self.num_experts, device=device)
        for layer, layer_counts in self._counts.items():
            counts[layer - 1] += layer_counts.to(device)
        self._counts = {}
        torch.distributed.all_reduce(
            counts, group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
        )
        torch.distributed.all_reduce(counts, group=ps.get_pipeline_model_parallel_group())
        moe = counts[[layer - 1 for layer in self.layers]]
        mean = moe.mean(dim=-1)
        ratio = torch.where(mean > 0, moe.max(dim=-1).values / mean.clamp(min=1e-12), 0.0)
        return ratio.tolist()


class MoEIntervalLog:
    """Averages `MoEStepMetrics.collect` results over a log interval and renders them.

    Scalars use Megatron-LM's names: ``load_balancing_loss`` (mean over MoE layers) and
    ``moe/load_balancing_loss_layer_<i>`` (0-based global layer index), likewise for the
    other aux losses, ``z_loss`` and `IMBALANCE`.
    """

    def __init__(self, layer_numbers: list[int]) -> None:
        self.layers = layer_numbers
        self._sums: dict[str, list[float]] = {}
        self._steps = 0

    def add(self, step: dict[str, list[float]]) -> None:
        for name, values in step.items():
            sums = self._sums.setdefault(name, [0.0] * len(values))
            self._sums[name] = [a + b for a, b in zip(sums, values, strict=True)]
        self._steps += 1

    def flush(self) -> tuple[list[str], dict[str, float]]:
        """``(log-line fields, scalars)`` of the interval; starts the next interval."""
        fields, scalars = [], {}
        for name, sums in self._sums.items():
            per_layer = [value / self._steps for value in sums]
            mean = sum(per_layer) / len(per_layer)
            scalars[name] = mean
            for layer, value in zip(self.layers, per_layer, strict=True):
                scalars[f"moe/{name}_layer_{layer - 1}"] = value
            listed = " ".join(f"{value:.4g}" for value in per_layer)
            fields.append(f"{name}: {mean:.6E} (per layer: {listed})")
        self._sums, self._steps = {}, 0
        return fields, scalars

    def boundary_note(self, before: dict | None, after: dict | None) -> str:
        """Expert-load imbalance of the last phase-1 and the first phase-2 step, for the log."""
        if not before or not after:
            return ""
        first, second = before[IMBALANCE], after[IMBALANCE]
        worst = max(range(len(second)), key=second.__getitem__)
        return (
            f"; expert load max/mean (mean over MoE layers) {sum(first) / len(first):.3f} "
            f"before the switch, {sum(second) / len(second):.3f} after; most imbalanced layer "
            f"{self.layers[worst] - 1}: {first[worst]:.3f} -> {second[worst]:.3f}"
        )

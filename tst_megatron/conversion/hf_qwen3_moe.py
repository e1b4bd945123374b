"""Qwen3-MoE router and expert names (the rest of the model is `hf_llama`'s).

Megatron-Core (TP=PP=EP=1, local spec: ``SequentialMLP``)  ->  Hugging Face (per-expert
checkpoint layout, which transformers 4.x loads as is and 5.x fuses on load):

* ``decoder.layers.i.mlp.router.weight`` ``[E, h]`` -> ``model.layers.i.mlp.gate.weight``
* ``...mlp.experts.local_experts.e.linear_fc1.weight`` ``[2f, h]`` ->
  ``...mlp.experts.e.gate_proj.weight``, ``...mlp.experts.e.up_proj.weight`` ``[f, h]``
* ``...mlp.experts.local_experts.e.linear_fc2.weight`` ``[h, f]`` ->
  ``...mlp.experts.e.down_proj.weight``

Grouped-GEMM checkpoints (``--moe-grouped-gemm``) store the same per-expert tensors: mcore's
grouped experts write ``SequentialMLP``-compatible sharded keys, so they load into the local
spec unchanged. On import, transformers 5.x's fused layout (``mlp.experts.gate_up_proj``
``[E, 2f, h]``, ``mlp.experts.down_proj`` ``[E, h, f]``) is accepted too.
"""

from __future__ import annotations

from tst_megatron.conversion.hf_llama import Tensors, hf_layer, mcore_layer, mlp_from_hf, mlp_to_hf
from tst_megatron.settings import ModelConfig


def moe_to_hf(state: Tensors, model: ModelConfig, i: int) -> Tensors:
    """Layer ``i``'s router and experts."""
    m, h = mcore_layer(i) + "mlp.", hf_layer(i) + "mlp."
    out = {f"{h}gate.weight": state.pop(f"{m}router.weight")}
    for e in range(model.num_experts):
        out |= mlp_to_hf(state, model, f"{m}experts.local_experts.{e}.", f"{h}experts.{e}.")
    return out


def moe_from_hf(hf: Tensors, model: ModelConfig, i: int) -> Tensors:
    """Inverse of `moe_to_hf` (either HF expert layout)."""
    m, h = mcore_layer(i) + "mlp.", hf_layer(i) + "mlp."
    _unfuse_experts(hf, h + "experts.")
    out = {f"{m}router.weight": hf.pop(f"{h}gate.weight")}
    for e in range(model.num_experts):
        out |= mlp_from_hf(hf, model, f"{m}experts.local_experts.{e}.", f"{h}experts.{e}.")
    return out


def _unfuse_experts(hf: Tensors, prefix: str) -> None:
    """transformers 5.x ``{prefix}gate_up_proj`` / ``down_proj`` -> per-expert entries, in place."""
    if f"{prefix}gate_up_proj" not in hf:
        return
    gate_up, down = hf.pop(f"{prefix}gate_up_proj"), hf.pop(f"{prefix}down_proj")
    for e in range(gate_up.shape[0]):
        gate, up = gate_up[e].chunk(2, dim=0)
        hf[f"{prefix}{e}.gate_proj.weight"] = gate
        hf[f"{prefix}{e}.up_proj.weight"] = up
        hf[f"{prefix}{e}.down_proj.weight"] = down[e]

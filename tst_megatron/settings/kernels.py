"""The implementation a run uses: the layer implementation, fused kernels and MoE kernels.

Every field is resolved against an `Environment` (Megatron-LM's defaults where the device and
its installed kernels can run them): the same flags give Transformer Engine and fusions on a
GPU node, the local spec with fusions off on a CPU host.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from tst_megatron.settings.checks import SettingsError
from tst_megatron.settings.environment import Environment, TransformerImpl

TE_INSTALL_HINT = "install transformer-engine[pytorch]"
TE_IMPL_MISSING = (
    "--transformer-impl transformer_engine needs Transformer Engine, which is not installed: "
    f"{TE_INSTALL_HINT} or pass --transformer-impl local"
)


@dataclass(frozen=True)
class Fusions:
    """The fusion fields of `TransformerConfig`, resolved."""

    bias_activation_fusion: bool
    bias_dropout_fusion: bool
    masked_softmax_fusion: bool
    persist_layer_norm: bool
    apply_rope_fusion: bool
    gradient_accumulation_fusion: bool
    cross_entropy_loss_fusion: bool
    cross_entropy_fusion_impl: str

    def as_config_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def enabled(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is True]


@dataclass(frozen=True, kw_only=True, slots=True)
class KernelsConfig:
    """``transformer_impl``: Megatron-Core's Transformer Engine spec or the local one.

    ``use_cpu_initialization`` is on wherever there is no CUDA. ``fusions`` are what the
    device runs of the fusion flags. ``moe_grouped_gemm`` / ``moe_permute_fusion``: the
    experts as one grouped GEMM, the fused token permutation (each resolved off where no kernel
    runs it). ``tst_fused_output_loss``: the output layer and loss chunk by chunk.
    """

    transformer_impl: TransformerImpl
    use_cpu_initialization: bool
    fusions: Fusions
    moe_grouped_gemm: bool = False
    moe_permute_fusion: bool = False
    tst_fused_output_loss: bool = False

    def check(self, env: Environment) -> None:
        """What ``env`` cannot run.

        Raises:
            SettingsError: Transformer Engine asked for where it is not installed, or the
                fused permutation where its kernels are missing.
        """
        if self.transformer_impl == "transformer_engine" and not env.transformer_engine:
            raise SettingsError(TE_IMPL_MISSING)
        if self.moe_permute_fusion and not (
            env.cuda and env.fused_permute and self.transformer_impl == "transformer_engine"
        ):
            raise SettingsError(
                "--moe-permute-fusion needs Transformer Engine >= 2.1's fused permutation "
                "kernels on a GPU (--transformer-impl transformer_engine); this run has "
                f"--transformer-impl {self.transformer_impl}"
                f"{'' if env.cuda else ' and no GPU'}: drop the flag"
            )
        if self.fusions.cross_entropy_fusion_impl == "te" and not env.transformer_engine:
            raise SettingsError(
                "--cross-entropy-fusion-impl te needs Transformer Engine, which is not "
                f"installed: {TE_INSTALL_HINT} or use --cross-entropy-fusion-impl native"
            )

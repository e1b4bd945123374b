"""Checkpoints: where they go, how often, what a resume loads and may change."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tst_megatron.settings.checks import SettingsError, check_non_negative, check_positive


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointConfig:
    """Megatron-LM's checkpointing flags (``torch_dist`` only) and the resume permissions.

    ``save_interval`` None = save at the end and on exit signals only. ``ckpt_keep_last`` 0 =
    keep all. ``override_opt_param_scheduler`` / ``tst_allow_schedule_change`` let a resume
    change the LR schedule / the TST phase-1 length.
    """

    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    ckpt_format: Literal["torch_dist"] = "torch_dist"
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False
    ckpt_keep_last: int = 0
    allow_fresh_start: bool = False
    ckpt_fully_reshardable: bool = False
    ckpt_fully_parallel_save: bool = True
    ckpt_fully_parallel_load: bool = True
    async_save: bool = False
    use_persistent_ckpt_worker: bool = False
    override_save_lock: bool = False
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False
    tst_allow_schedule_change: bool = False

    def __post_init__(self) -> None:
        check_positive("--save-interval", self.save_interval)
        check_non_negative("--ckpt-keep-last", self.ckpt_keep_last)
        for flag, on in (("--async-save", self.async_save),
                         ("--override-save-lock", self.override_save_lock)):  # fmt: skip
            if on and not self.save:
                raise SettingsError(f"{flag} needs --save (it acts on saving)")

"""The data: sources and splits, the tokenizer, document masking and the prefetch depth."""

from __future__ import annotations

from dataclasses import dataclass

from tst_megatron.settings.checks import SettingsError, check_non_negative


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """Exactly one source: ``data_path`` (a Megatron blend split by ``split``), the per-split
    ``train/valid/test_data_path`` blends, or ``mock_data``.

    ``tokenizer_type`` is resolved (NullTokenizer when only ``--vocab-size`` is given).
    ``num_workers``: steps the background thread prepares ahead (0 = on the training thread).
    """

    data_path: tuple[str, ...] | None = None
    train_data_path: tuple[str, ...] | None = None
    valid_data_path: tuple[str, ...] | None = None
    test_data_path: tuple[str, ...] | None = None
    split: str = "969, 30, 1"
    data_cache_path: str | None = None
    mock_data: bool = False
    tokenizer_type: str
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    create_attention_mask_in_dataloader: bool = True
    num_workers: int = 2

    def __post_init__(self) -> None:
        check_non_negative("--num-workers", self.num_workers)
        per_split = bool(self.train_data_path or self.valid_data_path or self.test_data_path)
        if [bool(self.data_path), per_split, self.mock_data].count(True) != 1:
            raise SettingsError(
                "give exactly one data source: --data-path, --train-data-path (with optional "
                "--valid-data-path/--test-data-path), or --mock-data"
            )

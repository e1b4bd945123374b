"""The tools' ``--use-checkpoint-args``: flags not given are taken from a checkpoint's record.

`tools/convert_checkpoint.py` and `tools/evaluate.py` parse ``pretrain_tst.py``'s flags, then,
before validation, take every model and data setting the command line and ``--yaml-config``
did not give from the checkpoint's ``settings`` record (`checkpoint_settings`); a given model
flag that differs from the record is refused. A checkpoint without the record needs the
flags, as before.
"""

from __future__ import annotations

import argparse
from typing import Any

from tst_megatron.training.checkpoint_files import CheckpointError
from tst_megatron.training.checkpoint_settings import (
    MODEL,
    SETTINGS,
    TOKENIZER,
    flag,
    plain,
    same,
)


def apply_recorded_settings(
    args: argparse.Namespace, explicit: set[str], meta: dict, path: str
) -> list[str]:
    """For a tool: take the model and data settings not in ``explicit`` (the destinations
    given on the command line or in ``--yaml-config``) from checkpoint ``path``'s record into
    the parsed, not yet validated ``args``.

    Returns the destinations taken from the record (empty for a checkpoint without one).

    Raises:
        CheckpointError: a given model setting differs from the record: one line naming each,
            both values, and that leaving the flag out takes the checkpoint's.
    """
    record = meta.get(SETTINGS)
    if not isinstance(record, dict):
        return []
    saved = {**record.get("data", {}), **record.get("model", {})}
    diffs = [
        f"{flag(dest)}: checkpoint {saved[dest]!r}, given {plain(getattr(args, dest))!r}"
        for dest in MODEL
        if dest in explicit and dest in saved and not same(saved[dest], getattr(args, dest))
    ]
    if diffs:
        raise CheckpointError(
            f"the model flags given differ from checkpoint {path}'s record: "
            + "; ".join(diffs)
            + ". Leave these flags out to take the checkpoint's values"
        )
    own_tokenizer = any(dest in explicit for dest in TOKENIZER)
    taken = [
        dest for dest in saved
        if dest not in explicit and not (own_tokenizer and dest in TOKENIZER)
    ]  # fmt: skip
    for dest in taken:
        setattr(args, dest, saved[dest])
    return taken


def given_destinations(
    parser: argparse.ArgumentParser, argv: list[str], yaml_values: dict[str, Any]
) -> set[str]:
    """The argparse destinations ``argv`` or the ``--yaml-config`` file set explicitly."""
    unset = object()
    probe = argparse.Namespace(**{action.dest: unset for action in parser._actions})
    parsed, _ = parser.parse_known_args(argv, probe)
    return {dest for dest, value in vars(parsed).items() if value is not unset} | set(yaml_values)

"""Every ``pretrain_tst.py`` flag maps to exactly one `RunConfig` field, and every field is set
from a flag (tst_megatron/training/run_config.py: `FLAG_FIELDS`, `ENTRY_POINT_ONLY`,
`DERIVED_FIELDS`).

Static: each parser destination is in `FLAG_FIELDS` (one field) or `ENTRY_POINT_ONLY` (with a
reason), never both; each mapped field exists; each field of `RunConfig` is mapped from a flag
or listed as derived. Behavioural, one test per flag: parsing the flag with a non-default value
(the probes of tests/test_flag_audit.py) and resolving for an H100 node changes its field, or
is refused with a message naming the flag. A flag added to the parser fails here until it has
a field: add the field to its section and the flag to `FLAG_FIELDS`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from functools import cache

import pytest

from tests.test_flag_audit import BASE, CONTEXT, PROBES, _probe_value
from tst_megatron.settings import Environment, RunConfig, SettingsError
from tst_megatron.training.arguments import ConfigError, build_parser, parse_args
from tst_megatron.training.run_config import (
    DERIVED_FIELDS,
    ENTRY_POINT_ONLY,
    FLAG_FIELDS,
    resolve,
)

ACTIONS = [a for a in build_parser()._actions if a.dest != "help"]
MOE = ["--num-experts", "4"]
FILES = ["--train-data-path", "train"]  # instead of BASE's --mock-data
GROUPS = [*MOE, "--moe-router-num-groups", "2", "--moe-router-group-topk", "1"]
# dest (or flag, for one of two flags of a dest) -> (context flags, world size) where the
# default one cannot show the field changing (the MoE fields default to a 4-expert model).
SETTINGS_CONTEXT: dict[str, tuple[list[str], int]] = {
    **CONTEXT,
    "bias_swiglu_fusion": (["--swiglu"], 1),
    "sequence_parallel": (["--tensor-model-parallel-size", "2"], 2),
    "valid_data_path": (FILES, 1),
    "test_data_path": (FILES, 1),
    "mock_data": (FILES, 1),
    "apply_rope_fusion": (["--position-embedding-type", "rope"], 1),
    "moe_aux_loss_coeff": ([*MOE], 1),
    "moe_router_load_balancing_type": ([*MOE, "--moe-aux-loss-coeff", "0.01"], 1),
    "moe_router_bias_update_rate": (
        [*MOE, "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias"],
        1,
    ),
    "moe_router_group_topk": (GROUPS, 1),
    "moe_router_num_groups": (GROUPS, 1),
    "moe_token_drop_policy": ([*MOE, "--moe-expert-capacity-factor", "1.0"], 1),
    # on for MoE on an H100 node by default: turned back on after the context's off
    "--moe-permute-fusion": ([*MOE, "--no-moe-permute-fusion"], 1),
}
SETTINGS_PROBES: dict[str, list[str]] = {
    **PROBES,
    "distributed_backend": ["gloo"],  # nccl is an H100 node's default
    "micro_batch_size": ["4"],  # BASE has 2
    "global_batch_size": ["4"],  # BASE's default is 2
    "moe_router_load_balancing_type": ["seq_aux_loss"],
    "moe_router_group_topk": ["2"],
    "moe_router_num_groups": ["1"],
}
ENVIRONMENT = Environment.gpu("h100")


def field_paths(cls: type, prefix: str = "") -> set[str]:
    """Dotted paths of the leaf fields of dataclass ``cls`` (into nested sections)."""
    hints = typing.get_type_hints(cls)
    paths = set()
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
        nested = [t for t in options if dataclasses.is_dataclass(t)]
        path = f"{prefix}{field.name}"
        paths |= field_paths(nested[0], f"{path}.") if nested else {path}
    return paths


FIELDS = field_paths(RunConfig)


def test_every_flag_is_mapped_once():
    dests = {a.dest for a in ACTIONS}
    assert not set(FLAG_FIELDS) & set(ENTRY_POINT_ONLY)
    unmapped = sorted(dests - set(FLAG_FIELDS) - set(ENTRY_POINT_ONLY))
    assert not unmapped, (
        f"flags without a settings field: {unmapped}; add the field to its section "
        "(tst_megatron/settings/) and the flag to FLAG_FIELDS (training/run_config.py)"
    )
    assert not (set(FLAG_FIELDS) | set(ENTRY_POINT_ONLY)) - dests, "mapped flags not parsed"


def test_every_field_is_read_from_a_flag():
    mapped = set(FLAG_FIELDS.values())
    assert mapped <= FIELDS, f"FLAG_FIELDS names missing fields: {sorted(mapped - FIELDS)}"
    derived = {p for p in FIELDS if any(p == d or p.startswith(f"{d}.") for d in DERIVED_FIELDS)}
    assert not FIELDS - mapped - derived, (
        f"fields no flag sets: {sorted(FIELDS - mapped - derived)}; map a flag to them or "
        "list them in DERIVED_FIELDS"
    )


def field_value(settings: RunConfig, path: str) -> object:
    value: object = settings
    for name in path.split("."):
        value = getattr(value, name, None)
    return value


@cache
def _resolved(argv: tuple[str, ...], world_size: int) -> RunConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resolve(parse_args(list(argv)), world_size, ENVIRONMENT)


def audit(action, path: str, tmp_path) -> str | None:
    """None when ``action`` changes field ``path`` (or is refused naming itself), else why."""
    moe = path.startswith(("model.moe.", "kernels.moe_"))
    flag = action.option_strings[0]
    default = SETTINGS_CONTEXT.get(action.dest, (MOE if moe else [], 1))
    context, world_size = SETTINGS_CONTEXT.get(flag, default)
    value = SETTINGS_PROBES.get(action.dest) or _probe_value(action, tmp_path)
    probe = [flag, *value]
    base = [f for f in BASE if f != "--mock-data"] if context is FILES else BASE
    baseline = _resolved((*base, *context), world_size)
    try:
        changed = _resolved((*base, *context, *probe), world_size)
    except (ConfigError, SettingsError) as err:
        if any(option in str(err) for option in action.option_strings):
            return None
        return f"{' '.join(probe)} is refused, but the message does not name {flag}: {err}"
    if field_value(changed, path) != field_value(baseline, path):
        return None
    return (
        f"{' '.join(probe)} does not change {path} (FLAG_FIELDS): map {action.dest} to the "
        "field it sets in training/run_config.py"
    )


@pytest.mark.parametrize(
    "action", [a for a in ACTIONS if a.dest in FLAG_FIELDS], ids=lambda a: a.option_strings[0]
)
def test_flag_reaches_its_field(action, tmp_path):
    problem = audit(action, FLAG_FIELDS[action.dest], tmp_path)
    assert problem is None, problem


def test_audit_catches_a_wrong_field(tmp_path):
    layers = next(a for a in ACTIONS if a.dest == "num_layers")
    assert audit(layers, "model.num_layers", tmp_path) is None
    assert "does not change model.hidden_size" in audit(layers, "model.hidden_size", tmp_path)

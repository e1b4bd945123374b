"""Every ``pretrain_tst.py`` flag reaches code: no flag is accepted and then silently ignored.

How a flag passes (one test per parser action, so a failure names the flag):

1. **Static read.** Its ``dest`` is read from an args namespace somewhere in product code
   outside ``training/arguments.py``: an attribute load ``<x>args.<dest>`` (``args``,
   ``self.args``, ``train_args``...) or ``getattr(<x>args, "<dest>", ...)``, found by walking
   the AST of ``pretrain_tst.py`` and ``tst_megatron/**.py`` (``tst_megatron/testing`` is test
   support and does not count). Assignments do not count, only reads. A flag that reaches
   code as a settings field (``FLAG_FIELDS`` of ``training/run_config.py``, checked flag by
   flag in tests/test_settings_audit.py) is read when its field is: an attribute load
   ``<x>.<field>`` outside the mapping and the settings package.
2. **Effect through validation.** Flags that ``validate_args`` consumes itself (a YAML file,
   ``--group-query-attention`` -> ``num_query_groups``, the ``--tst-*`` flags -> ``args.tst``)
   pass when parsing the flag with a non-default value (``PROBES``, else derived from the
   action: the flag itself, another choice, another number), in an otherwise valid command
   line (``CONTEXT``), either
   - changes some *other* field of the validated namespace that passes check 1, or
   - is refused: `ConfigError` whose message names the flag (e.g. ``--ckpt-format`` accepts
     only its default and says so).

What it cannot prove: that a value read in code changes the result on every path (a read in
dead code passes check 1). It is a guard against the common failure, a flag that is parsed and
never looked at, which a user porting a Megatron-LM script would not notice. When you add a
flag, read it where it acts (or refuse the values you do not support with a ConfigError).
``test_audit_catches_an_ignored_flag`` proves the audit fails on a planted unused flag.

Known gaps are strict xfails (``KNOWN_IGNORED``): the test turns red once a gap is fixed, so
the entry is removed then.
"""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Iterable
from pathlib import Path

import pytest

from tst_megatron.training.arguments import ConfigError, build_parser, parse_args, validate_args
from tst_megatron.training.run_config import FLAG_FIELDS

ROOT = Path(__file__).resolve().parents[1]
ARGUMENTS = ROOT / "tst_megatron" / "training" / "arguments.py"
MAPPING = ROOT / "tst_megatron" / "training" / "run_config.py"
BASE = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 2 --train-iters 10 --lr 1e-3 --mock-data --vocab-size 512"
).split()
_TST = ["--tst-bag-size", "4", "--tst-phase1-fraction", "0.5"]
# dest -> (extra context flags, world size): a valid setting in which the flag can act.
CONTEXT: dict[str, tuple[list[str], int]] = {
    "num_layers_per_virtual_pipeline_stage": (["--pipeline-model-parallel-size", "2"], 2),
    "test_data_path": (["--mock-data", "--train-data-path", "train"], 1),
    "valid_data_path": (["--mock-data", "--train-data-path", "train"], 1),
    "tst_phase1_fraction": (_TST, 1),
    "tst_phase1_iters": (["--tst-bag-size", "4", "--tst-phase1-iters", "5"], 1),
    "tst_mode": (_TST, 1),
    "create_attention_mask_in_dataloader": (["--reset-attention-mask"], 1),
    "tst_phase": ([*_TST, "--load", "ckpt"], 1),
}
# dest -> the value to probe with, when the derived one would be invalid or meaningless.
PROBES: dict[str, list[str]] = {
    "num_layers_per_virtual_pipeline_stage": ["1"],
    "tst_bag_size": ["4", "--tst-phase1-fraction", "0.5"],
    "tst_phase1_fraction": ["0.25"],
    "tst_phase1_iters": ["3"],
    "ckpt_format": ["torch"],
}
# Accepted and (still) ignored: each names who fixes it. Strict xfail: remove once fixed.
KNOWN_IGNORED: dict[str, str] = {}
_ARGS_NAME = re.compile(r"(^|_)args$")


def _is_args(node: ast.AST) -> bool:
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)
    return isinstance(name, str) and bool(_ARGS_NAME.search(name))


def static_reads(paths: Iterable[Path]) -> set[str]:
    """Attribute names read from an args namespace (``args.x``, ``getattr(args, "x")``)."""
    reads: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                if _is_args(node.value):
                    reads.add(node.attr)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "getattr"
                and len(node.args) >= 2
                and _is_args(node.args[0])
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
            ):
                reads.add(node.args[1].value)
    return reads


def section_field_reads(paths: Iterable[Path]) -> set[str]:
    """Flags whose settings field is read (``<x>.<field>``) outside the mapping and sections."""
    loaded = {
        node.attr
        for path in paths
        if path != MAPPING and "settings" not in path.relative_to(ROOT).parts
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)
    }
    return {dest for dest, field in FLAG_FIELDS.items() if field.rsplit(".", 1)[1] in loaded}


def product_files() -> list[Path]:
    files = [ROOT / "pretrain_tst.py", *sorted((ROOT / "tst_megatron").rglob("*.py"))]
    return [f for f in files if f != ARGUMENTS and "testing" not in f.relative_to(ROOT).parts]


def _probe_value(action: argparse.Action, tmp_path: Path) -> list[str]:
    if action.dest == "yaml_config":
        path = tmp_path / "config.yaml"
        path.write_text("hidden_dropout: 0.0\n")  # a flag BASE leaves at its default
        return [str(path)]
    if action.dest in PROBES:
        return PROBES[action.dest]
    if action.nargs == 0:
        return []
    if action.choices is not None:
        others = [c for c in action.choices if c != action.default]
        return [str(others[0])]
    count = action.nargs if isinstance(action.nargs, int) else 1
    if action.type is int:
        value = str((action.default or 1) + 1)
    elif action.type is float:
        value = str((action.default or 1.0) * 0.5)
    else:
        value = "probe"
    return [value] * count


def _validated(argv: list[str], world_size: int, parser: argparse.ArgumentParser | None):
    args = parse_args(argv) if parser is None else parser.parse_args(argv)
    validate_args(args, world_size=world_size)
    return vars(args)


def audit_flag(
    action: argparse.Action,
    reads: set[str],
    tmp_path: Path,
    parser: argparse.ArgumentParser | None = None,
) -> str | None:
    """None when ``action``'s value reaches code (see the module docstring), else why not."""
    if action.dest in reads:
        return None
    context, world_size = CONTEXT.get(action.dest, ([], 1))
    flag = action.option_strings[0]
    probe = [flag, *_probe_value(action, tmp_path)]
    baseline = _validated([*BASE, *context], world_size, parser)
    try:
        changed = _validated([*BASE, *context, *probe], world_size, parser)
    except ConfigError as err:
        if any(option in str(err) for option in action.option_strings):
            return None
        return f"{' '.join(probe)} is refused, but the message does not name {flag}: {err}"
    effects = sorted(
        key
        for key in changed.keys() | baseline.keys()
        if key != action.dest and changed.get(key) != baseline.get(key) and key in reads
    )
    if effects:
        return None
    return (
        f"{flag} ({action.dest}) is read nowhere in product code outside arguments.py, and "
        f"{' '.join(probe)} changes no field that is: read it where it acts, or refuse "
        "unsupported values with a ConfigError naming the flag"
    )


READS = static_reads(product_files()) | section_field_reads(product_files())
ACTIONS = [a for a in build_parser()._actions if a.dest != "help"]


def test_the_walk_sees_the_whole_parser():
    assert len(ACTIONS) > 100
    assert {"num_layers", "bf16", "tst_bag_size", "save"} <= {a.dest for a in ACTIONS}
    assert {"num_layers", "bf16", "save", "seed"} <= READS


@pytest.mark.parametrize(
    "action",
    [
        pytest.param(
            a,
            id=a.option_strings[0],
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN_IGNORED[a.dest])]
            if a.dest in KNOWN_IGNORED
            else [],
        )
        for a in ACTIONS
    ],
)
def test_flag_reaches_code(action, tmp_path):
    problem = audit_flag(action, READS, tmp_path)
    assert problem is None, problem


def test_audit_catches_an_ignored_flag(tmp_path):
    """A planted flag that nothing reads fails; one that validation refuses passes."""
    parser = build_parser()
    ignored = parser.add_argument("--planted-unused-flag", type=int, default=3)
    assert "planted-unused-flag" in audit_flag(ignored, READS, tmp_path, parser)
    assert audit_flag(ignored, READS | {"planted_unused_flag"}, tmp_path, parser) is None

"""Cluster-layout planner for ``pretrain_tst.py``: parameters, FLOPs, data tokens, memory, time.

Usage::

    python tools/plan.py --config examples/configs/tst-3b.yaml --nodes 4 --gpus-per-node 8 \
        --gpu b200 --tp 1 --pp 1 --micro-batch-size 2 --global-batch-size 512 [--json]

A command line over the planning model in `tst_megatron.planning` (see docs/planner.md).
Runs on a CPU in seconds at any model size: the model is built on the meta device. The layout
is resolved as the trainer resolves its flags (`run_config.resolve`: `validate_args`, same
messages as ``pretrain_tst.py``) for a node of the planned GPU (`Environment.gpu`), plus what
only a planner can see: virtual-pipeline divisibility and memory per GPU against the GPU's.
The layout flags (``--tp --pp --vpp --cp --ep --etp``) replace the config's own.

With ``--data-path`` (a Megatron blend, ``[W1] PREFIX1 [W2 PREFIX2 ...]``, and ``--split``)
it also prints the run's data budget, as the trainer logs it before step 1: per dataset the
training tokens it holds, the tokens each TST phase reads and the epochs that makes, with the
warning when a TST run would repeat data (``data_budget`` in the JSON).

Exit status: 0 when the layout is accepted, 1 when it is rejected (``errors`` say why), 2 for
unusable input (unreadable config, bad flags).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tst_megatron.planning.layout import (  # noqa: E402
    PlanError,
    PlannedFlags,
    PlanRequest,
    planned_flags,
    single_gpu_flags,
)
from tst_megatron.planning.memory import (  # noqa: E402
    GPU_MEMORY_GIB,
    USABLE_MEMORY_FRACTION,
    MemorySettings,
)
from tst_megatron.planning.params import (  # noqa: E402
    count_parameters,
    meta_parameters,
    place_parameters,
)
from tst_megatron.planning.report import plan_report, rejected_report, render  # noqa: E402
from tst_megatron.planning.step_time import DEFAULT_MFU  # noqa: E402
from tst_megatron.settings import Environment, RunConfig, SettingsError  # noqa: E402
from tst_megatron.training import arguments  # noqa: E402
from tst_megatron.training.run_config import resolve  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The planner's flags (the fields of `PlanRequest`, plus ``--json``)."""
    parser = argparse.ArgumentParser(
        prog="plan.py",
        description="Check a parallel layout for a pretrain_tst.py config and estimate its "
        "parameters, FLOPs, data tokens, memory per GPU and step time.",
    )
    parser.add_argument("--config", required=True, help="pretrain_tst.py YAML config.")
    parser.add_argument("--nodes", type=_positive, default=1, help="Number of nodes.")
    parser.add_argument("--gpus-per-node", type=_positive, default=8, help="GPUs per node.")
    parser.add_argument(
        "--gpu", choices=sorted(GPU_MEMORY_GIB), default="b200", help="GPU model (default b200)."
    )
    parser.add_argument("--tp", type=int, default=1, help="Tensor-parallel size.")
    parser.add_argument("--pp", type=int, default=1, help="Pipeline-parallel size.")
    parser.add_argument(
        "--vpp",
        type=_positive,
        default=1,
        help="Virtual pipeline stages per pipeline rank (> 1: interleaved 1F1B).",
    )
    parser.add_argument("--cp", type=int, default=1, help="Context-parallel size.")
    parser.add_argument("--ep", type=int, default=1, help="Expert-parallel size.")
    parser.add_argument(
        "--etp", type=int, default=None, help="Expert tensor-parallel size (default --tp)."
    )
    parser.add_argument(
        "--micro-batch-size", type=int, default=None, help="Micro-batch size (default: config)."
    )
    parser.add_argument(
        "--global-batch-size", type=int, default=None, help="Global batch (default: config)."
    )
    parser.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="Context length L (default: config; raises a smaller max-position-embeddings).",
    )
    recompute = parser.add_mutually_exclusive_group()
    recompute.add_argument(
        "--recompute",
        action="store_true",
        help="Full activation recomputation of every layer (default: the config's recompute-* "
        "keys).",
    )
    recompute.add_argument(
        "--recompute-modules",
        nargs="+",
        default=(),
        choices=list(arguments.RECOMPUTE_MODULES),
        help="Selective recomputation of these modules, as pretrain_tst.py's flag.",
    )
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="Plan torch FSDP2 (--use-torch-fsdp2: weights, gradients and optimizer state "
        "sharded over DP x CP) instead of the config's DDP / distributed optimizer; unties "
        "tied embeddings, as FSDP2 requires.",
    )
    parser.add_argument(
        "--mfu",
        type=_fraction,
        default=DEFAULT_MFU,
        help=f"Assumed FLOP utilisation for the time estimate (default {DEFAULT_MFU}).",
    )
    parser.add_argument(
        "--usable-memory-fraction",
        type=_fraction,
        default=USABLE_MEMORY_FRACTION,
        help=f"Share of GPU memory training may fill (default {USABLE_MEMORY_FRACTION}).",
    )
    parser.add_argument(
        "--data-path",
        nargs="+",
        default=None,
        help="Training data blend, as pretrain_tst.py's flag: report the data budget.",
    )
    parser.add_argument(
        "--split", default=None, help="Train/valid/test split of --data-path (default: config's)."
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    return parser


def resolved(planned: PlannedFlags, env: Environment) -> RunConfig | str:
    """The settings of ``planned`` for ``env``, or the trainer's error message."""
    parser = arguments.build_parser()
    parser.set_defaults(**planned.values)
    args = parser.parse_args([])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return resolve(args, planned.world_size, env)
    except (arguments.ConfigError, SettingsError) as err:
        return str(err)


def memory_settings(settings: RunConfig) -> MemorySettings:
    """The sections of ``settings`` the planning model reads."""
    return MemorySettings(
        **{
            field.name: getattr(settings, field.name)
            for field in dataclasses.fields(MemorySettings)
        }
    )


def plan(request: PlanRequest) -> dict[str, Any]:
    """The report for ``request``; ``report["ok"]`` says if it is accepted.

    Raises:
        PlanError: the config cannot be read or describes no model.
    """
    env = Environment.gpu(request.gpu)
    planned = planned_flags(request)
    errors = list(planned.errors)
    run = resolved(planned, env)
    layout_error = run if isinstance(run, str) else None
    if layout_error:
        errors.append(layout_error)
    if not errors and not isinstance(run, str):
        settings = run
        batch = settings.batch
    else:  # the layout-free numbers still come from a one-GPU view
        one_gpu = resolved(single_gpu_flags(request), env)
        if isinstance(one_gpu, str):
            if one_gpu != layout_error:
                errors.append(one_gpu)
            return rejected_report(request, errors)
        settings = one_gpu
        batch = dataclasses.replace(
            settings.batch,
            global_batch_size=planned.global_batch_size or settings.batch.global_batch_size,
        )
    if settings.model.padded_vocab_size is None:
        raise PlanError(
            f"{request.config} gives no vocab-size: the planner needs the vocabulary size "
            "(add vocab-size: N, the tokenizer's size)"
        )
    named = meta_parameters(settings.model)
    stages = None if errors else place_parameters(settings.model, settings.parallel, named)
    return plan_report(
        request,
        dataclasses.replace(memory_settings(settings), batch=batch),
        settings.schedule,
        count_parameters(settings.model, named),
        stages,
        errors,
        planned.notes,
    )


def data_budget(request: PlanRequest, data_path: list[str], split: str | None) -> dict:
    """The trainer's start-up data budget for ``data_path`` (no index is built): the schedule
    and TST settings on one GPU with the run's global batch (the data needs no tokenizer)."""
    from dataclasses import asdict

    from tst_megatron.data.builders import plan_data
    from tst_megatron.data.checks import DataError

    one_gpu = single_gpu_flags(request)
    values = {**one_gpu.values, "global_batch_size": planned_flags(request).global_batch_size,
              "data_path": data_path, "train_data_path": None, "valid_data_path": None,
              "test_data_path": None, "mock_data": False}  # fmt: skip
    if split is not None:
        values["split"] = split
    run = resolved(dataclasses.replace(one_gpu, values=values), Environment.gpu(request.gpu))
    if isinstance(run, str):
        raise PlanError(run)
    settings = run
    try:
        data = plan_data(
            settings.data,
            settings.schedule,
            settings.batch,
            settings.tst,
            settings.model.seq_length,
            None,
        )
    except DataError as err:
        raise PlanError(str(err)) from err
    return {"lines": data.notices, "datasets": [asdict(b) for b in data.budgets]}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Print the plan; 0 = accepted, 1 = rejected, 2 = unusable input."""
    options = vars(build_parser().parse_args(argv))
    as_json = options.pop("json")
    data_path, split = options.pop("data_path"), options.pop("split")
    try:
        options["recompute_modules"] = tuple(options["recompute_modules"])
        request = PlanRequest(**options)
        report = plan(request)
        if data_path:
            report["data_budget"] = data_budget(request, data_path, split)
    except PlanError as err:
        print(f"plan.py: error: {err}", file=sys.stderr)
        return 2
    text = render(report)
    if data_path:
        text += "\n" + "\n".join(report["data_budget"]["lines"])
    print(json.dumps(report, indent=2) if as_json else text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

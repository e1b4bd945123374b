"""The checkpoint records every setting that changes the run's numbers (issue 26, item 2).

A tiny RoPE model is trained with ``--rotary-base 50000 --norm-epsilon 1e-6`` by a real
launch; then, from outside the process: resumes with another rotary base, norm epsilon, Adam
beta or learning rate are refused with one line naming the flag, both values and the flag that
allows it; the allowing flags work (``--use-checkpoint-opt_param-scheduler`` continues bit for
bit); ``tools/convert_checkpoint.py mcore-to-hf --load DIR --hf-dir OUT`` alone writes the
recorded ``rope_theta`` and ``rms_norm_eps``; ``tools/evaluate.py`` needs no model flags and
gives the same loss as with them; given flags that differ are refused; a checkpoint without
the record still needs (and takes) the flags. The conversion's storage and config errors are
one line too.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.launches import ERROR, Launch, launch
from tst_megatron.settings import CheckpointConfig, Environment, ModelConfig, MoEConfig
from tst_megatron.training import checkpoint_settings as settings
from tst_megatron.training import checkpointing as ckpt
from tst_megatron.training.checkpoint_settings import CheckpointedRun
from tst_megatron.training.run_config import settings_from_flags

ROOT = Path(__file__).resolve().parents[1]
LLAMA = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--transformer-impl", "local", "--distributed-backend", "gloo",
    "--seed", "5", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
    "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--rotary-base", "50000", "--norm-epsilon", "1e-6",
]  # fmt: skip
TRAIN = [
    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--min-lr", "3e-4",
    "--lr-warmup-iters", "1", "--train-iters", "4", "--log-interval", "1", "--eval-iters", "0",
]  # fmt: skip
DATA = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512"]
BASE = [*LLAMA, *TRAIN]


def run_tool(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "tools" / tool), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**__import__("os").environ, "PYTHONWARNINGS": "ignore"})


def error_lines(text: str, prefix: str) -> list[str]:
    assert "Traceback" not in text, text[-3000:]
    return [line for line in text.splitlines() if line.startswith(prefix)]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("settings")


@pytest.fixture(scope="module")
def trained(tmp) -> Launch:
    """4 iterations, saved at 2 and 4, validated at the end (2 micro-batches)."""
    save = tmp / "run"
    flags = ["--save", str(save), "--save-interval", "2", "--eval-iters", "2"]
    run = launch(tmp, "run", flags, data=DATA, base=BASE)
    assert run.returncode == 0, run.log[-3000:]
    return run


def resume(tmp: Path, name: str, *extra: str) -> Launch:
    return launch(tmp, name, ["--load", str(tmp / "run" / "iter_0000002"), *extra],
                  data=DATA, base=BASE)


# --------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------


MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32"]


def resumed(*extra: str) -> tuple[CheckpointedRun, CheckpointConfig]:
    """The checkpointed sections and the checkpoint section of ``BASE`` + ``DATA`` + ``extra``."""
    run = settings_from_flags([*BASE, *DATA, "--load", "x", *extra], env=Environment.cpu())
    return CheckpointedRun.of(run.with_padded_vocab_size(512)), run.checkpoint


@pytest.mark.parametrize("extra", [[], MOE], ids=["dense", "moe"])
def test_the_record_holds_every_model_field(extra):
    """Every `ModelConfig` / `MoEConfig` field is in the record with the run's value, under
    ``settings`` (``model`` or ``data``) or in the model shape (``model``), except those named
    in `NOT_IN_SETTINGS` with the reason; a dense model records ``num_experts`` None alone."""
    run, _ = resumed(*extra)
    record = ckpt.checkpoint_record(run, ckpt.TrainingProgress(4, 16, 2, {}), "dp_reshardable")
    recorded = {**record["model"], **record["settings"]["data"], **record["settings"]["model"]}
    model = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "moe"]
    experts = [f.name for f in dataclasses.fields(MoEConfig)] if extra else ["num_experts"]
    missing = [name for name in (*model, *experts) if name not in recorded]
    assert missing == (["moe_token_dispatcher_type"] if extra else [])
    assert set(missing) <= set(settings.NOT_IN_SETTINGS)
    assert all(reason for reason in settings.NOT_IN_SETTINGS.values())
    flat = settings.plain(run.model.flat())
    assert {name: recorded[name] for name in flat if name not in missing} == {
        name: value for name, value in flat.items() if name not in missing
    }
    assert record["settings"]["model"]["rotary_base"] == 50000
    assert record["model"] == ckpt.model_shape(run.model)
    shape = set(ckpt.MODEL_SHAPE_KEYS) - (set() if extra else {"moe_router_topk",
                                                                "moe_ffn_hidden_size"})
    assert set(record["model"]) == shape


def test_the_model_shape_keys_are_the_model_sections_and_old_records_keep_them():
    """`MODEL_SHAPE_KEYS` come from the model section; the keys records written before it held
    (the cross-version golden checkpoints) are exactly these."""
    golden = ROOT / "tests" / "golden" / "cross_version"
    for meta_file in sorted(golden.glob("*/iter_*/tst_checkpoint.json")):
        assert set(json.loads(meta_file.read_text())["model"]) == set(ckpt.MODEL_SHAPE_KEYS)
    assert len(list(golden.glob("*/iter_*/tst_checkpoint.json"))) == 2
    run, checkpoint = resumed("--num-layers", "3")
    old = json.loads(next(golden.glob("*/iter_*/tst_checkpoint.json")).read_text())
    with pytest.raises(ckpt.CheckpointError, match=r"num_layers: checkpoint 2, this run 3"):
        ckpt.check_compatible(run, checkpoint, {**old, "settings": None}, "C")


def test_the_record_holds_model_optimizer_and_schedule_settings(trained, tmp):
    meta = ckpt.read_checkpoint_meta(str(tmp / "run" / "iter_0000004"))
    record = meta["settings"]
    assert set(record) == {"model", "data", "optimizer", "schedule"}
    assert record["model"]["rotary_base"] == 50000 and record["model"]["norm_epsilon"] == 1e-6
    assert record["model"]["swiglu"] is True and record["model"]["normalization"] == "RMSNorm"
    assert record["optimizer"]["adam_beta1"] == 0.9 and record["optimizer"]["clip_grad"] == 1.0
    assert record["schedule"]["lr"] == 3e-3 and record["schedule"]["lr_warmup_iters"] == 1
    assert record["data"]["seq_length"] == 32 and record["data"]["vocab_size"] == 512


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "flags", "expected"),
    [
        ("rotary", ["--rotary-base", "500000"],
         "other model settings than this run's: --rotary-base: checkpoint 50000, this run "
         "500000. Resume with the checkpoint's values, or pass --finetune"),
        ("epsilon", ["--norm-epsilon", "1e-2"],
         "--norm-epsilon: checkpoint 1e-06, this run 0.01"),
        ("beta", ["--adam-beta1", "0.8"],
         "other optimizer settings than this run's: --adam-beta1: checkpoint 0.9, this run "
         "0.8. Resume with the checkpoint's values, or pass --no-load-optim"),
        ("lr", ["--lr", "1e-3"],
         "another learning-rate / weight-decay schedule than this run's: --lr: checkpoint "
         "0.003, this run 0.001. Resume with the checkpoint's values, or pass "
         "--override-opt_param-scheduler to continue with this run's schedule or "
         "--use-checkpoint-opt_param-scheduler to continue with the checkpoint's"),
    ],
)  # fmt: skip
def test_resume_with_another_setting_is_refused_naming_it(trained, tmp, name, flags, expected):
    run = resume(tmp, f"refused_{name}", *flags)
    assert run.returncode == 1 and not run.losses, run.log[-3000:]
    errors = error_lines(run.log, ERROR)
    assert len(errors) == 1 and expected in errors[0], errors


@pytest.mark.slow
def test_use_checkpoint_schedule_continues_exactly_and_override_takes_this_runs(trained, tmp):
    kept = resume(tmp, "use_checkpoint", "--lr", "1e-3", "--use-checkpoint-opt_param-scheduler")
    assert kept.returncode == 0, kept.log[-3000:]
    assert "the checkpoint's schedule continues (--use-checkpoint-opt_param-scheduler)" in kept.log
    assert kept.losses == {it: trained.losses[it] for it in (3, 4)}
    overridden = resume(tmp, "override", "--lr", "1e-3", "--override-opt_param-scheduler")
    assert overridden.returncode == 0, overridden.log[-3000:]
    assert "this run's schedule applies (--override-opt_param-scheduler): --lr" in overridden.log
    assert overridden.losses[3] == trained.losses[3]  # the step's loss comes before its update
    assert overridden.losses[4] != trained.losses[4]


def test_each_section_names_the_flag_that_allows_a_difference():
    args = resumed
    meta = {"settings": settings.recorded_settings(resumed()[0])}
    notes = settings.check_resume_settings(
        *args("--rotary-base", "1000000", "--finetune"), meta, "C"
    )
    assert notes == ["this run's model settings replace the checkpoint's (--finetune): "
                     "--rotary-base: checkpoint 50000, this run 1000000"]  # fmt: skip
    notes = settings.check_resume_settings(
        *args("--adam-eps", "1e-6", "--no-load-optim"), meta, "C"
    )
    assert notes == ["this run's optimizer settings apply (--no-load-optim): --adam-eps: "
                     "checkpoint 1e-08, this run 1e-06"]  # fmt: skip
    assert settings.check_resume_settings(*args("--init-method-std", "0.01"), meta, "C") == []
    assert settings.check_resume_settings(*args("--rotary-base", "7"), {}, "C") == []  # old
    with pytest.raises(ckpt.CheckpointError, match=r"--global-batch-size: checkpoint 4, this "
                       r"run 8.*--override-opt_param-scheduler"):
        settings.check_resume_settings(*args("--global-batch-size", "8"), meta, "C")
    with pytest.raises(ckpt.CheckpointError, match=r"--clip-grad: checkpoint 1.0, this run 0.5"):
        settings.check_resume_settings(*args("--clip-grad", "0.5"), meta, "C")


# --------------------------------------------------------------------------------------------
# Conversion and evaluation take the record
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_convert_needs_no_model_flags_and_checks_given_ones(trained, tmp):
    out = tmp / "hf"
    done = run_tool("convert_checkpoint.py", "mcore-to-hf", "--load", str(tmp / "run"),
                    "--hf-dir", str(out), cwd=tmp)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 50000 and config["rms_norm_eps"] == 1e-6
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == 512
    refused = run_tool("convert_checkpoint.py", "mcore-to-hf", "--load", str(tmp / "run"),
                       "--hf-dir", str(tmp / "hf_refused"), "--rotary-base", "10000",
                       "--norm-epsilon", "1e-5", cwd=tmp)  # fmt: skip
    assert refused.returncode == 1
    assert error_lines(refused.stderr, "error:") == [
        f"error: the model flags given differ from checkpoint {tmp / 'run' / 'iter_0000004'}'s "
        "record: --rotary-base: checkpoint 50000, given 10000; --norm-epsilon: checkpoint "
        "1e-06, given 1e-05. Leave these flags out to take the checkpoint's values"
    ]
    assert not (tmp / "hf_refused").exists()


@pytest.mark.slow
def test_a_checkpoint_without_the_record_converts_with_the_flags_as_before(trained, tmp):
    old = tmp / "old"
    import shutil

    shutil.copytree(tmp / "run" / "iter_0000004", old)
    meta = json.loads((old / ckpt.META).read_text())
    del meta["settings"]
    (old / ckpt.META).write_text(json.dumps(meta))
    bare = run_tool("convert_checkpoint.py", "mcore-to-hf", "--load", str(old),
                    "--hf-dir", str(tmp / "hf_old_bare"), cwd=tmp)  # fmt: skip
    assert bare.returncode == 2 and error_lines(bare.stderr, "error:") == [
        "error: --num-layers is required"
    ]
    done = run_tool("convert_checkpoint.py", "mcore-to-hf", "--load", str(old),
                    "--hf-dir", str(tmp / "hf_old"), *LLAMA, *DATA, cwd=tmp)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((tmp / "hf_old" / "config.json").read_text())
    assert config["rope_theta"] == 50000 and config["rms_norm_eps"] == 1e-6


@pytest.mark.slow
def test_evaluate_needs_no_model_flags_gives_the_trainers_loss_and_checks_given_ones(
    trained, tmp
):
    common = ["--load", str(tmp / "run"), "--mock-data", "--eval-iters", "2",
              "--micro-batch-size", "2", "--json", "--seed", "5"]  # fmt: skip (mock windows)
    alone = run_tool("evaluate.py", *common, cwd=tmp)
    assert alone.returncode == 0, alone.stderr[-3000:]
    flagged = run_tool("evaluate.py", *common, *LLAMA, *DATA, cwd=tmp)
    assert flagged.returncode == 0, flagged.stderr[-3000:]

    def loss(done: subprocess.CompletedProcess) -> float:
        return json.loads(done.stdout.strip().splitlines()[-1])["lm_loss"]

    assert loss(alone) == loss(flagged)
    # the Evaluator (weights only: no optimizer, no training samples) gives the trainer's
    # validation loss for the same weights and samples, bit for bit
    logged = [r["valid_lm_loss"] for r in trained.records if "valid_lm_loss" in r]
    assert loss(alone) == logged[-1]
    assert "model weights only" in alone.stdout and "optimizer" not in alone.stdout
    refused = run_tool("evaluate.py", *common, "--norm-epsilon", "1e-2", cwd=tmp)
    assert refused.returncode == 1
    lines = error_lines(refused.stderr, "evaluate.py: error:")
    assert len(lines) == 1 and "--norm-epsilon: checkpoint 1e-06, given 0.01" in lines[0]


# --------------------------------------------------------------------------------------------
# Conversion errors: one line
# --------------------------------------------------------------------------------------------


def mounted_tmpfs(path: Path, options: str) -> bool:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True)  # fmt: skip
    return done.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize(("options", "expected"), [
    ("ro,size=1m", "Read-only file system [EROFS]"),
    ("size=64k", "No space left on device [ENOSPC]"),
])  # fmt: skip
def test_convert_into_a_read_only_or_full_directory_is_one_line(trained, tmp, options, expected):
    disk = tmp / f"disk_{options.split(',')[0].replace('=', '')}"
    if not mounted_tmpfs(disk, options):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "hf"
        done = run_tool("convert_checkpoint.py", "mcore-to-hf", "--load", str(tmp / "run"),
                        "--hf-dir", str(out), cwd=tmp)  # fmt: skip
        lines = error_lines(done.stderr, "error:")
        assert done.returncode == 1 and len(lines) == 1, done.stderr[-3000:]
        assert lines[0].startswith(f"error: cannot write --hf-dir {out}: {expected}")
        assert "nothing was left there" in lines[0] and not out.exists()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.slow
def test_hf_to_mcore_with_a_config_that_does_not_match_the_weights_is_one_line(trained, tmp):
    import shutil

    source = tmp / "hf_for_config"
    done = run_tool("convert_checkpoint.py", "mcore-to-hf", "--load", str(tmp / "run"),
                    "--hf-dir", str(source), cwd=tmp)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    bad = tmp / "hf_bad_config"
    shutil.copytree(source, bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 100  # the weights' MLPs are 128 wide
    (bad / "config.json").write_text(json.dumps(config))
    done = run_tool("convert_checkpoint.py", "hf-to-mcore", "--hf-dir", str(bad),
                    "--save", str(tmp / "mcore_bad"), cwd=tmp)  # fmt: skip
    lines = error_lines(done.stderr, "error:")
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("error: the weights do not fit the model their settings describe")
    assert "size mismatch for decoder.layers.0.mlp.linear_fc1.weight" in lines[0]
    assert not (tmp / "mcore_bad" / ckpt.TRACKER).exists()

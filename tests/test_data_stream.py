"""The training samples: Megatron-Core's shuffled `GPTDataset` order per phase, the phase
partition, blends, epochs, resumption and the data budget (issue 22)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from tst_megatron.config import STANDARD_PHASE, PhaseSpec
from tst_megatron.data import budget
from tst_megatron.data.builders import build_train_samples
from tst_megatron.data.checks import DataError
from tst_megatron.data.tokenizer import TokenizerSpec, build_training_tokenizer
from tst_megatron.testing.datasets import reference_windows, write_documents
from tst_megatron.training.run_config import settings_from_flags

VOCAB = 100_000  # token ids are positions: every token of a corpus is distinct
SEQ, GBS = 16, 4


def corpus(prefix, lengths, first=0) -> str:
    """Documents of ``lengths`` whose tokens are ``first, first + 1, ...`` (all distinct)."""
    ends = np.cumsum(lengths)
    docs = [list(range(first + e - n, first + e)) for e, n in zip(ends, lengths, strict=True)]
    return write_documents(prefix, docs)


def samples(tmp_path, data_path, *extra, iters=20):
    argv = [
        "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
        "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ),
        "--micro-batch-size", "1", "--global-batch-size", str(GBS), "--lr", "1e-3",
        "--train-iters", str(iters), "--tokenizer-type", "NullTokenizer",
        "--vocab-size", str(VOCAB), "--split", "100,0,0", "--seed", "3",
        "--data-cache-path", str(tmp_path / "cache"), "--data-path", *data_path, *extra,
    ]  # fmt: skip
    settings = settings_from_flags(argv)
    tokenizer = build_training_tokenizer(TokenizerSpec.from_settings(settings.data, VOCAB))
    data = build_train_samples(
        settings.data, settings.schedule, settings.batch, settings.tst, settings.model, tokenizer
    )
    return data, settings, tokenizer


TST = ("--tst-bag-size", "4", "--tst-phase1-fraction", "0.5")


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    rng = np.random.RandomState(0)
    a = corpus(tmp / "a", rng.randint(1, 120, 200))
    b = corpus(tmp / "b", rng.randint(1, 30, 60), first=50_000)
    return tmp, a, b


def test_windows_are_gpt_dataset_samples_blended_as_megatron_blends(two):
    tmp, a, b = two
    data, _, _ = samples(tmp, ["0.7", a, "0.3", b], *TST)
    for blend in data.phases.values():  # b is read over several epochs in phase 1
        n = len(blend.dataset_index)
        np.testing.assert_array_equal(blend.read(0, n), reference_windows(blend, 0, n))
    assert len(data.phases[1].datasets[1]) > 0 and data.phases[1].window == 4 * (SEQ + 1)


def test_a_baseline_reads_what_megatron_lm_builds_for_the_same_flags(two):
    """No TST: the samples are Megatron-LM's `BlendedDataset` of `GPTDataset`s, in order."""
    tmp, a, b = two
    data, _, tokenizer = samples(tmp, ["0.7", a, "0.3", b], iters=10)
    n = 10 * GBS
    config = GPTDatasetConfig(
        random_seed=3, sequence_length=SEQ, blend=([a, b], [0.7, 0.3]), split="100,0,0",
        path_to_cache=None, tokenizer=tokenizer,  # beside the data (BlendedDataset needs
        # torch.distributed to use a cache directory)
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
    )  # fmt: skip
    megatron = BlendedMegatronDatasetBuilder(GPTDataset, [n, 0, 0], lambda: True, config).build()
    expected = np.stack(
        [np.concatenate([item["tokens"], item["labels"][-1:]]) for item in map(
            megatron[0].__getitem__, range(n))]
    )  # fmt: skip
    np.testing.assert_array_equal(data.next_windows(STANDARD_PHASE, n), expected)
    assert not np.array_equal(expected[1:, 0], expected[:-1, -1])  # shuffled, not contiguous


def test_phase2_reads_no_token_phase1_read_while_unseen_data_remains(tmp_path):
    prefix = corpus(tmp_path / "c", [40] * 100)  # 4000 tokens, ids = positions
    data, _, _ = samples(tmp_path, [prefix], *TST, iters=10)  # reads 5*4*67 + 5*4*16
    spec1 = PhaseSpec(4, "full")
    phase1 = data.next_windows(spec1, 5 * GBS)
    phase2 = data.next_windows(STANDARD_PHASE, 5 * GBS)
    assert not set(phase1.ravel()) & set(phase2.ravel())
    assert len(set(phase1.ravel())) >= 5 * GBS * 66  # distinct samples (a shared edge at most)

    more, _, _ = samples(tmp_path, [prefix], *TST, iters=60)  # phase 1 alone: 30*4*67 > 4000
    shared = set(more.next_windows(spec1, 30 * GBS).ravel())
    assert shared == set(range(4000))  # every token read in phase 1 ...
    assert set(more.next_windows(STANDARD_PHASE, 30 * GBS).ravel()) <= shared  # no unseen left


def test_partition_is_the_shortest_seeded_prefix_and_the_rest():
    docs, lengths = np.arange(10, 20), np.full(10, 50)
    p1, p2 = budget.partition_documents(docs, lengths, 120, 17, seed=3)
    order = np.random.RandomState(3).permutation(10)
    assert list(p1) == sorted(docs[order[:3]]) and list(p2) == sorted(docs[order[3:]])
    assert budget.partition_documents(docs, lengths, 0, 17, 3)[1] is docs
    whole = budget.partition_documents(docs, lengths, 480, 17, 3)  # rest 0 < one sample
    assert list(whole[1]) == list(docs)


def test_resume_continues_exactly_and_rejects_another_blend(two):
    tmp, a, b = two
    spec1 = PhaseSpec(4, "full")
    run, _, _ = samples(tmp, ["0.7", a, "0.3", b], *TST)
    run.next_windows(spec1, 3 * GBS)
    saved = run.state.as_dict()
    assert saved["phase_samples"] == [3 * GBS, 0] and saved["plan"] == [40, 40]
    expected = run.next_windows(spec1, GBS, slice(1, 3))
    resumed, _, _ = samples(tmp, ["0.7", a, "0.3", b], *TST)
    resumed.load_state(saved)
    np.testing.assert_array_equal(resumed.next_windows(spec1, GBS, slice(1, 3)), expected)
    assert resumed.state.as_dict() == run.state.as_dict()
    alone, _, _ = samples(tmp, [a], *TST)
    with pytest.raises(DataError, match="has 2 datasets, this run has 1: resume with the same"):
        alone.load_state(saved)
    with pytest.raises(DataError, match="records the data position as token-stream cursors"):
        alone.load_state({"cursors": [0], "samples": [0]})


def test_two_partitions_of_one_dataset_have_their_own_cached_indices(tmp_path):
    prefix = corpus(tmp_path / "d", [40] * 100)
    samples(tmp_path, [prefix], "--tst-bag-size", "2", "--tst-mode", "output-only",
            "--tst-phase1-iters", "10", iters=20)  # fmt: skip
    # output-only s=2 reads L+2-token windows; phase 2 L+1: two GPTDatasets, two partitions
    descriptions = sorted((tmp_path / "cache").glob("*description.txt"))
    assert len(descriptions) == 2
    assert {"phase 1:" in d.read_text() for d in descriptions} == {True, False}


def test_budget_states_reads_and_warns_only_a_tst_run_that_repeats(two):
    tmp, a, b = two
    data, _, _ = samples(tmp, ["0.7", a, "0.3", b], *TST)
    lines = data.pop_notices()
    assert len(lines) == 3 and lines[2] == budget.TST_REPEATS_WARNING
    assert lines[0].startswith(f"data budget: dataset {a}: ")
    assert "phase 1 reads " in lines[1] and "epochs in all" in lines[1]
    fits, _, _ = samples(tmp, [a], *TST, iters=4)
    [line] = fits.pop_notices()
    read1, read2 = 2 * GBS * 67 + 1, 2 * GBS * 16 + 1
    assert f"phase 1 reads {read1:,} (" in line and f"phase 2 reads {read2:,} (" in line
    baseline, _, _ = samples(tmp, [b], iters=200)  # repeats, but no TST: no warning
    [line] = baseline.pop_notices()
    assert float(line.split("; ")[-1].split()[0]) > 1  # "N.NN epochs in all"


def test_blend_weights_are_normalised_with_a_note(two):
    tmp, a, b = two
    data, _, _ = samples(tmp, ["0.2", a, "0.2", b])
    note = data.pop_notices()[0]
    assert note == f"note: blend weights 0.2 ({a}), 0.2 ({b}) sum to 0.4; normalised to 0.5, 0.5"


def test_phase_plans_follow_the_schedule_the_fold_and_the_ramp_up(two):
    tmp, a, _ = two
    _, settings, _ = samples(tmp, [a], "--tst-bag-size", "4", "--tst-phase1-iters", "3",
                             "--tst-fold", "batch", iters=8)  # fmt: skip
    tst, schedule, batch = settings.tst, settings.schedule, settings.batch
    plan1, plan2 = budget.phase_plans(tst, schedule, batch, SEQ)
    assert (plan1.samples, plan1.window) == (3 * GBS * 4, 4 * (SEQ // 4 + 1))
    assert (plan2.samples, plan2.window) == (5 * GBS, SEQ + 1)
    batch = replace(batch, rampup_batch_size=(2, 1, 6))  # 2, 2, 2, 3, 3 (over 6), then 4
    plan1, plan2 = budget.phase_plans(tst, schedule, batch, SEQ)
    sizes = [budget.global_batch_at(batch, c) for c in (0, 2, 4, 6, 9)]
    assert sizes == [2, 2, 3, 4, 4] and plan1.samples == (2 + 2 + 3) * 4
    assert plan2.samples == 5 * 4

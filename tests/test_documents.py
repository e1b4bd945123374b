"""``--reset-position-ids`` / ``--reset-attention-mask`` / ``--eod-mask-loss`` in every layout.

References: Megatron-Core's own ``_get_ltor_masks_and_position_ids`` for standard windows, a
per-position loop that spells out the bag rule of docs/method.md for the TST layouts, and,
for the model, documents themselves: with the masks a document's per-position losses do not
depend on the tokens of the document before it, nor on where in the window it starts.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids
from megatron.core.transformer.enums import AttnMaskType

from tests.support.multirank import (
    gather_full_params,
    load_full_params,
    run_multirank,
    switch_layout,
)
from tst_megatron.config import STANDARD_PHASE, PhaseSpec
from tst_megatron.data.documents import (
    DocumentMasking,
    apply_document_masking,
    eod_target_mask,
    standard_document_fields,
)
from tst_megatron.data.masks import attention_mask_from_documents, with_document_attention
from tst_megatron.targets import build_batch

EOD = 7
LAYOUTS = [
    STANDARD_PHASE,
    PhaseSpec(4, "full"),
    PhaseSpec(4, "input-only"),
    PhaseSpec(4, "output-only"),
    PhaseSpec(3, "full"),
]


def windows_with_documents(batch: int, length: int, seed: int) -> torch.Tensor:
    """Random ids in [0, 12) with EOD = 7 about every 5 tokens, EODs in runs and at the ends."""
    gen = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, 12, (batch, length), generator=gen)
    windows[0, 0] = windows[0, -1] = windows[1, 3] = windows[1, 4] = EOD
    return windows


def flags(reset_positions: bool, reset_mask: bool) -> DocumentMasking:
    return DocumentMasking(EOD, reset_positions, reset_mask)


@pytest.mark.parametrize("reset_positions", [False, True])
@pytest.mark.parametrize("reset_mask", [False, True])
@pytest.mark.parametrize("eod_mask_loss", [False, True])
def test_standard_windows_equal_megatron_core(reset_positions, reset_mask, eod_mask_loss):
    windows = windows_with_documents(3, 33, seed=1)
    masking = flags(reset_positions, reset_mask)
    target_mask = eod_target_mask(windows, EOD) if eod_mask_loss else None
    batch = build_batch(windows, STANDARD_PHASE, 32, target_mask).as_dict()
    batch = apply_document_masking(batch, windows, STANDARD_PHASE, masking)
    for row in range(3):
        mask, loss_mask, positions = _get_ltor_masks_and_position_ids(
            windows[row, :-1].clone(), EOD, reset_positions, reset_mask, eod_mask_loss, True
        )
        torch.testing.assert_close(batch["position_ids"][row], positions, rtol=0, atol=0)
        torch.testing.assert_close(batch["loss_mask"][row], loss_mask, rtol=0, atol=0)
        ours = (
            attention_mask_from_documents(batch["document_ids"][row : row + 1])[0, 0]
            if reset_mask
            else ~torch.ones(32, 32, dtype=torch.bool).tril()  # causal: the model's default
        )
        assert torch.equal(ours, mask[0]), row
    fields = standard_document_fields(windows[:, :-1], masking)
    for key, value in fields.items():  # the validation path (inputs only) agrees
        assert torch.equal(value, batch[key]), key


def naive_layout(window: list[int], spec: PhaseSpec, latent: int) -> dict:
    """The rule of docs/method.md, one position at a time."""
    doc, current = [], 0
    for token in window:
        doc.append(current)
        current += token == EOD
    s = spec.bag_size
    bag_input = spec.mode in ("full", "input-only") and s > 1
    anchor = [(p + 1) * s - 1 if bag_input else p for p in range(latent)]
    owner = [doc[a] for a in anchor]
    positions = [p - min(q for q in range(latent) if owner[q] == owner[p]) for p in range(latent)]
    keep_tokens = bag_input and [
        [doc[p * s + k] == owner[p] for k in range(s)] for p in range(latent)
    ]
    if spec.is_standard:
        slots = [[p + 1] for p in range(latent)]
    elif spec.mode == "output-only":
        slots = [[p + 1 + k for k in range(s)] for p in range(latent)]
    elif spec.mode == "input-only":
        slots = [[(p + 1) * s] for p in range(latent)]
    else:
        slots = [[(p + 1) * s + k for k in range(s)] for p in range(latent)]
    keep_targets = [[doc[j - 1] == owner[p] for j in slots[p]] for p in range(latent)]
    visible = [[q <= p and owner[q] == owner[p] for q in range(latent)] for p in range(latent)]
    return dict(
        owner=owner,
        positions=positions,
        keep_tokens=keep_tokens,
        slots=slots,
        keep_targets=keep_targets,
        visible=visible,
    )


@pytest.mark.parametrize("spec", LAYOUTS, ids=lambda s: f"{s.mode}-s{s.bag_size}")
def test_every_layout_follows_the_document_rule(spec):
    latent = 10
    windows = windows_with_documents(2, spec.window_length(latent), seed=2)
    target_mask = eod_target_mask(windows, EOD)
    batch = build_batch(windows, spec, latent, target_mask).as_dict()
    masked = apply_document_masking(batch, windows, spec, flags(True, True))
    for row in range(2):
        ref = naive_layout(windows[row].tolist(), spec, latent)
        assert masked["document_ids"][row].tolist() == ref["owner"]
        assert masked["position_ids"][row].tolist() == ref["positions"]
        visible = ~attention_mask_from_documents(masked["document_ids"][row : row + 1])[0, 0]
        assert visible.tolist() == ref["visible"]
        if spec.input_bag_size > 1:
            keep = masked["bag_token_mask"][row].view(latent, spec.bag_size)
            assert keep.tolist() == ref["keep_tokens"]
            assert all(any(bag) for bag in ref["keep_tokens"])  # no bag is left empty
        else:
            assert "bag_token_mask" not in masked
        labels = batch["labels"][row].reshape(latent, -1)  # the naive slots are build_batch's
        assert labels.tolist() == [[windows[row, j].item() for j in slot] for slot in ref["slots"]]
        loss_mask = masked["loss_mask"][row].reshape(latent, -1)
        for p in range(latent):
            eod_kept = [windows[row, j - 1].item() != EOD for j in ref["slots"][p]]
            expected = [a and b for a, b in zip(ref["keep_targets"][p], eod_kept, strict=True)]
            assert (loss_mask[p] == 1).tolist() == expected, p


def test_flags_off_change_nothing():
    windows = windows_with_documents(2, 4 * 9, seed=3)
    batch = build_batch(windows, PhaseSpec(4, "full"), 8).as_dict()
    off = flags(False, False)
    assert apply_document_masking(batch, windows, PhaseSpec(4, "full"), off) is batch


def test_layer_spec_takes_an_arbitrary_mask():
    """Megatron-Core's causal type would let the fused softmax / TE kernels ignore the mask."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec()
    assert spec.submodules.self_attention.params["attn_mask_type"] == AttnMaskType.causal
    changed = with_document_attention(spec)
    assert changed.submodules.self_attention.params["attn_mask_type"] == AttnMaskType.arbitrary
    assert spec.submodules.self_attention.params["attn_mask_type"] == AttnMaskType.causal


# --------------------------------------------------------------------------------------------
# The model: documents isolated in both phases, TP = 2 with sequence parallel, bf16
# --------------------------------------------------------------------------------------------

MODEL = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "8", "--max-position-embeddings", "8", "--transformer-impl", "local",
    "--position-embedding-type", "learned_absolute", "--hidden-dropout", "0",
    "--attention-dropout", "0", "--micro-batch-size", "1", "--global-batch-size", "2",
    "--train-iters", "4", "--lr", "1e-3", "--mock-data", "--vocab-size", "128",
    "--tst-bag-size", "4", "--tst-phase1-fraction", "0.5", "--seed", "3",
]  # fmt: skip


def _model(tp: int, masks: bool, bf16: bool = False):
    from tests.model_settings import model_of
    from tst_megatron.training.run_config import settings_from_flags

    extra = ["--reset-attention-mask", "--reset-position-ids"] if masks else []
    if tp > 1:
        extra += ["--tensor-model-parallel-size", str(tp), "--sequence-parallel"]
    if bf16:  # rope: learned positions in bf16 need issue 11's Float16Module wrapping
        extra += ["--bf16", "--position-embedding-type", "rope"]
    settings = settings_from_flags([*MODEL, *extra], 2).with_padded_vocab_size(256)
    torch.manual_seed(11)
    return model_of(settings)


def _losses(model, spec: PhaseSpec, windows: torch.Tensor, masks: bool) -> torch.Tensor:
    """Per-position losses ``[b, L]`` through the trainer's own forward step."""
    from tst_megatron.training.loop import forward_step

    batch = build_batch(windows, spec, 8).as_dict()
    batch = apply_document_masking(batch, windows, spec, flags(masks, masks))
    model.set_phase(spec)
    with torch.no_grad():
        output, _ = forward_step(iter([batch]), model)
    return output.float()


def _cases(spec: PhaseSpec, seed: int) -> dict:
    """[A | B] and the same with A's tokens changed; [A' | B] with B from latent position 3
    and B alone. Ids other than EOD are drawn from [8, 100)."""
    gen = torch.Generator().manual_seed(seed)
    length = spec.window_length(8)
    b_doc = torch.randint(8, 100, (length,), generator=gen)
    a_end = 5 if spec.is_standard else (10 if spec.input_bag_size > 1 else 3)  # A's EOD
    first = b_doc.clone()
    first[:a_end] = torch.randint(8, 100, (a_end,), generator=gen)
    first[a_end] = EOD
    changed = first.clone()
    changed[:a_end] = torch.randint(8, 100, (a_end,), generator=gen)
    token_split = 3 * spec.input_bag_size
    placed = torch.cat([torch.randint(8, 100, (token_split,), generator=gen), b_doc])[:length]
    placed[token_split - 1] = EOD
    return dict(first=first, changed=changed, placed=placed, alone=b_doc, a_end=a_end)


def _isolation_checks() -> dict:
    results = {}
    specs = {
        "standard": STANDARD_PHASE,
        "full": PhaseSpec(4, "full"),
        "input-only": PhaseSpec(4, "input-only"),
        "output-only": PhaseSpec(4, "output-only"),
    }
    models = {True: _model(1, True), False: _model(1, False)}
    for name, spec in specs.items():
        case = _cases(spec, seed=len(name))
        for masks in (True, False):
            pair = torch.stack([case["first"], case["changed"]])
            results[name, masks, "isolation"] = _losses(models[masks], spec, pair, masks)
        pair = torch.stack([case["placed"], case["alone"]])
        results[name, "placement"] = _losses(models[True], spec, pair, True)
        results[name, "a_end"] = case["a_end"]
    bf16 = _model(1, True, bf16=True)
    case = _cases(specs["full"], seed=4)
    pair = torch.stack([case["first"], case["changed"]])
    results["bf16", "isolation"] = _losses(bf16, specs["full"], pair, True)
    results["bf16", "a_end"] = case["a_end"]
    # TP = 2 with sequence parallel: every rank's bag mask slice, against TP = 1
    full_params = gather_full_params([models[True]])
    results["tp1"] = _losses(models[True], specs["full"], pair, True)
    switch_layout(tp=2)
    tp2 = _model(2, True)
    load_full_params([tp2], full_params)
    results["tp2"] = _losses(tp2, specs["full"], pair, True)
    return results


@pytest.fixture(scope="module")
def isolation():
    return run_multirank(_isolation_checks, 2, timeout_s=600)[0]


@pytest.mark.parametrize("name", ["standard", "full", "input-only", "output-only"])
def test_a_document_does_not_see_the_one_before_it(isolation, name):
    """Changing document A leaves every position of document B bit for bit unchanged."""
    owner_of_b = _first_b_position(name, isolation[name, "a_end"])
    masked = isolation[name, True, "isolation"]
    assert torch.equal(masked[0, owner_of_b:], masked[1, owner_of_b:])
    assert not torch.equal(masked[0, :owner_of_b], masked[1, :owner_of_b])
    unmasked = isolation[name, False, "isolation"]  # control: without the flags B sees A
    assert not torch.equal(unmasked[0, owner_of_b:], unmasked[1, owner_of_b:])


@pytest.mark.parametrize("name", ["standard", "full", "input-only", "output-only"])
def test_a_document_is_trained_the_same_wherever_it_starts(isolation, name):
    """B after another document (from latent position 3) = B at the start of a window."""
    placed, alone = isolation[name, "placement"]
    torch.testing.assert_close(placed[3:], alone[:5], rtol=1e-5, atol=1e-5)


def test_bf16_isolation_and_tensor_parallel_bag_masks(isolation):
    owner_of_b = _first_b_position("full", isolation["bf16", "a_end"])
    bf16 = isolation["bf16", "isolation"]
    assert torch.equal(bf16[0, owner_of_b:], bf16[1, owner_of_b:])
    torch.testing.assert_close(isolation["tp2"], isolation["tp1"], rtol=1e-5, atol=1e-5)


def _first_b_position(name: str, a_end: int) -> int:
    """First latent position of document B: the first whose anchor, its last input token
    ``(p+1)*s - 1``, lies after A's EOD."""
    s = 4 if name in ("full", "input-only") else 1
    return -(-(a_end + 2) // s) - 1


# --------------------------------------------------------------------------------------------
# Combinations refused up front
# --------------------------------------------------------------------------------------------


def _validate(*extra: str, world: int = 2):
    from tst_megatron.training.arguments import parse_args, validate_args

    args = parse_args([*MODEL, *extra])
    validate_args(args, world)
    return args


def test_context_parallel_with_document_masks_is_refused():
    from tst_megatron.training.arguments import ConfigError

    with pytest.raises(ConfigError) as info:
        _validate("--reset-attention-mask", "--context-parallel-size", "2")
    assert str(info.value) == (
        "--reset-attention-mask cannot be combined with --context-parallel-size 2: "
        "context-parallel attention (Transformer Engine's ring attention) takes no arbitrary "
        "document mask; use --context-parallel-size 1 or drop --reset-attention-mask"
    )
    assert _validate("--reset-position-ids", "--context-parallel-size", "2").reset_position_ids


@pytest.mark.parametrize("kind", ["rope", "none"])
def test_position_restart_without_position_ids_needs_the_document_mask(kind):
    from tst_megatron.training.arguments import ConfigError

    with pytest.raises(ConfigError) as info:
        _validate("--reset-position-ids", "--position-embedding-type", kind)
    assert str(info.value).startswith(
        f"--reset-position-ids has no effect with --position-embedding-type {kind}: "
        "Megatron-Core's rotary embedding takes positions 0..L-1 from the sequence"
    )
    _validate("--reset-position-ids", "--reset-attention-mask", "--position-embedding-type", kind)


def test_document_mask_without_the_data_loader_mask_is_refused():
    from tst_megatron.training.arguments import ConfigError

    with pytest.raises(ConfigError, match=r"^--reset-attention-mask needs the document mask"):
        _validate("--reset-attention-mask", "--no-create-attention-mask-in-dataloader")
    assert not _validate("--no-create-attention-mask-in-dataloader").reset_attention_mask

"""Bag averaging against an explicit loop, in both layouts."""

import pytest
import torch

from tst_megatron.bags import average_bags, average_bags_batch_first


def test_average_bags_matches_loop():
    torch.manual_seed(0)
    s, latent, b, h = 3, 5, 2, 4
    emb = torch.randn(s * latent, b, h)
    out = average_bags(emb, s)
    assert out.shape == (latent, b, h)
    for i in range(latent):
        torch.testing.assert_close(out[i], emb[i * s : (i + 1) * s].mean(0))


def test_average_bags_identity_and_errors():
    emb = torch.randn(6, 1, 2)
    assert average_bags(emb, 1) is emb
    with pytest.raises(ValueError, match="6 embeddings is not a whole number of bags of 4"):
        average_bags(emb, 4)
    with pytest.raises(ValueError, match="bag_size must be >= 1, got 0"):
        average_bags(emb, 0)


def test_batch_first_average_equals_average_bags():
    torch.manual_seed(1)
    s, latent, b, h, vocab = 4, 6, 3, 5, 50
    table = torch.randn(vocab, h)
    ids = torch.randint(0, vocab, (b, s * latent))
    got = average_bags_batch_first(table[ids], s)  # [b, L, h]
    expected = average_bags(table[ids].transpose(0, 1), s).transpose(0, 1)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="input of 10 tokens per sample is not a whole number"):
        average_bags_batch_first(torch.zeros(1, 10, 2), 4)


def test_average_bags_accumulates_in_fp32():
    emb = torch.full((16, 1, 1), 1.0, dtype=torch.bfloat16)
    emb[0] = 256.0
    out = average_bags(emb, 16)
    assert out.dtype == torch.bfloat16
    assert out.item() == pytest.approx((256 + 15) / 16, rel=1e-2)
    assert average_bags_batch_first(emb.view(1, 16, 1), 16).item() == out.item()


def test_batch_first_average_with_a_token_mask_matches_loop():
    """``--reset-attention-mask``: each bag averages only its kept tokens, in fp32."""
    torch.manual_seed(2)
    s, latent, b, h = 4, 5, 2, 3
    emb = torch.randn(b, s * latent, h).bfloat16()
    keep = torch.rand(b, s * latent) > 0.4
    keep[:, ::s] = True  # no bag is left empty (documents.py guarantees it)
    out = average_bags_batch_first(emb, s, keep)
    assert out.dtype == torch.bfloat16
    for j in range(b):
        for i in range(latent):
            kept = [emb[j, i * s + k].float() for k in range(s) if keep[j, i * s + k]]
            expected = (sum(kept) / len(kept)).bfloat16()
            torch.testing.assert_close(out[j, i], expected, atol=0, rtol=0)
    everything = torch.ones_like(keep)
    unmasked = average_bags_batch_first(emb, s)
    assert torch.equal(average_bags_batch_first(emb, s, everything), unmasked)

"""Tests of the pretraining objectives against independent references."""

import math

import pytest
import torch
import torch.nn.functional as F

from svitt_ego.losses import (
    ego_nce,
    info_nce,
    mask_tokens,
    mlm_loss,
    replacement_ids,
    sample_vtm_negatives,
    vtm_loss,
    vtm_pairs,
)

# A hand-made, asymmetric positive mask with a False diagonal entry (the diagonal must still count).
POS_MASK = torch.tensor(
    [
        [1, 1, 0, 0, 0],
        [0, 1, 0, 1, 0],
        [1, 0, 0, 0, 0],
        [0, 1, 0, 1, 1],
        [0, 0, 0, 0, 1],
    ],
    dtype=torch.bool,
)


def reference_ego_nce(video, text, pos_mask, temperature):
    """EgoNCE with python loops in float64, straight from the formula."""
    n = len(video)

    def unit(row):
        norm = math.sqrt(sum(x * x for x in row))
        return [x / norm for x in row]

    v = [unit(r) for r in video.tolist()]
    t = [unit(r) for r in text.tolist()]
    s = [[sum(a * b for a, b in zip(v[i], t[j])) / temperature for j in range(n)] for i in range(n)]
    pos = [[bool(pos_mask[i][j]) or i == j for j in range(n)] for i in range(n)]
    v2t = t2v = 0.0
    for i in range(n):
        positives = sum(math.exp(s[i][j]) for j in range(n) if pos[i][j])
        v2t += math.log(positives / sum(math.exp(s[i][j]) for j in range(n)))
    for j in range(n):
        positives = sum(math.exp(s[i][j]) for i in range(n) if pos[i][j])
        t2v += math.log(positives / sum(math.exp(s[i][j]) for i in range(n)))
    return -(v2t + t2v) / n


def embeddings(n=5, dim=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=dtype), torch.randn(n, dim, generator=g, dtype=dtype)


# --------------------------------------------------------------------------- EgoNCE / InfoNCE


@pytest.mark.parametrize("temperature", [0.05, 0.5, 1.0])
def test_ego_nce_matches_explicit_loops(temperature):
    video, text = embeddings()
    expected = reference_ego_nce(video, text, POS_MASK, temperature)
    assert ego_nce(video, text, POS_MASK, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_equals_cross_entropy_both_ways():
    video, text = embeddings(n=6, dim=4)
    logits = F.normalize(video, dim=-1) @ F.normalize(text, dim=-1).T / 0.07
    labels = torch.arange(6)
    expected = F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)
    torch.testing.assert_close(info_nce(video, text, 0.07), expected)


def test_ego_nce_identity_mask_is_info_nce_and_diagonal_always_positive():
    video, text = embeddings()
    eye = torch.eye(5, dtype=torch.bool)
    torch.testing.assert_close(ego_nce(video, text, eye, 0.1), info_nce(video, text, 0.1))
    no_positives = torch.zeros(5, 5, dtype=torch.bool)
    torch.testing.assert_close(ego_nce(video, text, no_positives, 0.1), info_nce(video, text, 0.1))
    torch.testing.assert_close(ego_nce(video, text, POS_MASK, 0.1), ego_nce(video, text, POS_MASK | eye, 0.1))


def test_ego_nce_gradcheck():
    video, text = embeddings(n=4, dim=3)
    temperature = torch.tensor(0.3, dtype=torch.float64)
    inputs = [x.requires_grad_() for x in (video, text, temperature)]
    assert torch.autograd.gradcheck(lambda v, t, tau: ego_nce(v, t, POS_MASK[:4, :4], tau), inputs)


def test_learnable_temperature_gets_gradient():
    video, text = embeddings(dtype=torch.float32)
    log_temperature = torch.tensor(math.log(0.07), requires_grad=True)
    ego_nce(video, text, POS_MASK, log_temperature.exp()).backward()
    assert log_temperature.grad is not None and log_temperature.grad.abs() > 0


def test_ego_nce_is_stable_and_float32_under_autocast():
    video, text = embeddings(n=8, dim=16, dtype=torch.float32)
    expected = ego_nce(video, text, None, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ego_nce(video.bfloat16(), text.bfloat16(), None, 0.07)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)
    # A tiny temperature gives logits of ~1000: no overflow.
    assert torch.isfinite(ego_nce(video, text, None, 1e-3))


# --------------------------------------------------------------------------- VTM


def masked_softmax(sim, blocked):
    return sim.masked_fill(blocked, float("-inf")).softmax(dim=1)


def test_sample_vtm_negatives_never_positive():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        sim = torch.randn(6, 6, generator=g) * 3
        pos = torch.rand(6, 6, generator=g) < 0.3
        blocked = pos | torch.eye(6, dtype=torch.bool)
        neg_text, neg_video = sample_vtm_negatives(sim, pos, generator=g)
        rows = torch.arange(6)
        # Rows (columns) made only of positives fall back to any other index.
        assert not (blocked[rows, neg_text] & ~blocked.all(dim=1)).any()
        assert not (blocked[neg_video, rows] & ~blocked.all(dim=0)).any()
        assert not ((neg_text == rows) | (neg_video == rows)).any()


def test_sample_vtm_negatives_follows_masked_softmax():
    sim = torch.tensor(
        [[2.0, 1.0, 0.0, -1.0], [0.5, 1.5, 0.2, 1.0], [1.0, 1.0, 3.0, 0.0], [0.0, 2.0, 1.0, 0.0]]
    )
    pos = torch.zeros(4, 4, dtype=torch.bool)
    pos[0, 1] = pos[2, 3] = True
    blocked = pos | torch.eye(4, dtype=torch.bool)
    g = torch.Generator().manual_seed(1)
    draws = 4000
    text_counts, video_counts = torch.zeros(4, 4), torch.zeros(4, 4)
    for _ in range(draws):
        neg_text, neg_video = sample_vtm_negatives(sim, pos, generator=g)
        text_counts[torch.arange(4), neg_text] += 1
        video_counts[torch.arange(4), neg_video] += 1
    expected = ((text_counts, masked_softmax(sim, blocked)), (video_counts, masked_softmax(sim.T, blocked.T)))
    for counts, probs in expected:
        std = (probs * (1 - probs) / draws).sqrt()
        assert ((counts / draws - probs).abs() <= 5 * std + 1e-6).all()
        assert (counts[probs == 0] == 0).all()


def test_sample_vtm_negatives_fallback_and_reproducibility():
    sim = torch.randn(3, 3)
    pos = torch.zeros(3, 3, dtype=torch.bool)
    pos[0] = True  # video 0 has no negative text: a uniformly random other text
    neg_text, _ = sample_vtm_negatives(sim, pos, generator=torch.Generator().manual_seed(0))
    assert neg_text[0] != 0
    a = sample_vtm_negatives(sim, None, generator=torch.Generator().manual_seed(5))
    b = sample_vtm_negatives(sim, None, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_sample_vtm_negatives_survives_non_finite_similarities():
    """An fp16 overflow upstream gives NaN / inf similarities: the draw must not crash (the loss is
    non-finite anyway and training skips the step)."""
    sim = torch.randn(4, 4)
    sim[1, 2], sim[3] = float("nan"), float("inf")
    neg_text, neg_video = sample_vtm_negatives(sim, None, generator=torch.Generator().manual_seed(0))
    assert ((neg_text >= 0) & (neg_text < 4) & (neg_text != torch.arange(4))).all()
    assert ((neg_video >= 0) & (neg_video < 4) & (neg_video != torch.arange(4))).all()


def test_vtm_pairs_layout():
    text, mask, video = torch.arange(3)[:, None, None] * 10.0, torch.arange(3)[:, None], torch.arange(3)[:, None, None]
    neg_text, neg_video = torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])
    t, m, v = vtm_pairs(text, mask, video, neg_text, neg_video)
    assert t.flatten().tolist() == [0, 10, 20, 20, 0, 10, 0, 10, 20] and m.flatten().tolist() == [0, 1, 2, 2, 0, 1, 0, 1, 2]
    assert v.flatten().tolist() == [0, 1, 2, 0, 1, 2, 1, 2, 0]


def test_vtm_loss_layout():
    logits = torch.randn(6, 2, dtype=torch.float64)
    log_p = logits.log_softmax(dim=1)
    expected = -(log_p[:2, 1].sum() + log_p[2:, 0].sum()) / 6
    torch.testing.assert_close(vtm_loss(logits, batch_size=2), expected.float())
    with pytest.raises(ValueError):
        vtm_loss(logits, batch_size=3)


# --------------------------------------------------------------------------- MLM

CLS, SEP, PAD, MASK, UNK = 101, 102, 0, 103, 100  # BERT uncased WordPiece's (and MiniLM's) special ids
SPECIALS = (CLS, SEP, PAD, MASK, UNK)
VOCAB = 1000


def text_batch(batch=3000, length=32, seed=0):
    """[CLS] tokens [SEP] [PAD]..., 1 to length-2 real tokens per row, ids drawn outside the specials."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(200, VOCAB, (batch, length), generator=g)
    lengths = torch.randint(1, length - 1, (batch,), generator=g)
    positions = torch.arange(length)
    attention = positions <= lengths[:, None] + 1
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths + 1] = SEP
    ids[~attention] = PAD
    return ids, attention.long()


def test_mask_tokens_statistics():
    ids, attention = text_batch()
    masked, labels = mask_tokens(
        ids, attention, mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIALS,
        probability=0.5, generator=torch.Generator().manual_seed(0),
    )
    maskable = attention.bool() & (ids != CLS) & (ids != SEP)
    selected = labels != -100

    assert not (selected & ~maskable).any()
    assert torch.equal(masked[~maskable], ids[~maskable])
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    assert selected.any(dim=1).all()
    # ~50% selected (slightly more: the at-least-one guarantee).
    assert selected.sum() / maskable.sum() == pytest.approx(0.5, abs=0.02)

    n = selected.sum().item()
    to_mask = (masked[selected] == MASK).sum().item() / n
    kept = (masked[selected] == ids[selected]).sum().item() / n
    randomised = 1 - to_mask - kept
    assert to_mask == pytest.approx(0.8, abs=0.01)
    assert randomised == pytest.approx(0.1, abs=0.01)
    assert kept == pytest.approx(0.1, abs=0.01)
    assert not torch.isin(masked[selected & (masked != MASK)], torch.tensor(SPECIALS)).any()


def test_mask_tokens_at_least_one_per_sequence():
    ids, attention = text_batch(batch=50, length=8, seed=1)
    ids[0, 1:] = PAD  # a sequence with nothing to mask: [CLS] then padding
    attention[0, 1:] = 0
    _, labels = mask_tokens(
        ids, attention, mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=SPECIALS,
        probability=0.0, generator=torch.Generator().manual_seed(0),
    )
    counts = (labels != -100).sum(dim=1)
    assert counts[0] == 0
    assert (counts[1:] == 1).all()


def test_mlm_loss():
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[-100, 3, -100, 1], [-100, -100, 6, -100]])
    log_p = logits.log_softmax(dim=-1)
    expected = -(log_p[0, 1, 3] + log_p[0, 3, 1] + log_p[1, 2, 6]) / 3
    torch.testing.assert_close(mlm_loss(logits, labels), expected)

    logits.requires_grad_()
    empty = mlm_loss(logits, torch.full((2, 4), -100))
    empty.backward()
    assert empty.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_mask_tokens_with_precomputed_replacements_is_the_same_draw():
    ids, attention = text_batch(batch=64)
    kwargs = dict(mask_token_id=MASK, vocab_size=VOCAB, probability=0.15)
    plain = mask_tokens(ids, attention, special_token_ids=SPECIALS, generator=torch.Generator().manual_seed(3),
                        **kwargs)
    cached = mask_tokens(ids, attention, special_token_ids=torch.tensor(SPECIALS),
                         replacements=replacement_ids(VOCAB, SPECIALS, MASK),
                         generator=torch.Generator().manual_seed(3), **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(plain, cached))
    assert not torch.isin(replacement_ids(VOCAB, SPECIALS, MASK), torch.tensor(SPECIALS)).any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mask_tokens_does_not_sync_with_the_host_on_cuda():
    device = torch.device("cuda")
    ids, attention = (t.to(device) for t in text_batch(batch=64))
    special, replacements = torch.tensor(SPECIALS, device=device), replacement_ids(VOCAB, SPECIALS, MASK).to(device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mask_tokens(ids, attention, mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=special,
                    replacements=replacements)
    finally:
        torch.cuda.set_sync_debug_mode("default")


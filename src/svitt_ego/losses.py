"""Pretraining objectives: EgoNCE / InfoNCE, video-text matching (VTM) and masked language modelling (MLM).

Also the helpers they need: hard-negative sampling for VTM, the VTM row layout
and BERT-style token masking. All losses compute in (at least) float32, whatever
the autocast dtype of their inputs. :mod:`svitt_ego.objective` combines them.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- contrastive


def ego_nce(
    video_emb: torch.Tensor,
    text_emb: torch.Tensor,
    pos_mask: Optional[torch.Tensor],
    temperature: Union[float, torch.Tensor],
) -> torch.Tensor:
    """EgoNCE: InfoNCE where every text in ``P_i`` counts as a positive of video ``i``.

    With ``s = normalize(v) @ normalize(t).T / temperature`` ([N, N]):

    ``L = -mean_i log(sum_{j in P_i} exp(s_ij) / sum_j exp(s_ij))
         - mean_j log(sum_{i in P_j} exp(s_ij) / sum_i exp(s_ij))``

    (video->text plus text->video, summed, as in EgoVLP).

    Args:
        video_emb: [N, D] video embeddings; row ``i`` is paired with text ``i``.
        text_emb: [N, D] text embeddings.
        pos_mask: [N, N] bool, True where text ``j`` is a positive of video ``i``.
            The diagonal always counts as positive. ``None`` means the identity (InfoNCE).
        temperature: a float or a 0-dim tensor (it may require grad, e.g. a learned one).
    """
    n = video_emb.shape[0]
    if video_emb.shape != text_emb.shape:
        raise ValueError(
            f"video_emb {tuple(video_emb.shape)} and text_emb {tuple(text_emb.shape)} differ in shape"
        )
    eye = torch.eye(n, dtype=torch.bool, device=video_emb.device)
    if pos_mask is None:
        pos = eye
    else:
        if pos_mask.shape != (n, n):
            raise ValueError(f"pos_mask must be [{n}, {n}], got {tuple(pos_mask.shape)}")
        pos = pos_mask.to(device=video_emb.device, dtype=torch.bool) | eye

    dtype = torch.promote_types(video_emb.dtype, torch.float32)  # at least float32
    with torch.autocast(device_type=video_emb.device.type, enabled=False):
        v = F.normalize(video_emb.to(dtype), dim=-1)
        t = F.normalize(text_emb.to(dtype), dim=-1)
        if isinstance(temperature, torch.Tensor):
            temperature = temperature.to(dtype)
        sim = v @ t.T / temperature
        pos_sim = sim.masked_fill(~pos, float("-inf"))
        v2t = torch.logsumexp(pos_sim, dim=1) - torch.logsumexp(sim, dim=1)
        t2v = torch.logsumexp(pos_sim, dim=0) - torch.logsumexp(sim, dim=0)
        return -(v2t.mean() + t2v.mean())


def info_nce(
    video_emb: torch.Tensor, text_emb: torch.Tensor, temperature: Union[float, torch.Tensor]
) -> torch.Tensor:
    """Symmetric InfoNCE (video->text plus text->video): :func:`ego_nce` with only the diagonal positive."""
    return ego_nce(video_emb, text_emb, None, temperature)


# --------------------------------------------------------------------------- video-text matching


def _sample_rows(
    sim: torch.Tensor, blocked: torch.Tensor, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """Draw one column per row from ``softmax(sim)`` restricted to entries not ``blocked``.

    A row with every entry blocked draws uniformly among the columns other than its own index.
    """
    n = sim.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    logits = sim.masked_fill(blocked, float("-inf"))
    all_blocked = blocked.all(dim=1, keepdim=True)
    uniform_others = torch.zeros_like(sim).masked_fill(eye, float("-inf"))
    logits = torch.where(all_blocked, uniform_others, logits)
    probs = logits.softmax(dim=1)
    gen_device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(gen_device), 1, generator=generator).squeeze(1).to(sim.device)


@torch.no_grad()
def sample_vtm_negatives(
    sim: torch.Tensor, pos_mask: Optional[torch.Tensor], generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives for VTM, drawn from the softmax of the similarities with positives excluded.

    Args:
        sim: [B, B] video-text similarity (rows videos, columns texts), usually already
            divided by the temperature. No gradient flows through the sampling.
        pos_mask: [B, B] bool, True where text ``j`` is a positive of video ``i``
            (the diagonal is always excluded too); ``None`` excludes only the diagonal.
        generator: optional random generator, for reproducible draws.

    Returns:
        ``(neg_text_idx, neg_video_idx)``, both [B] long: for each video ``i`` a text drawn
        from ``softmax(sim[i, :])`` over its non-positives, and for each text ``j`` a video
        drawn from ``softmax(sim[:, j])`` over its non-positives. If every entry of a row
        (column) is a positive, the draw falls back to a uniformly random other index,
        which is then a positive: there is no negative to draw. A non-finite similarity (an
        fp16 overflow upstream) counts as 0 so that the draw still succeeds: the loss of such
        a step is non-finite too, and training skips the step (``train.max_nonfinite``).
    """
    n = sim.shape[0]
    if sim.shape != (n, n) or n < 2:
        raise ValueError(f"sim must be [B, B] with B >= 2, got {tuple(sim.shape)}")
    sim = sim.detach().float().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    blocked = torch.eye(n, dtype=torch.bool, device=sim.device)
    if pos_mask is not None:
        blocked = blocked | pos_mask.to(device=sim.device, dtype=torch.bool)
    neg_text_idx = _sample_rows(sim, blocked, generator)
    neg_video_idx = _sample_rows(sim.T, blocked.T, generator)
    return neg_text_idx, neg_video_idx


def vtm_pairs(
    text: torch.Tensor, mask: torch.Tensor, video: torch.Tensor, neg_text: torch.Tensor, neg_video: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``3B`` video-text pairs the VTM head sees, as aligned (text, mask, video) rows:

    ``[(v_i, t_i) for i] + [(v_i, t_neg(i)) for i] + [(v_neg(j), t_j) for j]``

    i.e. rows ``0..B-1`` are positives and rows ``B..3B-1`` negatives (:func:`vtm_loss`'s labels).

    Args:
        text: [B, L, C] text hidden states; mask: [B, L] their attention mask.
        video: [B, N, D] video tokens.
        neg_text, neg_video: [B] the hard negatives of :func:`sample_vtm_negatives`.
    """
    return (torch.cat([text, text[neg_text], text]), torch.cat([mask, mask[neg_text], mask]),
            torch.cat([video, video, video[neg_video]]))


def vtm_loss(logits: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Two-way cross-entropy of the VTM head on the ``3B`` pairs of :func:`vtm_pairs`:
    rows ``0..B-1`` are positives (label 1), rows ``B..3B-1`` negatives (label 0).

    Args:
        logits: [3B, 2] VTM logits (class 1 = "matches").
        batch_size: B.
    """
    if logits.shape != (3 * batch_size, 2):
        raise ValueError(f"logits must be [3 * {batch_size}, 2], got {tuple(logits.shape)}")
    labels = torch.zeros(3 * batch_size, dtype=torch.long, device=logits.device)
    labels[:batch_size] = 1
    return F.cross_entropy(logits.float(), labels)


# --------------------------------------------------------------------------- masked language modelling


def _rand(shape: torch.Size, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, returned on ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _randint(
    high: int, shape: torch.Size, generator: Optional[torch.Generator], device: torch.device
) -> torch.Tensor:
    """Uniform integers in [0, high) drawn on the generator's device, returned on ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.randint(high, shape, generator=generator, device=gen_device).to(device)


def replacement_ids(vocab_size: int, special_token_ids: Iterable[int], mask_token_id: int) -> torch.Tensor:
    """The ids BERT masking may put in place of a token: the vocabulary without special ids and [MASK]."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[[i for i in set(special_token_ids) if i < vocab_size]] = False
    allowed[mask_token_id] = False
    return allowed.nonzero().squeeze(1)


def _select(maskable: torch.Tensor, probability: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Each maskable token with ``probability``; in a row that drew none, its maskable token of largest draw.

    All draws of such a row are >= ``probability`` and independent, so that token is uniformly random
    among the row's maskable ones; taking it from the same draw needs no host sync and no second draw.
    """
    draw = _rand(maskable.shape, generator, maskable.device)
    selected = (draw < probability) & maskable
    missing = maskable.any(dim=1) & ~selected.any(dim=1)
    pick = draw.masked_fill(~maskable, -1.0).argmax(dim=1, keepdim=True)
    columns = torch.arange(maskable.shape[1], device=maskable.device)
    return selected | (missing[:, None] & (columns == pick))


@torch.no_grad()
def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Iterable[int],
    probability: float = 0.5,
    generator: Optional[torch.Generator] = None,
    replacements: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: select tokens with ``probability``; of those 80% -> [MASK], 10% -> random, 10% kept.

    Only real (``attention_mask`` 1), non-special tokens can be selected. Every sequence
    with at least one such token gets at least one selected: if the draw selected none,
    one of its maskable tokens is picked uniformly at random. Random replacements are drawn
    uniformly from the vocabulary without the special ids and ``mask_token_id`` (they may
    equal the original token, as in BERT).

    Args:
        input_ids: [B, L] token ids.
        attention_mask: [B, L], 1 for real tokens, 0 for padding.
        mask_token_id: id of [MASK].
        vocab_size: size of the vocabulary.
        special_token_ids: ids never selected ([CLS], [SEP], [PAD], ...), or a tensor of them.
        probability: selection probability per maskable token.
        generator: optional random generator, for reproducible masks.
        replacements: :func:`replacement_ids`, if computed once already (then masking runs
            without a host-device sync when ``special_token_ids`` is a tensor on the device).

    Returns:
        ``(masked_ids, labels)``: the corrupted ids, and labels holding the original id at
        selected positions and -100 elsewhere.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    device, shape = input_ids.device, input_ids.shape
    if not torch.is_tensor(special_token_ids):
        special_token_ids = torch.tensor(sorted(set(special_token_ids)))
    special = special_token_ids.to(device=device, dtype=input_ids.dtype)
    if replacements is None:
        replacements = replacement_ids(vocab_size, special_token_ids.tolist(), mask_token_id)
    selected = _select(attention_mask.bool() & ~torch.isin(input_ids, special), probability, generator)

    action = _rand(shape, generator, device)
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    replacements = replacements.to(device=device, dtype=input_ids.dtype)
    random_ids = replacements[_randint(len(replacements), shape, generator, device)]

    masked_ids = input_ids.masked_fill(to_mask, mask_token_id)
    masked_ids = torch.where(to_random, random_ids, masked_ids)
    labels = input_ids.masked_fill(~selected, IGNORE_INDEX)
    return masked_ids, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the masked tokens (``labels != -100``), averaged over them.

    Args:
        logits: [B, L, V] MLM logits.
        labels: [B, L] original ids at masked positions, -100 elsewhere.

    Returns 0 (still connected to ``logits``) when no token is masked.
    """
    labels = labels.reshape(-1)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / labels.ne(IGNORE_INDEX).sum().clamp(min=1)


# --------------------------------------------------------------------------- max-margin ranking


def max_margin_ranking(video_emb: torch.Tensor, text_emb: torch.Tensor, relevancy: Optional[torch.Tensor] = None,
                       margin: float = 0.2) -> torch.Tensor:
    """The multi-instance max-margin ranking loss of EK-100 MIR fine-tuning, weighted by relevancy.

    With ``s = v @ t.T`` ([N, N], cosines of row ``i``'s pair), every other pair ``(i, j)`` costs
    ``relu(margin - (s_ii - s_ij))`` (video ``i`` against text ``j``) plus ``relu(margin - (s_jj - s_ij))``
    (text ``j`` against video ``i``), weighted by ``1 - relevancy[i, j]``: a pair as relevant as the
    true one is no negative. The sum is divided by ``2 N (N - 1)``, so that without ``relevancy`` (no
    pair relevant) this is LaViLa's and EgoVLP's ``MaxMarginRankingLoss(margin, fix_norm=True)``.

    Args:
        video_emb, text_emb: [N, D] L2-normalised embeddings; row ``i`` of each is a pair.
        relevancy: [N, N] in [0, 1] (symmetric); None means 0 off the diagonal.
    """
    n = video_emb.shape[0]
    if video_emb.shape != text_emb.shape or n < 2:
        raise ValueError(f"expected two [N, D] embeddings with N >= 2, got {tuple(video_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    dtype = torch.promote_types(video_emb.dtype, torch.float32)
    with torch.autocast(device_type=video_emb.device.type, enabled=False):
        sim = video_emb.to(dtype) @ text_emb.to(dtype).T
        true = sim.diagonal()
        video_to_text = F.relu(margin - (true[:, None] - sim))  # row i: video i, column j: text j
        text_to_video = F.relu(margin - (true[None, :] - sim))  # column j: text j against video i
        weight = 1 - torch.eye(n, dtype=dtype, device=sim.device)
        if relevancy is not None:
            if relevancy.shape != (n, n):
                raise ValueError(f"relevancy must be [{n}, {n}], got {tuple(relevancy.shape)}")
            weight = weight * (1 - relevancy.to(device=sim.device, dtype=dtype))
        return ((video_to_text + text_to_video) * weight).sum() / (2 * n * (n - 1))

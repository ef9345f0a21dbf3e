"""The held-out checks of the multimodal encoder: VTM pairs, content-word masking, the whole report."""

import pytest
import torch
from helpers import FRAMES, SMALL_MODEL, mcq_question, write_egomcq

from svitt_ego.config import load_config
from svitt_ego.data.egomcq import Clip
from svitt_ego.fusion_checks import (MATCH, OTHER_VIDEO, SAME_VIDEO, fusion_checks, heldout_clips, heldout_pairs,
                                     mask_content_words, shuffled_partners, vtm_accuracy, vtm_probabilities)
from svitt_ego.models import SViTTEgo

CLIPS = [Clip("v1", 0.0, 1.0, "#C C picks up the blue ball"), Clip("v1", 2.0, 3.0, "#C C pushes the red box"),
         Clip("v2", 0.0, 1.0, "#C C picks up the blue ball"), Clip("v3", 1.0, 2.0, "#C C turns the cup")]


def _model(video_root, egomcq="unused.json"):
    cfg = load_config("tiny", [*SMALL_MODEL, f"model.vision.num_frames={FRAMES}", f"data.video_root={video_root}",
                               "data.chunk_seconds=2.0", "data.num_workers=0", f"data.egomcq={egomcq}"])
    return SViTTEgo(cfg.model).eval(), cfg


def test_heldout_pairs_match_same_video_other_video():
    pairs = heldout_pairs(CLIPS, seed=3)
    by_clip = {i: {p.kind: p.text for p in pairs if p.clip == i} for i in range(len(CLIPS))}
    for i, clip in enumerate(CLIPS):
        assert by_clip[i][MATCH] == clip.text
        assert by_clip[i][OTHER_VIDEO] != clip.text
        assert by_clip[i][OTHER_VIDEO] in {c.text for c in CLIPS if c.video_uid != clip.video_uid}
    assert by_clip[0][SAME_VIDEO] == CLIPS[1].text and by_clip[1][SAME_VIDEO] == CLIPS[0].text
    assert SAME_VIDEO not in by_clip[2] and SAME_VIDEO not in by_clip[3]  # their videos have no other narration
    assert pairs == heldout_pairs(CLIPS, seed=3)


def test_shuffled_partners_have_another_narration():
    for i, j in enumerate(shuffled_partners(CLIPS)):
        assert CLIPS[j].text != CLIPS[i].text


def test_heldout_clips_are_the_narrated_clips_once(tmp_path):
    questions = {"a": mcq_question(1, 1), "b": mcq_question(2, 2)}  # the same clips twice
    clips = heldout_clips(write_egomcq(tmp_path / "egomcq.json", questions))
    # The query, then the choices at five distinct times (the query's own span is not among them).
    assert [c.text for c in clips] == ["#C C opens the door"] + ["#C C picks a cup"] * 5


def test_content_words_are_masked(video_root):
    model, _ = _model(video_root)
    enc, labels = mask_content_words(model, ["#C C picks up the blue ball", "#C C turns the cup"])
    tok = model.tokenizer
    masked = [tok.convert_ids_to_tokens(labels[r][labels[r] != -100].tolist()) for r in range(2)]
    assert masked == [["picks", "up", "blue", "ball"], ["turns", "cup"]]
    assert (enc["input_ids"][labels != -100] == tok.mask_token_id).all()
    assert torch.equal(enc["input_ids"][labels == -100], tok(["#C C picks up the blue ball", "#C C turns the cup"],
                       padding="longest", return_tensors="pt")["input_ids"][labels == -100])


def test_vtm_accuracy_thresholds_the_match_probability(video_root):
    model, _ = _model(video_root)
    tokens = torch.randn(len(CLIPS), 5, model.config.vision.width)
    pairs = heldout_pairs(CLIPS)
    probs = vtm_probabilities(model, [p.text for p in pairs], tokens[[p.clip for p in pairs]])
    expected = [(float(q) > 0.5) == (p.kind == MATCH) for p, q in zip(pairs, probs)]
    result = vtm_accuracy(model, pairs, tokens)
    assert result["accuracy"] == pytest.approx(100 * sum(expected) / len(expected))
    assert result["num_pairs"] == len(pairs) == sum(result[k]["num_pairs"] for k in (MATCH, SAME_VIDEO, OTHER_VIDEO))


def test_fusion_checks_on_videos(tmp_path, video_root):
    model, cfg = _model(video_root, write_egomcq(tmp_path / "egomcq.json", {"a": mcq_question(1, 1)}))
    result = fusion_checks(model, cfg, torch.device("cpu"))
    # 6 clips: the query "opens the door" (v1) and five "picks a cup" (two in v1, three in v2). Pairs:
    # 6 matches; same video only for the v1 clips (3); another video's different narration for the
    # query and the v2 clips (4), not for the v1 "picks a cup" clips (v2 says only that).
    assert result["vtm"]["num_pairs"] == 6 + 3 + 4
    assert result["mlm"]["num_tokens"] == 2 + 5 * 2  # "opens", "door"; "picks", "cup" per choice
    assert 0 <= result["mlm"]["true"] <= 100 and 0 <= result["mlm"]["shuffled"] <= 100

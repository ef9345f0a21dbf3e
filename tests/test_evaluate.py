"""EgoMCQ evaluation: the accuracy (ties, question types, inter/intra labels), edge cases, loading models."""

import json

import numpy as np
import pytest
import torch
from helpers import FRAMES, SIZE, SMALL_MODEL, mcq_question, write_egomcq

from svitt_ego.checkpoint import save_checkpoint
from svitt_ego.config import ConfigError, load_config
from svitt_ego.eval.egomcq import (combine_scores, egomcq_accuracy, egomcq_scores, evaluate_egomcq,
                                   evaluate_egomcq_scores)
from svitt_ego.models.loading import load_for_eval
from svitt_ego.models import SViTTEgo


def test_accuracy_per_type_with_ties():
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.3, 0.2, 0.0],  # type 1, argmax 1, answer 1: right
            [0.5, 0.5, 0.1, 0.0, 0.0],  # type 1, tie 0/1 -> 0, answer 1: wrong
            [0.2, 0.7, 0.7, 0.7, 0.1],  # type 1, tie 1/2/3 -> 1, answer 1: right
            [0.0, 0.0, 0.0, 0.0, 0.0],  # type 1, all tied -> 0, answer 0: right
            [0.3, 0.1, 0.2, 0.0, 0.8],  # type 2, argmax 4, answer 4: right
            [0.3, 0.1, 0.3, 0.0, 0.2],  # type 2, tie 0/2 -> 0, answer 2: wrong
            [0.0, 0.1, 0.2, 0.3, 0.4],  # type 2, argmax 4, answer 3: wrong
        ]
    )
    answers = torch.tensor([1, 1, 1, 0, 4, 2, 3])
    types = torch.tensor([1, 1, 1, 1, 2, 2, 2])
    result = egomcq_accuracy(scores, answers, types)
    assert result == {"inter": 75.0, "intra": pytest.approx(100 / 3), "num_inter": 4, "num_intra": 3}


def test_type_1_is_inter_video():
    # Only type-1 questions, all right: the "inter" entry carries them.
    result = egomcq_accuracy(np.eye(5)[:3], np.arange(3), np.ones(3, dtype=int))
    assert result["inter"] == 100.0 and result["num_inter"] == 3
    # The absent type is None (null in JSON), never NaN: NaN compares false and is not valid JSON.
    assert result["intra"] is None and result["num_intra"] == 0


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        egomcq_accuracy(torch.zeros(2, 5), torch.zeros(2), torch.tensor([1, 3]))
    with pytest.raises(ValueError):
        egomcq_accuracy(torch.zeros(2, 5), torch.zeros(3), torch.ones(2))


# --------------------------------------------------------------------------- evaluating a model


def _eval_config(video_root, egomcq, *overrides):
    return load_config("tiny", [*SMALL_MODEL, f"model.vision.num_frames={FRAMES}", f"data.video_root={video_root}",
                                "data.chunk_seconds=2.0", "data.num_workers=0", f"data.egomcq={egomcq}", *overrides])


def test_an_empty_question_set_is_an_error_naming_the_file(tmp_path, video_root):
    cfg = _eval_config(video_root, write_egomcq(tmp_path / "empty.json", {}))
    with pytest.raises(ConfigError, match=r"data\.egomcq: .*empty\.json holds no questions"):
        evaluate_egomcq(SViTTEgo(cfg.model), cfg, torch.device("cpu"))


def test_questions_with_any_number_of_choices(tmp_path, video_root):
    questions = {"a": mcq_question(1, 1, choices=5), "b": mcq_question(2, 2, choices=3), "c": mcq_question(0, 1, 2),
                 "d": mcq_question(4, 2, choices=5), "e": mcq_question(1, 1, choices=3)}
    path = write_egomcq(tmp_path / "egomcq.json", questions)
    cfg = _eval_config(video_root, path, "eval.batch_size=4")
    model = SViTTEgo(cfg.model)
    together = evaluate_egomcq(model, cfg, torch.device("cpu"))
    alone = [evaluate_egomcq(model, _eval_config(video_root, write_egomcq(tmp_path / f"{k}.json", {k: q})),
                             torch.device("cpu")) for k, q in questions.items()]
    assert (together["num_inter"], together["num_intra"]) == (3, 2)
    for name in ("inter", "intra"):
        right = [r[name] / 100 for r in alone if r[name] is not None]
        assert together[name] == pytest.approx(100 * sum(right) / len(right))


def _saved_model(tmp_path, video_root):
    """A small model saved both ways: a save_pretrained folder and a training checkpoint."""
    cfg = _eval_config(video_root, write_egomcq(tmp_path / "egomcq.json", {"0": mcq_question(1, 1)}))
    model = SViTTEgo(cfg.model)
    model.save_pretrained(tmp_path / "model")
    save_checkpoint(tmp_path / "last.pt", {"model": model.state_dict(), "config": cfg.to_dict()})
    cfg.save(tmp_path / "config.yaml")
    return cfg


def test_a_missing_type_is_null_in_the_json_output(tmp_path, video_root, capsys):
    from svitt_ego.cli import main

    _saved_model(tmp_path, video_root)
    out = tmp_path / "result.json"
    assert main(["eval-mcq", str(tmp_path / "model"), "--config", str(tmp_path / "config.yaml"),
                 "--output", str(out)]) == 0
    text = out.read_text()
    assert "NaN" not in text and json.loads(text)["intra"] is None and json.loads(text)["num_inter"] == 1
    assert "-" in capsys.readouterr().out.splitlines()[-1]  # the absent type's cell


def test_model_overrides_rebuild_the_model_from_its_weights(tmp_path, video_root):
    """``eval-mcq CKPT model.vision.num_frames=4`` re-inflates the saved 2-frame model, as from_pretrained does."""
    _saved_model(tmp_path, video_root)
    model, cfg = load_for_eval(tmp_path / "last.pt", overrides=["model.vision.num_frames=4", "eval.batch_size=2"])
    expected = SViTTEgo.from_pretrained(tmp_path / "model", {"vision": {"num_frames": 4}})
    assert cfg.model.vision.num_frames == model.config.vision.num_frames == 4 and cfg.eval.batch_size == 2
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in model.state_dict().items())
    frames = torch.randn(1, 4, 3, SIZE, SIZE)
    torch.testing.assert_close(model.eval().encode_video(frames), expected.eval().encode_video(frames))


def test_missing_checkpoint_is_named_in_one_line(tmp_path, capsys):
    from svitt_ego.cli import main

    assert main(["eval-mcq", str(tmp_path / "nothing.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing.pt: no such checkpoint" in err


# --------------------------------------------------------------------------- scoring by the VTM head


@pytest.mark.parametrize("fusion_pooling", ["cls", "mean"])
def test_vtm_scores_are_the_vtm_head_applied_by_hand(video_root, fusion_pooling):
    cfg = _eval_config(video_root, "unused.json", f"model.text.fusion_pooling={fusion_pooling}")
    model = SViTTEgo(cfg.model).eval()
    frames = torch.randn(2, 3, FRAMES, 3, SIZE, SIZE)
    enc = model.tokenize(["#C C opens the door", "#C C picks up the blue ball"])
    scores = egomcq_scores(model, {"frames": frames, **enc}, with_vtm=True)
    assert set(scores) == {"dual", "vtm"} and scores["vtm"].shape == (2, 3)
    with torch.no_grad():
        for b in range(2):
            ids, mask = enc["input_ids"][b:b + 1], enc["attention_mask"][b:b + 1]
            for c in range(3):
                video = model.forward_video(frames[b, c:c + 1])
                logits = model.vtm_logits(model.forward_text(ids, mask), mask, video.tokens)[0]
                torch.testing.assert_close(scores["vtm"][b, c], logits[1] - logits[0])
                cosine = model.video_embedding(video)[0] @ model.encode_text(ids, mask)[0]
                torch.testing.assert_close(scores["dual"][b, c], cosine)


def test_both_is_dual_plus_weighted_vtm():
    scores = {"dual": torch.tensor([[0.2, 0.1]]), "vtm": torch.tensor([[-1.0, 3.0]])}
    assert torch.equal(combine_scores(scores, "both", 0.0), scores["dual"])
    torch.testing.assert_close(combine_scores(scores, "both", 0.1), torch.tensor([[0.1, 0.4]]))
    assert combine_scores(scores, "vtm") is scores["vtm"]
    with pytest.raises(ValueError, match="score must be one of dual, vtm, both"):
        combine_scores(scores, "cosine")


def test_both_with_weight_0_equals_dual_on_questions(tmp_path, video_root):
    questions = {str(k): mcq_question(k % 5, 1 + k % 2) for k in range(4)}
    cfg = _eval_config(video_root, write_egomcq(tmp_path / "egomcq.json", questions))
    model = SViTTEgo(cfg.model)
    results = evaluate_egomcq_scores(model, cfg, torch.device("cpu"), vtm_weight=0.0)
    assert results["both"] == results["dual"] == evaluate_egomcq(model, cfg, torch.device("cpu"))
    assert results["vtm"] == evaluate_egomcq(model, cfg, torch.device("cpu"), score="vtm")


def test_eval_mcq_score_option_writes_the_score_and_weight(tmp_path, video_root):
    from svitt_ego.cli import main

    _saved_model(tmp_path, video_root)
    out = tmp_path / "result.json"
    assert main(["eval-mcq", str(tmp_path / "model"), "--config", str(tmp_path / "config.yaml"),
                 "--score", "both", "--vtm-weight", "0.5", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["score"] == "both" and result["vtm_weight"] == 0.5 and result["num_inter"] == 1

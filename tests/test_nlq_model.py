import json
import math

import pytest
import torch

from svitt_ego.features import Settings, begin_folder, feature_file, manifest_header, write_tensors
from svitt_ego.nlq import evaluate_nlq
from svitt_ego.nlq.detection import diou_loss, level_targets, soft_nms
from svitt_ego.nlq.model import GroundingConfig, GroundingModel
from svitt_ego.nlq.search import best_moments, fixed_window_baseline
from svitt_ego.nlq.annotations import NLQQuery, parse_nlq
from svitt_ego.nlq.features import text_file
from svitt_ego.nlq.train import Stage, TrainSettings, load_grounding, predict_nlq, train_nlq


def test_level_targets_by_hand():
    cfg = GroundingConfig(video_dim=4, text_dim=4, levels=2)
    moment = torch.tensor([[2.0, 6.0]])
    # level 0: within 1.5 of the centre 4 and inside [2, 6]: points 3, 4, 5; their farther ends 3, 2, 3 < 4
    level0 = level_targets(torch.arange(10.0), 1, moment, cfg, 0)
    assert level0[0].nonzero().flatten().tolist() == [3, 4, 5]
    # level 1 (points 0, 2, 4, ...): within 3 of the centre: 2, 4, 6; farther ends 4, 2, 4; range [4, inf)
    level1 = level_targets(torch.arange(5.0) * 2, 2, moment, cfg, 1)
    assert level1[0].nonzero().flatten().tolist() == [1, 3]


def test_diou_loss_by_hand():
    assert diou_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 3.0]])).item() == pytest.approx(0.0)
    # IoU 1/3, centres 1 and 2, enclosing length 3: 1 - 1/3 + (1/3)^2
    assert diou_loss(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 3.0]])).item() == pytest.approx(7 / 9)


def test_soft_nms_by_hand():
    segments = torch.tensor([[0.0, 2.0], [0.0, 2.0], [5.0, 6.0]])
    chosen, scores = soft_nms(segments, torch.tensor([0.9, 0.8, 0.7]), top_k=3, sigma=0.5)
    assert chosen.tolist() == [[0.0, 2.0], [5.0, 6.0], [0.0, 2.0]]
    assert scores.tolist() == pytest.approx([0.9, 0.7, 0.8 * math.exp(-2.0)])  # IoU 1: exp(-1 / 0.5)


def test_best_moments_by_hand():
    scores = torch.tensor([0.0, 0.9, 1.0, 0.95, 0.0])
    assert best_moments(scores, top_k=2) == [(2, 2, 1.0), pytest.approx((2, 3, 0.975))]


def test_padding_does_not_change_the_outputs():
    torch.manual_seed(0)
    model = GroundingModel(GroundingConfig(video_dim=6, text_dim=5, levels=3)).eval()
    video, text = torch.randn(1, 8, 6), torch.randn(1, 3, 5)
    short = model(video, torch.ones(1, 8, dtype=torch.bool), text, torch.ones(1, 3, dtype=torch.bool))
    padded_video = torch.cat([video, torch.randn(1, 8, 6)], 1)
    mask = torch.arange(16)[None] < 8
    padded_text = torch.cat([text, torch.randn(1, 2, 5)], 1)
    long = model(padded_video, mask, padded_text, torch.arange(5)[None] < 3)
    for a, b in zip(short, long):
        n = a["logits"].shape[1]
        torch.testing.assert_close(a["logits"], b["logits"][:, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a["distances"], b["distances"][:, :n], atol=1e-5, rtol=1e-5)


def _feature_folder(root, num_clips=6, windows=24, dim=8):
    """A features folder where the answer's windows carry the query's code (learnable)."""
    generator = torch.Generator().manual_seed(0)
    settings = Settings("pooled", 4, 4, 4)
    header = {**manifest_header(root / "ckpt", "sha256:" + "0" * 64, settings, [dim]), "text_dimension": dim}
    info = {"source": "v", "fps": 10.0, "first_frame": 0, "frames": 4 * windows, "windows": windows}
    begin_folder(root, header, {f"c{c}": info for c in range(num_clips)})
    videos = []
    for c in range(num_clips):
        video = 0.1 * torch.randn(windows, dim, generator=generator)
        queries = []
        for k, (a, b) in enumerate([(2 + c % 4, 6 + c % 4), (12, 20)]):
            code = torch.zeros(dim)
            code[(c + k) % dim] = 1.0
            video[a:b] += code
            query = NLQQuery(f"c{c}", f"a{c}", k, "", None, None)
            write_tensors(text_file(root, query), {"states": code[None].repeat(2, 1).half()})
            # window i stands for (4 i + 2) / 10 s: windows a..b-1 span [0.4 a, 0.4 b) s
            queries.append({"query": f"q{c}{k}", "clip_start_sec": 0.4 * a, "clip_end_sec": 0.4 * b})
        write_tensors(feature_file(root, f"c{c}"), {"features": video.half()})
        videos.append({"video_uid": f"v{c}", "clips": [{
            "clip_uid": f"c{c}", "video_start_sec": 0.0, "video_end_sec": 0.4 * windows,
            "annotations": [{"annotation_uid": f"a{c}", "language_queries": queries}]}]})
    (root / "nlq.json").write_text(json.dumps({"videos": videos}))
    return root / "nlq.json"


SETTINGS = TrainSettings(batch_size=4, lr=3e-3, model={"hidden": 32, "levels": 3, "num_heads": 2})
LEARN = TrainSettings(batch_size=12, lr=5e-3, model={"hidden": 32, "levels": 3, "num_heads": 2})


def test_training_learns_and_predicts_a_submission(tmp_path):
    annotations = _feature_folder(tmp_path / "features")
    train_nlq(tmp_path / "features", [Stage([str(annotations)], 120)], tmp_path / "run", LEARN)
    submission = predict_nlq(tmp_path / "features", tmp_path / "run" / "last.pt", annotations, tmp_path / "sub.json")
    assert json.loads((tmp_path / "sub.json").read_text()) == submission
    assert submission["challenge"] == "ego4d_nlq_challenge"
    assert all(len(r["predicted_times"]) == 5 for r in submission["results"])
    result = evaluate_nlq(json.loads(annotations.read_text()), submission)
    assert result["R@1 IoU=0.5"] >= 75.0
    fixed = fixed_window_baseline(parse_nlq(json.loads(annotations.read_text()), "x"))
    assert 0 <= fixed[0] < fixed[1] <= 1


def test_resume_continues_exactly(tmp_path):
    annotations = str(_feature_folder(tmp_path / "features"))
    stages = [Stage([annotations], 2), Stage([annotations], 1)]
    straight = train_nlq(tmp_path / "features", stages, tmp_path / "a", SETTINGS)
    train_nlq(tmp_path / "features", stages[:1], tmp_path / "b", SETTINGS)
    with pytest.raises(FileExistsError, match="--resume"):
        train_nlq(tmp_path / "features", stages, tmp_path / "b", SETTINGS)
    resumed = train_nlq(tmp_path / "features", stages, tmp_path / "b", SETTINGS, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    model, state = load_grounding(tmp_path / "b" / "last.pt")
    assert (state["stage"], state["epoch"]) == (1, 1)

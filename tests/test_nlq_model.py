import json
import math
from pathlib import Path

import pytest
import torch

from helpers import record_bars

import svitt_ego.nlq.train as nlq_train
from svitt_ego.nlq import evaluate_nlq
from svitt_ego.features import Settings, begin_folder, feature_file, manifest_header, write_tensors
from svitt_ego.nlq.annotations import NLQQuery, parse_nlq
from svitt_ego.nlq.detection import decode, diou_loss, grounding_loss, level_targets, soft_nms
from svitt_ego.nlq.model import GroundingConfig, GroundingModel, banded_attention, from_groundnlq
from svitt_ego.nlq.search import fixed_window_baseline
from svitt_ego.nlq.train import Stage, TrainSettings, load_grounding, predict_moments, predict_nlq, train_nlq
from svitt_ego.nlq.features import NLQFeatures, text_file

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: a second OpenMP thread only contends (30x slower on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def groundnlq_reference() -> tuple[GroundingConfig, dict, dict]:
    """The committed GroundNLQ reference: our config for its sizes, its state dict (as GroundNLQ
    names it, in float32) and the file's tensors (inputs, outputs)."""
    meta = json.loads((DATA / "groundnlq_reference.json").read_text())
    ref = torch.load(DATA / "groundnlq_reference.pt", weights_only=True)
    c, arch = meta["config"], meta["config"]["backbone_arch"]
    cfg = GroundingConfig(video_dim=c["input_vid_dim"], text_dim=c["input_txt_dim"], hidden=c["embd_dim"],
                          num_heads=c["n_head"], window=c["n_mha_win_size"], text_layers=arch[1],
                          stem_layers=arch[2], levels=arch[4] + 1, head_layers=c["head_num_layers"])
    state = {k.removeprefix("int8/"): v.float() * 2.0 ** -ref[k.replace("int8/", "exponent/")].item()
             for k, v in ref.items() if k.startswith("int8/")}
    return cfg, state, ref


def test_matches_groundnlq_outputs():
    """GroundNLQ's own code (houzhijian/GroundNLQ, the commit in groundnlq_reference.json) gave
    these outputs: its ``LocPointTransformer`` was built outside this repository at hidden 128
    with the config in the JSON (GroundNLQ's block types and defaults; 1 text block, 1 stem
    block and 5 downsampling blocks so the file stays under 2 MB), every parameter was drawn at
    random and rounded to ``int8 * 2 ** -exponent`` (stored so), the model was put in eval mode
    and run backbone -> neck -> heads on the stored input (two rows, the second padded in video
    and text), and each level's classification logits and regression offsets were saved."""
    cfg, state, ref = groundnlq_reference()
    meta = json.loads((DATA / "groundnlq_reference.json").read_text())
    assert [list(cfg.regress_range(level)) for level in range(cfg.levels)] == meta["config"]["regression_range"]
    model = GroundingModel(cfg)
    model.load_state_dict(from_groundnlq(state, cfg))  # strict: every name mapped, every shape fits
    with torch.no_grad():
        outputs = model.eval()(ref["input/video"].float().transpose(1, 2), ref["input/video_mask"],
                               ref["input/text"].float().transpose(1, 2), ref["input/text_mask"])
    assert len(outputs) == cfg.levels
    for level, out in enumerate(outputs):
        torch.testing.assert_close(out["logits"], ref[f"output/logits.{level}"], atol=1e-5, rtol=0)
        torch.testing.assert_close(out["offsets"], ref[f"output/offsets.{level}"], atol=1e-5, rtol=0)


def test_groundnlq_state_of_other_sizes_does_not_load():
    ref = torch.load(DATA / "groundnlq_reference.pt", weights_only=True)
    state = {k.removeprefix("int8/"): v.float() for k, v in ref.items() if k.startswith("int8/")}
    cfg = GroundingConfig(video_dim=16, text_dim=12, text_layers=2, stem_layers=1, levels=6)
    with pytest.raises(RuntimeError, match="text_blocks.1"):
        GroundingModel(cfg).load_state_dict(from_groundnlq(state, cfg))


def _dense_local_attention(q, k, v, mask, window):
    """The reference: a full T x T score matrix, keys outside the window or masked get -inf."""
    T = q.shape[2]
    offset = torch.arange(T)
    allowed = ((offset[:, None] - offset[None, :]).abs() <= window // 2) & mask[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf"))
    return torch.nan_to_num(scores.softmax(-1)) @ v * mask[:, None, :, None]


@pytest.mark.parametrize("window, chunk", [(3, 32), (9, 32), (9, 4), (9, 5), (3, 1)])
def test_banded_attention_equals_dense(window, chunk):
    """One chunk or several, the last one partly padding (21 = 4 * 5 + 1), and chunks narrower than the window."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 21, 4, requires_grad=True) for _ in range(3))
    mask = torch.arange(21)[None] < torch.tensor([[21], [13]])
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ours, reference = banded_attention(q, k, v, mask, window, chunk), _dense_local_attention(*leaves, mask, window)
    torch.testing.assert_close(ours, reference)
    ours.square().sum().backward()
    reference.square().sum().backward()
    for mine, theirs in zip((q, k, v), leaves):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_level_targets_by_hand():
    cfg = GroundingConfig(video_dim=4, text_dim=4, levels=2)  # ranges [0, 4] and [2, 10000]
    moment = torch.tensor([[2.0, 6.0]])
    # level 0: strictly within 1.5 of the centre 4 and inside (2, 6): points 3, 4, 5; farther ends 3, 2, 3
    level0 = level_targets(torch.arange(10.0), 1, moment, cfg, 0)
    assert level0[0].nonzero().flatten().tolist() == [3, 4, 5]
    # level 1 (points 0, 2, 4, ...): strictly within 3 of the centre and inside (2, 6): only 4
    level1 = level_targets(torch.arange(5.0) * 2, 2, moment, cfg, 1)
    assert level1[0].nonzero().flatten().tolist() == [2]
    # ties are not positives: a moment [3, 5] has point 4 only, 3 and 5 lie on its ends
    assert level_targets(torch.arange(10.0), 1, torch.tensor([[3.0, 5.0]]), cfg, 0)[0].nonzero().flatten().tolist() == [4]
    # the range includes its upper end: point 4 of [0, 8] (both ends 4 away) is learnt at level 0,
    # while every point near the centre of [0, 8.5] is more than 4 from an end
    assert level_targets(torch.arange(10.0), 1, torch.tensor([[0.0, 8.0]]), cfg, 0)[0].nonzero().flatten().tolist() == [4]
    assert level_targets(torch.arange(10.0), 1, torch.tensor([[0.0, 8.5]]), cfg, 0)[0].sum() == 0


def test_diou_loss_by_hand():
    # offsets (to the start, to the end) from one point: segments [0, 2] and [1, 3] around point 1
    assert diou_loss(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 1.0]])).item() == pytest.approx(0.0)
    # IoU 1/3, centres 1 and 2, enclosing length 3: 1 - 1/3 + (1/3)^2
    assert diou_loss(torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 2.0]])).item() == pytest.approx(7 / 9)


def test_loss_normalizer_and_label_smoothing_by_hand():
    cfg = GroundingConfig(video_dim=4, text_dim=4, levels=1)
    out = {"logits": torch.zeros(1, 8), "offsets": torch.ones(1, 8, 2), "mask": torch.ones(1, 8, dtype=torch.bool),
           "stride": 1}
    losses = grounding_loss([out], torch.tensor([[3.0, 5.0]]), cfg, normalizer=200.0)
    assert losses["normalizer"] == pytest.approx(0.9 * 200 + 0.1 * 1)  # one positive, point 4
    # logit 0: p = 1/2; targets 0.05 (7 points) and 0.95 (1 point) after smoothing 0.1
    focal = sum(n * (0.25 * t + 0.75 * (1 - t)) * math.log(2) * (1 - (0.5 * t + 0.5 * (1 - t))) ** 2
                for n, t in ((7, 0.05), (1, 0.95)))
    assert float(losses["cls"]) == pytest.approx(focal / losses["normalizer"], rel=1e-5)
    assert float(losses["reg"]) == pytest.approx(0.0, abs=1e-7)  # offsets (1, 1) from point 4 are the answer


def test_soft_nms_by_hand():
    segments = torch.tensor([[0.0, 2.0], [0.0, 2.0], [5.0, 6.0]])
    chosen, scores = soft_nms(segments, torch.tensor([0.9, 0.8, 0.7]), top_k=3, sigma=0.5)
    assert chosen.tolist() == [[0.0, 2.0], [5.0, 6.0], [0.0, 2.0]]
    assert scores.tolist() == pytest.approx([0.9, 0.7, 0.8 * math.exp(-2.0)])  # IoU 1: exp(-1 / 0.5)
    # below min_score after its decay, the duplicate is dropped
    chosen, _ = soft_nms(segments, torch.tensor([0.9, 0.8, 0.7]), top_k=3, sigma=0.5, min_score=0.2)
    assert chosen.tolist() == [[0.0, 2.0], [5.0, 6.0]]


def test_decode_by_hand():
    cfg = GroundingConfig(video_dim=4, text_dim=4, levels=2)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    level0 = {"logits": torch.tensor([[logit(0.9), logit(0.0005), logit(0.5), -20.0]]),
              "offsets": torch.tensor([[[1.0, 2.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]]),
              "mask": torch.tensor([[True, True, True, False]]), "stride": 1}
    level1 = {"logits": torch.tensor([[logit(0.2), logit(0.99)]]), "offsets": torch.tensor([[[0.5, 0.5], [1.0, 2.0]]]),
              "mask": torch.tensor([[True, False]]), "stride": 2}
    segments, scores = decode([level0, level1], 0, cfg)
    # point 1 scores under 0.001, point 2 has length 0, point 3 and level 1's point 1 are padding;
    # level 1's point 0 sits at window 0 with offsets in strides of 2
    assert segments.tolist() == [[-1.0, 2.0], [-1.0, 1.0]]
    assert scores[0].item() == pytest.approx(0.9)
    assert scores[1].item() == pytest.approx(0.2 * math.exp(-(2 / 3) ** 2 / 0.75))


def _feature_folder(root, num_clips=6, windows=24, dim=8):
    """A features folder where the answer's windows carry the query's code (learnable); ``windows``
    is every clip's length, or a list of them."""
    generator = torch.Generator().manual_seed(0)
    settings = Settings("pooled", 4, 4, 4)
    header = {**manifest_header(root / "ckpt", "sha256:" + "0" * 64, settings, [dim]), "text_dimension": dim}
    lengths = windows if isinstance(windows, list) else [windows] * num_clips
    begin_folder(root, header, {f"c{c}": {"source": "v", "fps": 10.0, "first_frame": 0, "frames": 4 * n, "windows": n}
                                for c, n in enumerate(lengths)})
    videos = []
    for c, windows in enumerate(lengths):
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


SMALL = {"hidden": 32, "levels": 3, "num_heads": 2, "text_layers": 1, "stem_layers": 1}
SETTINGS = TrainSettings(model=SMALL)


def _stage(annotations: str, epochs: int, **changes) -> Stage:
    """``epochs`` in all at lr 3e-3, batch 4, the first of them warming up (none when ``epochs`` is 0)."""
    warmup = min(1, epochs)
    return Stage([annotations], epochs - warmup, **{"lr": 3e-3, "batch_size": 4, "warmup_epochs": warmup, **changes})


def test_training_learns_and_predicts_a_submission(tmp_path):
    annotations = _feature_folder(tmp_path / "features")
    train_nlq(tmp_path / "features", [Stage([str(annotations)], 115, 5e-3, 12, 5)], tmp_path / "run", SETTINGS)
    submission = predict_nlq(tmp_path / "features", tmp_path / "run" / "last.pt", annotations, tmp_path / "sub.json")
    assert json.loads((tmp_path / "sub.json").read_text()) == submission
    assert submission["challenge"] == "ego4d_nlq_challenge"
    assert all(len(r["predicted_times"]) == 5 for r in submission["results"])
    result = evaluate_nlq(json.loads(annotations.read_text()), submission)
    assert result["R@1 IoU=0.5"] >= 75.0
    fixed = fixed_window_baseline(parse_nlq(json.loads(annotations.read_text()), "x"))
    assert 0 <= fixed[0] < fixed[1] <= 1


def test_zero_offsets_counted_by_hand():
    cfg = GroundingConfig(video_dim=4, text_dim=4, levels=1)
    offsets = torch.tensor([[[0.0, 1.0]] * 3 + [[0.0, 2.0], [0.0, 0.0]] + [[1.0, 1.0]] * 3])
    out = {"logits": torch.zeros(1, 8), "offsets": offsets, "mask": torch.ones(1, 8, dtype=torch.bool), "stride": 1}
    losses = grounding_loss([out], torch.tensor([[2.0, 6.0]]), cfg, normalizer=200.0)  # positives: points 3, 4, 5
    # point 3 predicts (0, 2), point 4 (0, 0), point 5 (1, 1)
    assert losses["positives"] == 3 and losses["zero_offsets"].tolist() == [2, 1]


def test_a_dead_regression_channel_is_named(tmp_path, monkeypatch, caplog):
    """A start-distance output negative at every point (its ReLU then passes no gradient) is
    warned about and written to metrics.jsonl, every epoch it stays so."""
    annotations = str(_feature_folder(tmp_path / "features"))
    reset = GroundingModel.reset_heads

    def dead_start(model):
        reset(model)
        torch.nn.init.constant_(model.reg_head.out.bias, 0.0)
        model.reg_head.out.bias.data[0] = -1e4

    monkeypatch.setattr(GroundingModel, "reset_heads", dead_start)
    with caplog.at_level("WARNING"):
        train_nlq(tmp_path / "features", [_stage(annotations, 2)], tmp_path / "run", SETTINGS)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("dead_offsets") for r in records] == [["start"], ["start"]]
    assert "stage 0, epoch 2: the regression head's distance to the start was 0 at all" in caplog.text
    monkeypatch.setattr(GroundingModel, "reset_heads", reset)
    train_nlq(tmp_path / "features", [_stage(annotations, 1)], tmp_path / "sound", SETTINGS)
    assert "dead_offsets" not in json.loads((tmp_path / "sound" / "metrics.jsonl").read_text())


def test_resume_continues_exactly(tmp_path):
    annotations = str(_feature_folder(tmp_path / "features"))
    stages = [_stage(annotations, 2), _stage(annotations, 1)]
    straight = train_nlq(tmp_path / "features", stages, tmp_path / "a", SETTINGS)
    train_nlq(tmp_path / "features", stages[:1], tmp_path / "b", SETTINGS)
    with pytest.raises(FileExistsError, match="--resume"):
        train_nlq(tmp_path / "features", stages, tmp_path / "b", SETTINGS)
    resumed = train_nlq(tmp_path / "features", stages, tmp_path / "b", SETTINGS, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    model, state = load_grounding(tmp_path / "b" / "last.pt")
    assert (state["stage"], state["epoch"]) == (1, 1)


def test_a_clip_of_9216_windows_trains_and_predicts(tmp_path):
    annotations = _feature_folder(tmp_path / "features", num_clips=1, windows=9216)
    settings = TrainSettings(model={**SMALL, "levels": 7})  # whole clips: nothing cropped
    train_nlq(tmp_path / "features", [Stage([str(annotations)], 0, 1e-3, 2, 1)], tmp_path / "run", settings)
    submission = predict_nlq(tmp_path / "features", tmp_path / "run" / "last.pt", annotations, tmp_path / "sub.json")
    assert len(submission["results"]) == 2
    for entry in submission["results"]:
        assert len(entry["predicted_times"]) == 5
        assert all(0 <= s <= e <= 0.4 * 9216 for s, e in entry["predicted_times"])


def test_a_querys_moments_do_not_depend_on_its_batch(tmp_path):
    annotations = _feature_folder(tmp_path / "features", windows=40)
    features = NLQFeatures(tmp_path / "features")
    parsed = parse_nlq(json.loads(annotations.read_text()), "x")
    torch.manual_seed(0)
    model = GroundingModel(GroundingConfig(video_dim=8, text_dim=8, **SMALL))
    together = predict_moments(model, features, parsed.queries, parsed.clips, batch_size=12)
    alone = [predict_moments(model, features, [q], parsed.clips, batch_size=1)[0] for q in parsed.queries]
    assert together == alone


def test_fine_tuning_restarts_the_heads(tmp_path):
    annotations = str(_feature_folder(tmp_path / "features"))
    pretrained = train_nlq(tmp_path / "features", [_stage(annotations, 1)], tmp_path / "a", SETTINGS)
    fresh = GroundingModel(pretrained.config)
    both = train_nlq(tmp_path / "features", [_stage(annotations, 1), _stage(annotations, 0)], tmp_path / "b",
                     SETTINGS)
    for name, value in both.state_dict().items():
        if name.startswith(("cls_head.", "reg_head.")) and name.endswith("bias") or name in ("scales",
                                                                                           "loss_normalizer"):
            torch.testing.assert_close(value, fresh.state_dict()[name], msg=name)
    torch.testing.assert_close(both.stem[0].gamma_attn, pretrained.stem[0].gamma_attn)
    assert not torch.equal(both.cls_head.out.weight, pretrained.cls_head.out.weight)


def test_validation_scores_every_epoch_and_keeps_the_best(tmp_path):
    annotations = _feature_folder(tmp_path / "features")
    train_nlq(tmp_path / "features", [_stage(str(annotations), 4)], tmp_path / "run", SETTINGS, val=annotations)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scores = [r["val"]["R@1 IoU=0.3"] for r in records]
    assert len(scores) == 4
    _, best = load_grounding(tmp_path / "run" / "best.pt")
    assert best["epoch"] == 1 + scores.index(max(scores)) and best["best_val"] == max(scores)
    submission = predict_nlq(tmp_path / "features", tmp_path / "run" / "best.pt", annotations, tmp_path / "s.json")
    assert evaluate_nlq(json.loads(annotations.read_text()), submission)["R@1 IoU=0.3"] == max(scores)


def test_jittered_training_differs(tmp_path):
    annotations = str(_feature_folder(tmp_path / "features"))
    plain = train_nlq(tmp_path / "features", [_stage(annotations, 1)], tmp_path / "a", SETTINGS)
    jittered = train_nlq(tmp_path / "features", [_stage(annotations, 1, jitter=True)], tmp_path / "b", SETTINGS)
    assert not torch.equal(plain.stem[0].attn.q.weight, jittered.stem[0].attn.q.weight)


def test_every_epoch_has_a_bar_that_ends_at_its_total(tmp_path, monkeypatch):
    bars = record_bars(monkeypatch, nlq_train)
    annotations = str(_feature_folder(tmp_path / "features"))
    stage = Stage([annotations], 1, lr=1e-3, batch_size=4, warmup_epochs=1)  # the count includes the warm-up
    train_nlq(tmp_path / "features", [stage], tmp_path / "run", SETTINGS)
    steps = math.ceil(len(json.loads(Path(annotations).read_text())["videos"]) * 2 / stage.batch_size)
    assert [(bar.n, bar.total) for bar in bars] == [(steps, steps)] * 2 and steps > 1
    assert [bar.desc for bar in bars] == ["stage 0 epoch 1/2", "stage 0 epoch 2/2"]

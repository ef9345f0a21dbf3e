import json
import shutil

import pytest
import torch

from svitt_ego.cli import main
from svitt_ego.config import load_config
from svitt_ego.models import create_model
from svitt_ego.nlq import NLQFormatError
from svitt_ego.features import Settings, begin_folder, feature_file, manifest_header, window_centre, write_tensors
from svitt_ego.models.digest import weights_digest
from svitt_ego.nlq.annotations import NLQQuery
from svitt_ego.nlq.features import text_file
from svitt_ego.nlq.search import query_embedding

ANSWER_WINDOW = 5


def _annotations(path, start=1.0, end=2.0):
    query = {"query": "when did I open the drawer?", "clip_start_sec": start, "clip_end_sec": end}
    path.write_text(json.dumps({"videos": [{"video_uid": "v", "clips": [{
        "clip_uid": "c", "video_start_sec": 0.0, "video_end_sec": 4.0,
        "annotations": [{"annotation_uid": "a", "language_queries": [query]}]}]}]}))
    return path


def _run(capsys, *argv):
    """The CLI's exit status and output: for bad input, status 2 and the error's message (raised until
    the CLI's error handler catches ValueError, printed by it after)."""
    try:
        status = main(list(map(str, argv)))
    except NLQFormatError as err:
        return 2, str(err)
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_eval_nlq(tmp_path, capsys):
    annotations = _annotations(tmp_path / "nlq.json")
    submission = tmp_path / "sub.json"
    submission.write_text(json.dumps({"results": [{"clip_uid": "c", "annotation_uid": "a", "query_idx": 0,
                                                   "predicted_times": [[1.0, 3.0], [1.0, 2.0]]}]}))
    status, out = _run(capsys, "eval-nlq", submission, "--annotations", annotations, "--output", tmp_path / "m.json")
    assert status == 0
    assert "R@1 IoU=0.3 100.00  R@5 IoU=0.3 100.00  R@1 IoU=0.5 0.00  R@5 IoU=0.5 100.00  mIoU 50.00" in out
    assert json.loads((tmp_path / "m.json").read_text())["mIoU"] == 50.0

    submission.write_text(json.dumps({"results": []}))
    status, message = _run(capsys, "eval-nlq", submission, "--annotations", annotations)
    assert status == 2 and f"{submission}: misses 1 of 1 queries" in message


def _write_features(out, checkpoint, digest, video, tokens):
    """An NLQ feature folder of one 40-frame clip ``c`` at 10 fps with one query ``a``."""
    settings = Settings("pooled", 4, 4, 4)
    header = {**manifest_header(checkpoint, digest, settings, [video.shape[1]]), "text_dimension": tokens.shape[1]}
    info = {"source": "v", "fps": 10.0, "first_frame": 0, "frames": 40, "windows": 10}
    begin_folder(out, header, {"c": info})
    write_tensors(feature_file(out, "c"), {"features": video})
    write_tensors(text_file(out, NLQQuery("c", "a", 0, "", None, None)), {"states": tokens})


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """A random tiny SViTT-Ego and features in which window 5 is the query's best match."""
    root = tmp_path_factory.mktemp("nlq")
    torch.manual_seed(0)
    model = create_model(load_config("tiny").model, load_pretrained=False).eval()
    model.save_pretrained(root / "model")
    with torch.no_grad():
        enc = model.tokenize(["when did I open the drawer?"])
        tokens = model.forward_text(enc["input_ids"], enc["attention_mask"])[0].half()
        target = query_embedding(model, tokens)
        weight, bias = model.vision_proj.weight, model.vision_proj.bias
        best = torch.linalg.lstsq(weight, (3 * target - bias)[:, None]).solution[:, 0]
    video = 0.01 * torch.randn(10, weight.shape[1])
    video[ANSWER_WINDOW] = best
    _write_features(root / "features", root / "model", weights_digest(model.state_dict()), video.half(), tokens)
    return root


def test_search_and_zero_shot_prediction(features, tmp_path, capsys):
    status, out = _run(capsys, "search", features / "model", features / "features", "when did I open the drawer?",
                       "--top-k", "3")
    assert status == 0
    first = out.splitlines()[2].split()  # after the query and the header
    start, end = window_centre(ANSWER_WINDOW - 0.5, 4, 4, 10.0), window_centre(ANSWER_WINDOW + 0.5, 4, 4, 10.0)
    assert first[:2] == ["1", "c"] and float(first[2]) == pytest.approx(start) and float(first[3]) == pytest.approx(end)

    annotations = _annotations(tmp_path / "nlq.json", start, end)
    status, _ = _run(capsys, "predict-nlq", features / "features", "--zero-shot", "--annotations", annotations,
                     "--output", tmp_path / "zs.json")
    assert status == 0
    results = json.loads((tmp_path / "zs.json").read_text())["results"]
    assert results[0]["predicted_times"][0] == pytest.approx([start, end])

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    status, message = _run(capsys, "predict-nlq", features / "features", "--model", bad, "--annotations",
                           annotations, "--output", tmp_path / "x.json")
    assert status == 2 and f"{bad}: not a readable checkpoint" in message


def test_search_from_another_folder_and_refusing_other_weights(features, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the manifest's checkpoint is absolute
    status, out = _run(capsys, "search", features / "model", features / "features", "when did I open the drawer?",
                       "--top-k", "1")
    assert status == 0 and out.splitlines()[2].split()[:2] == ["1", "c"]

    torch.manual_seed(1)
    create_model(load_config("tiny").model, load_pretrained=False).save_pretrained(tmp_path / "other")
    manifest = json.loads((features / "features" / "manifest.json").read_text())
    shutil.copytree(features / "features", tmp_path / "moved")
    (tmp_path / "moved" / "manifest.json").write_text(json.dumps({**manifest, "checkpoint": str(tmp_path / "other")}))
    for argv in (["search", tmp_path / "other", features / "features", "drawer"],
                 ["predict-nlq", tmp_path / "moved", "--zero-shot", "--annotations", _annotations(tmp_path / "a.json"),
                  "--output", tmp_path / "zs.json"]):
        status, message = _run(capsys, *argv)
        assert status == 2 and "the features were extracted with weights sha256:" in message
        assert str(tmp_path / "other") in message
    assert not (tmp_path / "zs.json").exists()

"""NLQ feature folders: nothing lost, nothing mixed. Each test drives the command line (and the
NLQFeatures reader) on a real small model and a written video, as a user would."""

import json
import os
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import SMALL_MODEL, draw_code, write_video
from svitt_ego.cli import main
from svitt_ego.config import load_config
from svitt_ego.models import create_model
from svitt_ego.nlq.annotations import NLQQuery
from svitt_ego.nlq.features import NLQFeatures

ROOT = Path(__file__).resolve().parents[1]
# Runs the CLI and kills itself (SIGKILL) right after the first query's text features are written.
KILLED_AFTER_FIRST_TEXT_FILE = """
import os, signal, sys
from pathlib import Path
import svitt_ego.atomic as atomic
real = atomic.atomic_write
def killing(path, write):
    result = real(path, write)
    if "text" in Path(path).parts:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
atomic.atomic_write = killing
from svitt_ego.cli import main
main(sys.argv[1:])
"""


def _model(seed, folder, broken=False):
    torch.manual_seed(seed)
    model = create_model(load_config("tiny", SMALL_MODEL).model, load_pretrained=False).eval()
    if broken:
        with torch.no_grad():
            model.visual.norm.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two models, a 2-s 30-fps video ``v`` and two clips of it whose annotations share one id."""
    root = tmp_path_factory.mktemp("nlq_rules")
    model = _model(0, root / "run1" / "model")
    _model(1, root / "run_c" / "model")
    write_video(root / "videos" / "v" / "0.mp4", [draw_code(j, 0) for j in range(60)], Fraction(30))
    clips = [{"clip_uid": uid, "video_start_sec": 0.0, "video_end_sec": end, "annotations": [{
        "annotation_uid": "shared", "language_queries": [{"query": text}]}]}
        for uid, end, text in (("c1", 2.0, "when did I open the drawer?"), ("c2", 1.0, "where is the cup?"))]
    (root / "nlq.json").write_text(json.dumps({"videos": [{"video_uid": "v", "clips": clips}]}))
    return SimpleNamespace(root=root, model=model)


def _extract(world, out, checkpoint="run1/model", *extra):
    return main(["extract-nlq-features", str(world.root / checkpoint), "--annotations", str(world.root / "nlq.json"),
                 "--videos", str(world.root / "videos"), "--output", str(out), *map(str, extra)])


def test_a_killed_extraction_resumed_with_another_checkpoint_or_stride_is_refused(world, tmp_path, capsys):
    out = tmp_path / "nlqf"
    argv = ["extract-nlq-features", str(world.root / "run1" / "model"), "--annotations", str(world.root / "nlq.json"),
            "--videos", str(world.root / "videos"), "--output", str(out)]
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_FIRST_TEXT_FILE, *argv], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    capsys.readouterr()
    assert _extract(world, out, "run_c/model", "--stride", 2) == 2
    assert _extract(world, out, "run1/model", "--stride", 2) == 2
    assert _extract(world, out, "run_c/model") == 2
    assert capsys.readouterr().err.count("svitt-ego: error:") == 3
    assert _extract(world, out) == 0  # the same settings finish the run
    features = NLQFeatures(out)
    assert [len(features.video(c)) for c in ("c1", "c2")] == [15, 8]  # 60 and 30 frames at stride 4


def test_queries_of_one_annotation_id_in_two_clips_keep_their_own_features(world, tmp_path):
    assert _extract(world, tmp_path / "nlqf") == 0
    features = NLQFeatures(tmp_path / "nlqf")
    for clip_uid, text in (("c1", "when did I open the drawer?"), ("c2", "where is the cup?")):
        enc = world.model.tokenize([text])
        with torch.no_grad():
            expected = world.model.forward_text(enc["input_ids"], enc["attention_mask"])[0].half()
        torch.testing.assert_close(features.text(NLQQuery(clip_uid, "shared", 0, text, None, None)), expected)


def test_a_non_finite_feature_is_refused_naming_clip_and_window(world, tmp_path, capsys):
    _model(0, tmp_path / "broken", broken=True)
    capsys.readouterr()
    status = main(["extract-nlq-features", str(tmp_path / "broken"), "--annotations", str(world.root / "nlq.json"),
                   "--videos", str(world.root / "videos"), "--output", str(tmp_path / "nlqf")])
    assert status == 2
    assert "(clip c1): window 0 has a non-finite feature" in capsys.readouterr().err


def test_search_takes_only_the_weights_the_features_came_from_wherever_it_runs(world, tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.chdir(world.root)
    assert main(["extract-nlq-features", "run1/model", "--annotations", "nlq.json", "--videos", "videos",
                 "--output", str(tmp_path / "nlqf")]) == 0  # a checkpoint path relative to the working directory
    capsys.readouterr()
    assert main(["search", "run1/model", str(tmp_path / "nlqf"), "open the drawer", "--top-k", "3"]) == 0
    assert "c1" in capsys.readouterr().out
    elsewhere = tmp_path / "elsewhere"
    _model(2, elsewhere / "run1" / "model")  # another run1/model beside another working directory
    monkeypatch.chdir(elsewhere)
    assert main(["search", "run1/model", str(tmp_path / "nlqf"), "open the drawer", "--top-k", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the features were extracted with weights sha256:" in err


@pytest.mark.parametrize("stride", ["0", "-4"])
def test_a_stride_that_is_not_a_positive_number_is_one_line_exit_2(world, tmp_path, stride, capsys):
    assert _extract(world, tmp_path / "nlqf", "run1/model", "--stride", stride) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument --stride: must be an integer >= 1, got '{stride}'" in err


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


CORRUPTIONS = {
    "junk": lambda path: path.write_bytes(b"\x80junk" * 20),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2]),
    "empty": lambda path: path.write_bytes(b""),
    "crafted": lambda path: torch.save(_Evil(), path),
    "dict-valued": lambda path: torch.save({"features": torch.zeros(15, 48)}, path),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_malformed_video_feature_file_is_one_line_exit_2(world, tmp_path, case, capsys):
    assert _extract(world, tmp_path / "nlqf") == 0
    files = sorted(p for p in (tmp_path / "nlqf").glob("video*/*") if p.stem == "c1")
    CORRUPTIONS[case](files[0])
    capsys.readouterr()
    assert main(["search", str(world.root / "run1" / "model"), str(tmp_path / "nlqf"), "open the drawer"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and str(files[0]) in captured.err
    assert "weights_only" not in captured.err and "pwned" not in captured.out


@pytest.mark.parametrize("field, value", [("stride", 0), ("stride", "4"), ("dimension", 10 ** 9), ("window", None)])
def test_a_malformed_manifest_field_is_one_line_exit_2(world, tmp_path, field, value, capsys):
    assert _extract(world, tmp_path / "nlqf") == 0
    manifest = next(p for p in (tmp_path / "nlqf").glob("*.json"))
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), field: value}))
    annotations = str(world.root / "nlq.json")
    capsys.readouterr()
    for argv in (["search", world.root / "run1" / "model", tmp_path / "nlqf", "open the drawer"],
                 ["train-nlq", tmp_path / "nlqf", "--annotations", annotations, "--output", tmp_path / "run"]):
        assert main(list(map(str, argv))) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(manifest) in err and f"'{field}'" in err

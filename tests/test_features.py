"""Window features of any video (svitt_ego.features): the window loop against hand-worked cases, the
same rows from the CLI, from Python and from extract-nlq-features, resumption, refusals, the weights
digest, and the feature-folder reader on malformed and arbitrary input."""

import json
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from helpers import SMALL_MODEL, draw_code, write_video
from svitt_ego.cli import main
from svitt_ego.config import load_config
from svitt_ego.features import (FeatureFolderError, WindowExtractor, extract_video_features, feature_file,
                                frame_offsets, list_videos, load_features, load_model, num_windows, window_centre,
                                window_frame_indices)
from svitt_ego.models import create_model
from svitt_ego.models.digest import weights_digest



def test_the_window_loop_by_hand():
    # a 10-s 30-fps video, window 4 / stride 4: 75 rows, row i at (4i + 2) / 30 s
    assert num_windows(300, 4) == 75
    assert window_centre(np.arange(75), 4, 4, 30.0) == pytest.approx((4 * np.arange(75) + 2) / 30)
    # the last partial window repeats the last frame: 10 frames, stride 4 -> 3 windows
    assert window_frame_indices(10, 4, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 9, 9]]
    assert window_frame_indices(3, 4, 2).tolist() == [[0, 1, 2, 2], [2, 2, 2, 2]]
    # fewer frames than the window: the middle frame of each equal part
    assert frame_offsets(8, 4).tolist() == [1, 3, 5, 7]
    assert frame_offsets(4, 3).tolist() == [0, 2, 3]
    assert window_frame_indices(16, 8, 8, 2).tolist() == [[2, 6], [10, 14]]


class _Brightness(torch.nn.Module):
    """Stands in for SViTT-Ego: a window's feature is the brightness (/ 10) of each of its frames,
    infinite for a black frame."""
    config = SimpleNamespace(vision=SimpleNamespace(num_frames=4, image_size=8, mean=[0.0] * 3, std=[1.0] * 3,
                                                    width=4, grid_size=1), embed_dim=4)

    def forward_video(self, frames):
        level = frames.mean(dim=(2, 3, 4)) * 255 / 10
        return SimpleNamespace(pooled=torch.where(level < 0.5, torch.inf, level))


def _grey(count, first=1):
    """uint8 frames [count, 8, 8, 3]; frame j has brightness 10 * (first + j)."""
    return (10 * (first + torch.arange(count, dtype=torch.uint8)))[:, None, None, None].expand(-1, 8, 8, 3).clone()


def _assert_rows(rows, expected):
    torch.testing.assert_close(rows, torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=0)


def test_rows_and_times_of_frames_in_memory_and_resampling():
    result = extract_video_features(_Brightness(), _grey(10), fps=5.0, dtype="float32")
    _assert_rows(result.features, [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 10, 10]])
    assert result.times.tolist() == pytest.approx([0.4, 1.2, 2.0])
    # resampled from 10 to 5 fps: frame k is the one shown at (k + 0.5) / 5 s, native frame 2k + 1
    half = extract_video_features(_Brightness(), _grey(16), fps=10.0, resample_fps=5.0, dtype="float32")
    _assert_rows(half.features, [[2, 4, 6, 8], [10, 12, 14, 16]])
    assert half.times.tolist() == pytest.approx([0.4, 1.2])
    # a window of 8 frames seen as 4: frames 1, 3, 5, 7 of each
    spread = extract_video_features(_Brightness(), _grey(16), fps=10.0, window=8, dtype="float32")
    _assert_rows(spread.features, [[2, 4, 6, 8], [10, 12, 14, 16]])
    assert spread.times.tolist() == pytest.approx([0.4, 1.2])


def test_a_non_finite_feature_is_refused_naming_the_video_and_window():
    frames = _grey(16)
    frames[9] = 0  # black: an infinite feature in window 2
    with pytest.raises(FeatureFolderError, match="frames: window 2 has a non-finite feature"):
        extract_video_features(_Brightness(), frames, fps=10.0, batch_size=1)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A random small SViTT-Ego (4 frames of 32 x 32) saved as a folder and as a training checkpoint."""
    root = tmp_path_factory.mktemp("features")
    cfg = load_config("tiny", SMALL_MODEL)
    torch.manual_seed(0)
    model = create_model(cfg.model, load_pretrained=False).eval()
    model.save_pretrained(root / "model")
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, root / "model.pt")
    torch.manual_seed(1)
    create_model(cfg.model, load_pretrained=False).save_pretrained(root / "other")
    return SimpleNamespace(root=root, model=model)


def _video(path, count, fps=30):
    return write_video(path, [draw_code(j, 0) for j in range(count)], Fraction(fps))


def test_one_digest_for_a_checkpoint_and_its_folder(small):
    folder, pt, other = (load_model(small.root / name)[1] for name in ("model", "model.pt", "other"))
    assert folder == pt == weights_digest(small.model.state_dict()) and other != folder
    state = small.model.state_dict()
    assert weights_digest({k: state[k] for k in reversed(state)}) == folder  # name order, not insertion order
    assert weights_digest({**state, "temp": state["temp"].double()}) != folder  # dtypes count
    assert weights_digest({"a": torch.zeros(2, 3)}) != weights_digest({"a": torch.zeros(3, 2)})  # shapes count


def test_75_rows_from_a_10_s_30_fps_video(small, tmp_path):
    video = _video(tmp_path / "ten.mp4", 300)
    result = extract_video_features(small.model, video, batch_size=75)
    assert result.features.shape == (75, 48) and result.features.dtype == torch.float16
    assert result.times == pytest.approx((4 * np.arange(75) + 2) / 30)


def test_the_same_features_from_the_cli_python_and_nlq_extraction(small, tmp_path, capsys):
    """A clip that starts at 0 and spans its video: extract-features on the file and on the chunk
    folder, extract_video_features and extract-nlq-features give the same rows."""
    video = _video(tmp_path / "videos" / "v" / "0.mp4", 45)
    nlq = tmp_path / "nlq.json"
    nlq.write_text(json.dumps({"videos": [{"video_uid": "v", "clips": [{
        "clip_uid": "c", "video_start_sec": 0.0, "video_end_sec": 1.5, "annotations": [{
            "annotation_uid": "a", "language_queries": [{"query": "when?"}]}]}]}]}))
    assert main(["extract-features", str(small.root / "model"), str(video), "--output", str(tmp_path / "file")]) == 0
    assert main(["extract-features", str(small.root / "model"), "v", "--root", str(tmp_path / "videos"),
                 "--output", str(tmp_path / "chunks")]) == 0
    assert main(["extract-nlq-features", str(small.root / "model.pt"), "--annotations", str(nlq), "--videos",
                 str(tmp_path / "videos"), "--output", str(tmp_path / "nlq")]) == 0
    python = extract_video_features(small.model, video).features
    from_file = load_features(tmp_path / "file")
    assert from_file.keys() == ["0"] and from_file.features("0").shape == (12, 48)
    for folder, key in (("file", "0"), ("chunks", "v"), ("nlq", "c")):
        features = load_features(tmp_path / folder)
        torch.testing.assert_close(features.features(key), python, rtol=0, atol=0)
        assert features.times(key) == pytest.approx((4 * np.arange(12) + 2) / 30)
    digests = {json.loads((tmp_path / f / "manifest.json").read_text())["weights_digest"] for f in ("file", "nlq")}
    assert len(digests) == 1  # the folder and the .pt of the same weights


def test_tokens_and_projected(small, tmp_path):
    video = _video(tmp_path / "v.mp4", 8)
    tokens = extract_video_features(small.model, video, what="tokens", dtype="float32", batch_size=2)
    grid = small.model.config.vision.grid_size  # 2 x 2 patches, 4 frames, 12 kept after pruning layer 0
    assert tokens.features.shape == (2, 12, 48) and tokens.positions.shape == (2, 12, 3)
    assert tokens.positions[..., 0].max() < 4 and tokens.positions[..., 1:].max() < grid
    projected = extract_video_features(small.model, video, what="projected", dtype="float32").features
    pooled = extract_video_features(small.model, video, dtype="float32").features
    torch.testing.assert_close(projected, torch.nn.functional.normalize(small.model.vision_proj(pooled), dim=-1))


def _kill_on_second_video(monkeypatch):
    real, seen = WindowExtractor.rows, []

    def rows(self, source, progress=None):
        seen.append(Path(source.name).name)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(self, source, progress)

    monkeypatch.setattr(WindowExtractor, "rows", rows)
    return seen


def test_resume_after_a_kill_and_refusals(small, tmp_path, monkeypatch, capsys):
    for name in ("a", "b"):
        _video(tmp_path / "in" / f"{name}.mp4", 8)
    (tmp_path / "in" / "junk.mp4").write_bytes(b"not a video")
    out, model = tmp_path / "out", str(small.root / "model")
    seen = _kill_on_second_video(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        main(["extract-features", model, str(tmp_path / "in"), "--output", str(out)])
    assert feature_file(out, "a").exists() and not feature_file(out, "b").exists()

    capsys.readouterr()
    assert main(["extract-features", model, str(tmp_path / "in"), "--output", str(out), "--stride", "2"]) == 2
    assert "manifest.json: the folder holds features of other settings or weights (stride 4 -> 2)" in \
        capsys.readouterr().err
    assert main(["extract-features", str(small.root / "other"), str(tmp_path / "in"), "--output", str(out)]) == 2
    assert "(weights_digest 'sha256:" in capsys.readouterr().err
    for bad in (["--stride", "0"], ["--stride", "-4"], ["--batch-size", "0"], ["--frames", "8", "--window", "4"],
                ["--fps", "-1"], ["--fps", "nan"]):
        assert main(["extract-features", model, str(tmp_path / "in"), "--output", str(tmp_path / "x"), *bad]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "x").exists()

    seen.clear()
    monkeypatch.undo()
    assert main(["extract-features", model, str(tmp_path / "in"), "--output", str(out)]) == 1  # one unreadable
    summary = capsys.readouterr().out
    assert "2 videos have features" in summary and "1 unreadable" in summary and "junk.mp4" in summary
    features = load_features(out)
    assert features.keys() == ["a", "b"] and "junk" in features.manifest["failed"]
    with pytest.raises(FeatureFolderError, match="junk has no features"):
        features.features("junk")


def test_a_folder_of_other_files_is_refused(small, tmp_path, capsys):
    _video(tmp_path / "a.mp4", 4)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "meta.json").write_text("{}")
    assert main(["extract-features", str(small.root / "model"), str(tmp_path / "a.mp4"),
                 "--output", str(tmp_path / "out")]) == 2
    assert "holds meta.json but no manifest.json" in capsys.readouterr().err


def test_a_video_of_the_same_name_from_another_source_is_refused_naming_both(small, tmp_path, capsys):
    """Camera names repeat daily: day2/GX010001.mp4 (other frames, the same count) is not day1's."""
    day1 = write_video(tmp_path / "day1" / "GX010001.mp4", [draw_code(j, 0) for j in range(8)], Fraction(10))
    day2 = write_video(tmp_path / "day2" / "GX010001.mp4", [draw_code(j, 1) for j in range(8)], Fraction(10))
    out, model = tmp_path / "f", str(small.root / "model")
    assert main(["extract-features", model, str(tmp_path / "day1"), "--output", str(out)]) == 0
    saved = feature_file(out, "GX010001").read_bytes()
    capsys.readouterr()
    assert main(["extract-features", model, str(tmp_path / "day2"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"GX010001 holds the features of {day1}, and {day2} has the same name" in err
    assert load_features(out).info("GX010001")["source"] == str(day1)
    assert feature_file(out, "GX010001").read_bytes() == saved
    stat = day1.stat()
    os.utime(day1, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # changed since
    assert main(["extract-features", model, str(day1), "--output", str(out)]) == 2
    assert "video GX010001 differs from the one its features were made of (mtime_ns" in capsys.readouterr().err


def test_list_videos(tmp_path):
    for path in ("x/a.mp4", "x/b c.MOV", "x/notes.txt", "chunks/v1/0.mp4", "y/a.mp4"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"")
    (tmp_path / "list.txt").write_text("# mine\nx/a.mp4\n\nmissing.mp4\nchunks/v1\n")
    found = list_videos([tmp_path / "x", tmp_path / "list.txt", "v1"], root=tmp_path / "chunks")
    assert {k: v.relative_to(tmp_path).as_posix() for k, v in found.items()} == {
        "a": "x/a.mp4", "b_c": "x/b c.MOV", "missing": "missing.mp4", "v1": "chunks/v1"}
    with pytest.raises(FeatureFolderError, match="would both be written as a"):
        list_videos([tmp_path / "x", tmp_path / "y"])
    with pytest.raises(FeatureFolderError, match="nowhere.mp4: no such video file or folder"):
        list_videos([tmp_path / "nowhere.mp4"])


# --------------------------------------------------------------------------- malformed feature folders


@pytest.fixture(scope="module")
def folder(small, tmp_path_factory):
    """A feature folder of one 12-window video ``v``."""
    root = tmp_path_factory.mktemp("folder")
    _video(root / "v.mp4", 45)
    assert main(["extract-features", str(small.root / "model"), str(root / "v.mp4"),
                 "--output", str(root / "out")]) == 0
    return root / "out"


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _junk_pickle(path):
    torch.save({"features": _Evil()}, path)


FILES = {
    "junk": lambda p: p.write_bytes(b"\x00junk" * 10),
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-100]),
    "a crafted pickle": _junk_pickle,
    "a folder": lambda p: (p.unlink(), p.mkdir()),
    "other tensors": lambda p: save_file({"features": torch.zeros(12, 48, dtype=torch.float16),
                                          "extra": torch.zeros(1)}, p),
    "wrong rows": lambda p: save_file({"features": torch.zeros(75, 48, dtype=torch.float16)}, p),
    "wrong width": lambda p: save_file({"features": torch.zeros(12, 47, dtype=torch.float16)}, p),
    "wrong dtype": lambda p: save_file({"features": torch.zeros(12, 48)}, p),
    "NaN": lambda p: save_file({"features": torch.full((12, 48), torch.nan, dtype=torch.float16)}, p),
}


@pytest.mark.parametrize("case", FILES)
def test_a_malformed_feature_file_is_one_line_naming_it(folder, tmp_path, case, capsys):
    copy = shutil.copytree(folder, tmp_path / "out")
    FILES[case](feature_file(copy, "v"))
    with pytest.raises(FeatureFolderError) as err:
        load_features(copy).features("v")
    message = str(err.value)
    assert message.startswith(str(feature_file(copy, "v"))) and "\n" not in message
    assert "weights_only" not in message and "pwned" not in capsys.readouterr().out


MANIFESTS = {
    "not JSON": ("{", "not valid JSON"),
    "a list": ([], "expected a JSON object"),
    "stride 0": ({"stride": 0}, "field 'stride' must be a whole number >= 1"),
    "stride -4": ({"stride": -4}, "field 'stride' must be a whole number >= 1"),
    "stride as text": ({"stride": "4"}, "field 'stride'"),
    "dimension 1e9": ({"row_shape": [10 ** 9], "dimension": 10 ** 9}, "field 'row_shape' must be a list"),
    "dimension apart from row_shape": ({"dimension": 12}, "field 'dimension' must be the last size"),
    "windows": ({"videos": {"v": {"source": "v", "fps": 30.0, "first_frame": 0, "frames": 45, "windows": 11}}},
                "video v: field 'windows' must be ceil"),
    "a path as key": ({"videos": {"../x": {}}}, "'../x' does not name a feature file"),
    "fps NaN": ({"fps": float("nan")}, "field 'fps'"),
    "digest": ({"weights_digest": "md5:0"}, "field 'weights_digest'"),
    "what": ({"what": {}}, "field 'what'"),
    "dtype": ({"dtype": []}, "field 'dtype'"),
    "failed": ({"failed": []}, "field 'failed'"),
}


@pytest.mark.parametrize("case", MANIFESTS)
def test_a_malformed_manifest_is_one_line_exit_2(folder, tmp_path, case, capsys):
    copy = shutil.copytree(folder, tmp_path / "out")
    change, expected = MANIFESTS[case]
    manifest = json.loads((copy / "manifest.json").read_text())
    text = change if isinstance(change, str) else json.dumps(
        {**manifest, **change} if isinstance(change, dict) else change)
    (copy / "manifest.json").write_text(text)
    assert main(["extract-features", manifest["checkpoint"], str(folder.parent / "v.mp4"), "--output", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(copy / "manifest.json") in err and expected in err


def _manifest_values():
    scalars = (st.none() | st.booleans() | st.integers(-5, 10 ** 12) | st.just(10 ** 400) | st.floats()
               | st.text(max_size=8))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=6), inner, max_size=3), max_leaves=8)


MANIFEST_KEYS = ["format", "checkpoint", "weights_digest", "what", "window", "stride", "frames", "fps", "dtype",
                 "row_shape", "dimension", "time_convention", "videos", "failed"]


@given(changes=st.dictionaries(st.sampled_from(MANIFEST_KEYS), _manifest_values(), max_size=3),
       video=st.dictionaries(st.sampled_from(["source", "fps", "first_frame", "frames", "windows"]),
                             _manifest_values(), max_size=2),
       data=st.binary(max_size=200) | st.none())
def test_the_reader_on_arbitrary_manifests_and_files(folder, tmp_path_factory, changes, video, data):
    """Any manifest and any file bytes: rows that fit the manifest, or a FeatureFolderError; never another error."""
    copy = shutil.copytree(folder, tmp_path_factory.mktemp("fuzz") / "out")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["videos"]["v"].update(video)
    (copy / "manifest.json").write_text(json.dumps({**manifest, **changes}))
    if data is not None:
        feature_file(copy, "v").write_bytes(data)
    try:
        features = load_features(copy)
        for key in features.keys():
            rows = features.features(key)
            assert rows.shape == (features.info(key)["windows"], *features.manifest["row_shape"])
            assert torch.isfinite(rows.float()).all()
    except FeatureFolderError as err:
        assert "\n" not in str(err)


# --------------------------------------------------------------------------- imports


def test_the_model_path_imports_no_pyav(tmp_path):
    script = ("import sys; sys.modules['av'] = None\n"
              "import torch\n"
              "from svitt_ego.features import extract_video_features\n"
              "from types import SimpleNamespace as N\n"
              "class M(torch.nn.Module):\n"
              "    config = N(vision=N(num_frames=2, image_size=4, mean=[0.0]*3, std=[1.0]*3, width=3), embed_dim=3)\n"
              "    def forward_video(self, x): return N(pooled=x.mean(dim=(2, 3, 4))[:, :1].expand(-1, 3))\n"
              "frames = torch.zeros(6, 4, 4, 3, dtype=torch.uint8)\n"
              "print(tuple(extract_video_features(M(), frames, fps=2.0).features.shape))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(3, 3)"


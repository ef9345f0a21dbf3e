"""The synthetic dataset: layout, determinism, EgoMCQ structure, and that actions show in the pixels."""

from __future__ import annotations

import ast
import json
import math
import shutil
import time

import numpy as np
import pandas as pd
import pytest

from helpers import record_bars

from svitt_ego.data import toy

av = pytest.importorskip("av")  # these tests write and read videos (PyAV)

NUM_VIDEOS = 6
FILES = ["egoclip.csv", "egomcq.json", "taxonomy_verbs.json", "taxonomy_nouns.json",
         "nlq_train.json", "nlq_val.json", "README.md", "manifest.json"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return toy.make_toy_data(tmp_path_factory.mktemp("toy"), seed=0, num_videos=NUM_VIDEOS)


@pytest.fixture(scope="module")
def clips(root):
    return pd.read_csv(root / "egoclip.csv", sep="\t")


@pytest.fixture(scope="module")
def mcq(root):
    return json.loads((root / "egomcq.json").read_text())


def _tags(text: str) -> list[int]:
    value = ast.literal_eval(text)
    assert isinstance(value, list) and all(isinstance(v, int) for v in value)
    return value


def test_same_seed_same_metadata_and_videos(root, tmp_path):
    again = toy.make_toy_data(tmp_path / "again", seed=0, num_videos=NUM_VIDEOS)
    for name in FILES:
        assert (again / name).read_bytes() == (root / name).read_bytes(), name
    first = sorted(p.relative_to(root) for p in (root / "videos").rglob("*.mp4"))
    assert first == sorted(p.relative_to(again) for p in (again / "videos").rglob("*.mp4"))
    assert all((root / p).read_bytes() == (again / p).read_bytes() for p in first)
    other = toy.plan_world(seed=1, num_videos=NUM_VIDEOS)
    assert [p.uid for p in other] != [p.uid for p in toy.plan_world(seed=0, num_videos=NUM_VIDEOS)]


def test_complete_dataset_is_not_regenerated(root):
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    start = time.perf_counter()
    assert toy.make_toy_data(root, seed=0, num_videos=NUM_VIDEOS) == root
    assert time.perf_counter() - start < 1.0
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_egoclip_csv_layout(root, clips):
    header = (root / "egoclip.csv").read_text().splitlines()[0]
    assert header.split("\t") == ["clip_idx", "video_uid", "video_dur", "narration_source", "narration_ind",
                                  "narration_time", "clip_start", "clip_end", "clip_text", "tag_verb", "tag_noun"]
    verbs = json.loads((root / "taxonomy_verbs.json").read_text())
    nouns = json.loads((root / "taxonomy_nouns.json").read_text())
    assert list(clips.clip_idx) == list(range(len(clips)))
    assert (clips.narration_source == "narration_pass_1").all()
    assert clips.clip_text.str.startswith("#C C ").all()
    for row in clips.itertuples():
        (verb,), (noun,) = _tags(row.tag_verb), _tags(row.tag_noun)
        assert str(verb) in verbs and str(noun) in nouns
        assert row.clip_text == f"#C C {toy.VERBS[verb][0]} the {nouns[str(noun)]}"
        assert 0 <= row.clip_start < row.narration_time < row.clip_end <= row.video_dur
    # Training videos only; the validation videos appear in EgoMCQ alone.
    val_uids = {p.uid for p in toy.plan_world(0, NUM_VIDEOS) if p.split == "val"}
    assert val_uids and not val_uids & set(clips.video_uid)


def test_video_chunks(root, clips):
    durations = clips.groupby("video_uid").video_dur.first()
    assert (durations > toy.CHUNK_SECONDS).sum() == 1
    for uid, dur in durations.items():
        chunks = sorted(p.name for p in (root / "videos" / uid).iterdir())
        assert chunks == [f"{k}.mp4" for k in range(math.ceil(dur / toy.CHUNK_SECONDS))]
    long_uid = durations.idxmax()
    long = clips[clips.video_uid == long_uid]
    assert ((long.clip_start < toy.CHUNK_SECONDS) & (long.clip_end > toy.CHUNK_SECONDS)).any()
    frames = 0
    for k in (0, 1):
        with av.open(str(root / "videos" / long_uid / f"{k}.mp4")) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264" and stream.average_rate == toy.FPS
            assert (stream.width, stream.height) == (toy.SIZE, toy.SIZE)
            frames += sum(1 for _ in container.decode(stream))
    assert frames == round(durations[long_uid] * toy.FPS)


def test_egomcq_structure(root, mcq, clips):
    val_uids = {p.uid for p in toy.plan_world(0, NUM_VIDEOS) if p.split == "val"}
    assert list(mcq) == [str(i) for i in range(len(mcq))]
    types = [q["types"] for q in mcq.values()]
    assert abs(types.count(1) - types.count(2)) <= 1
    for q in mcq.values():
        choices = q["choices"]
        assert list(choices) == ["0", "1", "2", "3", "4"]
        assert 0 <= q["answer"] < 5 and choices[str(q["answer"])] == q["query"]
        query = q["query"]
        assert query["video_uid"] in val_uids
        for key in ("video_uid", "clip_start", "clip_end", "clip_text", "narration_time",
                    "tag_verb", "tag_noun", "clip_idx"):
            assert key in query
        wrong = [c for k, c in choices.items() if k != str(q["answer"])]
        for c in wrong:
            assert (c["tag_verb"], c["tag_noun"]) != (query["tag_verb"], query["tag_noun"])
            assert c["clip_idx"] != query["clip_idx"]
            if q["types"] == 1:
                assert c["video_uid"] != query["video_uid"] and c["video_uid"] in val_uids
            else:
                assert c["video_uid"] == query["video_uid"]


def test_nlq_annotations(root, clips):
    for split in ("train", "val"):
        data = json.loads((root / f"nlq_{split}.json").read_text())
        assert data["videos"]
        for video in data["videos"]:
            for clip in video["clips"]:
                length = clip["video_end_sec"] - clip["video_start_sec"]
                assert clip["clip_start_sec"] == 0 and abs(clip["clip_end_sec"] - length) < 1e-6
                for ann in clip["annotations"]:
                    for query in ann["language_queries"]:
                        assert query["query"].startswith("When did I ")
                        assert 0 <= query["clip_start_sec"] < query["clip_end_sec"] <= clip["clip_end_sec"]


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _object_pixels(frame: np.ndarray, colour: tuple) -> np.ndarray:
    """(y, x) of the pixels of the object's main colour."""
    distance = np.abs(frame.astype(np.int16) - np.array(colour, np.int16)).sum(-1)
    return np.argwhere(distance < 60)


def test_actions_show_as_motion(root, clips):
    """The acted-upon object moves as its verb says: up, down, away (smaller), nearer (bigger)."""
    nouns = json.loads((root / "taxonomy_nouns.json").read_text())
    checked = {name: 0 for name in ("picks up", "puts down", "pushes", "pulls", "slides")}
    short = clips[clips.video_dur < toy.CHUNK_SECONDS]
    for uid, video in short.groupby("video_uid"):
        frames = _frames(root / "videos" / uid / "0.mp4")
        colours = [nouns[str(_tags(t)[0])].split()[0] for t in video.tag_noun.unique()]
        for row in video.itertuples():
            name = toy.VERBS[_tags(row.tag_verb)[0]][0]
            colour = nouns[str(_tags(row.tag_noun)[0])].split()[0]
            if name not in checked or colours.count(colour) > 1 or checked[name] >= 3:
                continue  # another object of this colour would confuse the centroid
            length = row.clip_end - row.clip_start
            early = _object_pixels(frames[math.ceil((row.clip_start + 0.15 * length) * toy.FPS)], toy.COLOURS[colour])
            late = _object_pixels(frames[int((row.clip_end - 0.15 * length) * toy.FPS)], toy.COLOURS[colour])
            assert len(early) > 20 and len(late) > 20, row.clip_text
            (y0, x0), (y1, x1) = early.mean(0), late.mean(0)
            if name == "picks up":
                assert y1 < y0 - 10, row.clip_text
            elif name == "puts down":
                assert y1 > y0 + 10, row.clip_text
            elif name == "pushes":
                assert len(late) < 0.75 * len(early), row.clip_text
            elif name == "pulls":
                assert len(late) > 1.25 * len(early), row.clip_text
            elif name == "slides":
                assert abs(x1 - x0) > 10 and abs(y1 - y0) < 5, row.clip_text
            checked[name] += 1
    assert all(n >= 1 for n in checked.values()), checked


def test_each_video_has_its_own_scene():
    plans = toy.plan_world(0, NUM_VIDEOS)
    first = [next(iter(toy.render_frames(p, 0, 1))) for p in plans]
    assert all(f.shape == (toy.SIZE, toy.SIZE, 3) and f.dtype == np.uint8 for f in first)
    means = np.array([f.reshape(-1, 3).mean(0) for f in first])
    assert np.abs(means[:, None] - means[None]).sum(-1)[~np.eye(len(plans), dtype=bool)].min() > 1.0


def test_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    from svitt_ego.cli import main

    real = tmp_path / "realdata"
    (real / "videos" / "v").mkdir(parents=True)
    (real / "videos" / "v" / "0.mp4").write_text("x")
    (real / "manifest.json").write_text('{"dataset": "mine"}')
    assert main(["make-toy-data", str(real), "--num-videos", str(NUM_VIDEOS)]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "not made by svitt-ego make-toy-data" in message
    assert "manifest.json" in message and "videos" in message
    assert (real / "videos" / "v" / "0.mp4").read_text() == "x"
    assert (real / "manifest.json").read_text() == '{"dataset": "mine"}'
    assert sorted(p.name for p in real.iterdir()) == ["manifest.json", "videos"]


def test_regenerating_deletes_only_what_the_manifest_lists(root, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(root, old)
    (old / "notes.txt").write_text("mine")
    (old / "videos" / "mine").mkdir()
    (old / "videos" / "mine" / "0.mp4").write_text("mine")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.mp4").write_text("keep")
    manifest = json.loads((old / "manifest.json").read_text())
    old_uids = [p.uid for p in toy.plan_world(seed=0, num_videos=NUM_VIDEOS)]
    # A crafted manifest cannot widen what is deleted; a listed link is removed, not followed.
    manifest["outputs"] = manifest.get("outputs", []) + ["notes.txt", "../elsewhere", "videos/../../elsewhere", "videos/link"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    (old / "videos" / "link").symlink_to(elsewhere)

    toy.make_toy_data(old, seed=1, num_videos=NUM_VIDEOS - 1)
    new_uids = {p.uid for p in toy.plan_world(seed=1, num_videos=NUM_VIDEOS - 1)}
    assert {p.name for p in (old / "videos").iterdir()} == new_uids | {"mine"}
    assert not set(old_uids) & new_uids
    assert (old / "notes.txt").read_text() == "mine" and (old / "videos" / "mine" / "0.mp4").read_text() == "mine"
    assert (elsewhere / "keep.mp4").read_text() == "keep"
    assert json.loads((old / "manifest.json").read_text())["seed"] == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_rendering_shows_a_bar_that_ends_at_its_total(monkeypatch, workers):
    bars = record_bars(monkeypatch, toy)
    monkeypatch.setattr(toy, "usable_cores", lambda: workers)
    toy.render_all(math.sqrt, [(4.0,), (9.0,), (16.0,)], "squares")
    assert [(bar.desc, bar.n, bar.total) for bar in bars] == [("squares", 3, 3)]

"""``svitt-ego search``: raw videos through the cache, feature folders, the page and the contact sheet
it writes (checked in Chromium and decoded), and clip retrieval with Recall@K worked by hand."""

import fcntl
import json
import os
import shutil
import threading
import time
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from browser import Cards, load
from helpers import SMALL_MODEL, draw_code, write_video
from PIL import Image
from safetensors.torch import load_file, save_file

from svitt_ego.cli import main
from svitt_ego.config import load_config
from svitt_ego.features import WindowExtractor
from svitt_ego.models import create_model
from svitt_ego.search import (MOMENT_LENGTHS, Extraction, best_moments, match_score, recall_at, run_contrast,
                              search_folder, search_videos, segment_iou)
from svitt_ego.search_page import THUMB_HEIGHT, format_time

QUERIES = ["when did I open the drawer?", "where is the cup?"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small random model (and another), a playable 4-s mp4, an h264 .avi no browser plays, a junk file."""
    root = tmp_path_factory.mktemp("search")
    for seed, name in ((0, "model"), (1, "other")):
        torch.manual_seed(seed)
        create_model(load_config("tiny", SMALL_MODEL).model, load_pretrained=False).save_pretrained(root / name)
    write_video(root / "videos" / "kitchen.mp4", [draw_code(j, 0) for j in range(40)], Fraction(10))
    write_video(root / "videos" / "garage.avi", [draw_code(j, 1) for j in range(30)], Fraction(10))
    (root / "junk").mkdir()
    (root / "junk" / "broken.mp4").write_bytes(b"not a video")
    return SimpleNamespace(root=root, model=str(root / "model"), videos=root / "videos",
                           kitchen=root / "videos" / "kitchen.mp4")


def _main(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(list(map(str, argv)))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _table(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(("query:", "rank", "   "))]


def test_best_moments_by_hand():
    # Runs of 1, 2, 4 windows, inside mean less the mean of one window on either side: [1, 4] 0.7 - 0;
    # [0, 3] 0.675 - 0.1 = 0.575 overlaps it by IoU 0.6 (dropped); [2, 3] 0.95 - (0.8 + 0.1) / 2 = 0.5 and
    # [1, 2] 0.9 - (0 + 0.9) / 2 = 0.45 overlap it by IoU exactly 0.5 (dropped: suppression is at IoU >= 0.5).
    # Next comes the single window 3: 0.9 - (1.0 + 0.1) / 2 = 0.35, IoU 0.25.
    scores = torch.tensor([0.0, 0.8, 1.0, 0.9, 0.1])
    assert best_moments(scores, top_k=2) == [(1, 4, pytest.approx(0.7)), (3, 3, pytest.approx(0.35))]


class _Windows:
    """A feature folder of 'projected' rows whose cosines with the query [1, 0] are given, a window a second."""

    manifest = {"what": "projected"}

    def __init__(self, cosines: dict[str, list[float]]):
        self.cosines = {k: torch.tensor(v, dtype=torch.float64) for k, v in cosines.items()}

    def keys(self):
        return list(self.cosines)

    def info(self, key):
        return {"frames": len(self.cosines[key]), "fps": 1.0, "source": key}

    def features(self, key):
        c = self.cosines[key]
        return torch.stack([c, (1 - c ** 2).sqrt()], 1)

    def to_seconds(self, key, window):
        return window + 0.5


def test_moments_of_different_videos_rank_by_their_match_not_their_contrast():
    """A video with cuts steps between scene levels whatever the query: its moment [4, 7] stands out by
    0.3 - 0.1 = 0.2, the smooth video's best, window 5, by only 0.45 - 0.4 = 0.05; but the smooth
    video's moment matches the query better (mean cosine 0.45 against 0.3), and it ranks first."""
    folder = _Windows({"cuts": [0.1] * 4 + [0.3] * 4 + [0.1] * 4, "smooth": [0.4] * 5 + [0.45] + [0.4] * 6})
    cut_column, smooth_column = (folder.cosines[k].float() for k in ("cuts", "smooth"))
    assert best_moments(cut_column, 1) == [(4, 7, pytest.approx(0.2))]
    assert best_moments(smooth_column, 1) == [(5, 5, pytest.approx(0.05))]
    assert match_score(cut_column, 4, 7) == pytest.approx(0.3)
    assert match_score(smooth_column, 5, 5) == pytest.approx(0.45)
    found = search_folder(None, folder, torch.tensor([[1.0, 0.0]]), top_k=1)[0]
    assert [(m.video, m.start, m.end, round(m.score, 6)) for m in sorted(found, key=lambda m: -m.score)] == \
        [("smooth", 5.0, 6.0, 0.45), ("cuts", 4.0, 8.0, 0.3)]


def _best_moments_by_all_pairs(scores, top_k, iou_threshold=0.5):
    """best_moments as first written: every run against every kept run (O(runs x k))."""
    spans, values = [], []
    for length in (n for n in MOMENT_LENGTHS if n <= len(scores)):
        starts = torch.arange(len(scores) - length + 1)
        spans.append(torch.stack([starts, starts + length], 1).double())  # [first, last + 1)
        values.append(run_contrast(scores, length))
    spans, values, chosen = torch.cat(spans), torch.cat(values), []
    for i in values.argsort(descending=True).tolist():
        if all(segment_iou(spans[i], spans[j][None])[0] < iou_threshold for j in chosen):
            chosen.append(i)
            if len(chosen) == top_k:
                break
    return [(int(spans[i, 0]), int(spans[i, 1]) - 1, float(values[i])) for i in chosen]


@pytest.mark.parametrize("windows, top_ks", [(1, (1, 5)), (2, (1, 5)), (3, (2, 10**6)), (7, (1, 3, 10**6)),
                                             (40, (1, 5, 20, 10**6)), (300, (1, 5, 40))])
def test_best_moments_keeps_what_comparing_every_pair_keeps(windows, top_ks):
    scores = torch.rand(windows, generator=torch.Generator().manual_seed(windows))
    for top_k in top_ks:
        assert best_moments(scores, top_k) == _best_moments_by_all_pairs(scores, top_k), top_k


def test_best_moments_of_an_hour_at_any_k_is_prompt():
    scores = torch.rand(3600, generator=torch.Generator().manual_seed(0))  # an hour at a window a second
    start = time.perf_counter()
    kept = best_moments(scores, 10**6)
    assert time.perf_counter() - start < 10  # comparing every kept pair: 21,500 runs x 10,000 kept
    spans = [(first, last + 1) for first, last, _ in kept]
    assert len(kept) < sum(3600 - n + 1 for n in MOMENT_LENGTHS) and len(set(spans)) == len(spans)
    assert [score for *_, score in kept] == sorted((score for *_, score in kept), reverse=True)


def test_a_run_with_nothing_outside_it_scores_zero():
    assert run_contrast(torch.tensor([0.3, 0.9]), 2).tolist() == [0.0]
    assert run_contrast(torch.tensor([0.3, 0.9]), 1).tolist() == pytest.approx([-0.6, 0.6])


def _count_extractions(monkeypatch) -> list[str]:
    real, seen = WindowExtractor.rows, []

    def rows(self, source, progress=None):
        seen.append(Path(source.name).name)
        return real(self, source, progress)

    monkeypatch.setattr(WindowExtractor, "rows", rows)
    return seen


def test_raw_videos_are_extracted_once_per_file_state_and_setting(world, tmp_path, monkeypatch, capsys):
    video, cache = shutil.copy(world.kitchen, tmp_path / "kitchen.mp4"), tmp_path / "cache"
    seen = _count_extractions(monkeypatch)
    argv = ["search", world.model, video, *QUERIES, "--top-k", "2", "--cache", cache]
    status, first, _ = _main(capsys, *argv)
    assert status == 0 and seen == ["kitchen.mp4"] and len(list(cache.iterdir())) == 1
    assert f"extracted {video} into {cache}" in first and "0 reused, 1 extracted, 0 unreadable" in first

    status, second, _ = _main(capsys, *argv)
    assert status == 0 and seen == ["kitchen.mp4"]  # no extraction
    assert f"reused {next(cache.iterdir())} for {video}" in second and _table(second) == _table(first)

    stat = os.stat(video)
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # touched: another entry
    assert _main(capsys, *argv)[0] == 0 and len(seen) == 2 and len(list(cache.iterdir())) == 2
    assert _main(capsys, *argv, "--stride", "2")[0] == 0 and len(seen) == 3 and len(list(cache.iterdir())) == 3
    status, again, _ = _main(capsys, *argv)
    assert status == 0 and len(seen) == 3 and "1 reused" in again  # the earlier entries are intact


def _cached(world, tmp_path, capsys):
    """A copy of the kitchen video, the search of it through a cache, its output and the cache's one entry."""
    video, cache = shutil.copy(world.kitchen, tmp_path / "kitchen.mp4"), tmp_path / "cache"
    argv = ["search", world.model, video, *QUERIES, "--top-k", "2", "--cache", cache]
    status, out, _ = _main(capsys, *argv)
    assert status == 0
    return argv, out, next(cache.iterdir())


def test_a_cache_entry_whose_files_or_source_were_changed_is_extracted_again(world, tmp_path, monkeypatch, capsys):
    argv, first, entry = _cached(world, tmp_path, capsys)
    seen = _count_extractions(monkeypatch)
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["videos"]["kitchen"]["source"] = str(world.root / "videos" / "garage.avi")  # another video
    (entry / "manifest.json").write_text(json.dumps(manifest))
    status, out, _ = _main(capsys, *argv)
    assert status == 0 and seen == ["kitchen.mp4"] and "extracted" in out and _table(out) == _table(first)

    features = load_file(entry / "videos" / "kitchen.safetensors")["features"]
    save_file({"features": torch.ones_like(features)}, entry / "videos" / "kitchen.safetensors")  # right shape
    status, out, _ = _main(capsys, *argv)
    assert status == 0 and len(seen) == 2 and "extracted" in out and _table(out) == _table(first)
    assert "reused" in _main(capsys, *argv)[1] and len(seen) == 2


def test_a_cache_entry_that_is_a_link_is_refused_and_its_target_untouched(world, tmp_path, capsys):
    argv, _, entry = _cached(world, tmp_path, capsys)
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in ("movie.mkv.part", ".notes.txt.tmp", ".x.0123456789abcdef.tmp"):
        (victim / name).write_text("precious")
    shutil.rmtree(entry)
    entry.symlink_to(victim)
    status, _, err = _main(capsys, *argv)
    assert status == 2 and err.count("\n") == 1 and f"{entry} is a symbolic link" in err
    assert sorted(p.name for p in victim.iterdir()) == [".notes.txt.tmp", ".x.0123456789abcdef.tmp", "movie.mkv.part"]


def test_a_second_search_waits_for_the_entry_another_is_extracting_then_reuses_it(world, tmp_path, monkeypatch,
                                                                                  capsys):
    argv, first, entry = _cached(world, tmp_path, capsys)
    done = shutil.move(entry, tmp_path / "extracted")
    entry.mkdir()
    lock = open(entry / ".lock", "a")
    fcntl.flock(lock, fcntl.LOCK_EX)  # another search, extracting the entry

    def finish():
        shutil.copytree(done, entry, dirs_exist_ok=True)
        lock.close()

    seen = _count_extractions(monkeypatch)
    threading.Timer(1.0, finish).start()
    status, out, _ = _main(capsys, *argv)
    assert status == 0 and seen == [] and f"waiting for another search to finish {entry}" in out
    assert f"reused {entry}" in out and _table(out) == _table(first)


def test_a_chunk_folder_is_cached_by_its_chunks_and_shown_from_them(world, video_root, tmp_path, monkeypatch, capsys):
    folder = shutil.copytree(video_root / "v1", tmp_path / "v1")  # 0.mp4, 1.mp4: 2 s each at 30 fps
    seen = _count_extractions(monkeypatch)
    argv = ["search", world.model, folder, QUERIES[0], "--top-k", "1", "--cache", tmp_path / "cache",
            "--chunk-seconds", "2"]
    assert _main(capsys, *argv, "--png", tmp_path / "sheet.png")[0] == 0 and seen == ["v1"]
    results, _ = search_videos(world.model, folder, QUERIES[:1], 1, tmp_path / "cache", Extraction(chunk_seconds=2.0))
    assert len(seen) == 1 and results[0].moments[0].video == str(folder) and results[0].moments[0].end <= 4.0
    stat = os.stat(folder / "1.mp4")
    os.utime(folder / "1.mp4", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # the second chunk touched
    assert _main(capsys, *argv)[0] == 0 and len(seen) == 2
    sheet = np.asarray(Image.open(tmp_path / "sheet.png").convert("L"))
    assert sheet.shape[0] > THUMB_HEIGHT and sheet.std() > 40  # the strip was decoded from the chunks


def test_the_same_moments_from_raw_videos_and_from_their_feature_folder(world, tmp_path, capsys):
    assert main(["extract-features", world.model, str(world.videos), "--output", str(tmp_path / "features")]) == 0
    raw, failed = search_videos(world.model, world.videos, QUERIES, 3, tmp_path / "cache")
    folder, _ = search_videos(world.model, tmp_path / "features", QUERIES, 3)
    assert failed == {}
    assert [[(m.video, m.start, m.end, m.score) for m in r.moments] for r in raw] == \
        [[(m.video, m.start, m.end, m.score) for m in r.moments] for r in folder]
    for result in raw:  # the top 3 of each video, best first, inside the video
        assert [Path(m.video).name for m in result.moments].count("kitchen.mp4") == 3
        assert [Path(m.video).name for m in result.moments].count("garage.avi") == 3
        assert [m.score for m in result.moments] == sorted((m.score for m in result.moments), reverse=True)
        assert all(0 <= m.start < m.end <= (4.0 if "kitchen" in m.video else 3.0) for m in result.moments)
    kitchen = next(m for m in raw[0].moments if m.video.endswith("kitchen.mp4"))
    assert round(kitchen.start * 10) % 4 == 0  # windows of 4 frames at 10 fps: moments start on a window edge


def test_refusals_are_one_line_exit_2(world, tmp_path, capsys):
    assert main(["extract-features", world.model, str(world.kitchen), "--output", str(tmp_path / "pooled")]) == 0
    assert main(["extract-features", world.model, str(world.kitchen), "--output", str(tmp_path / "tokens"),
                 "--what", "tokens"]) == 0
    cases = {
        ("search", world.root / "other", tmp_path / "pooled", "drawer"): "the features were extracted with weights",
        ("search", world.model, tmp_path / "tokens", "drawer"): "holds 'tokens' features",
        ("search", world.model, world.kitchen, "drawer"): "raw videos need --cache DIR",
        ("search", world.model, tmp_path / "pooled"): "give at least one QUERY",
        ("search", world.model, tmp_path / "missing.mp4", "drawer", "--cache", tmp_path): "no such video file",
        ("search", world.model, tmp_path / "pooled", "drawer", "--pairs", tmp_path / "p.csv"): "--pairs takes --mode",
    }
    for argv, message in cases.items():
        status, out, err = _main(capsys, *argv)
        assert status == 2 and err.count("\n") == 1 and message in err, (argv, err)


def test_an_output_is_never_one_of_the_searched_videos(world, tmp_path, capsys):
    shutil.copytree(world.videos, tmp_path / "videos")
    victim = tmp_path / "videos" / "kitchen.mp4"
    saved = victim.read_bytes()
    for source, option in ((victim, "--html"), (tmp_path / "videos", "--html"), (tmp_path / "videos", "--png")):
        status, _, err = _main(capsys, "search", world.model, source, "drawer", "--cache", tmp_path / "cache",
                               option, victim)
        assert status == 2 and err.count("\n") == 1 and f"{victim} is also an input of this command" in err
    assert victim.read_bytes() == saved and not (tmp_path / "cache").exists()


def test_unreadable_videos_are_named_and_counted_and_the_others_searched(world, tmp_path, capsys):
    listing = tmp_path / "videos.txt"
    listing.write_text(f"{world.kitchen}\n{world.root / 'junk' / 'broken.mp4'}\n{tmp_path / 'gone.mp4'}\n")
    status, out, _ = _main(capsys, "search", world.model, listing, "drawer", "--cache", tmp_path / "cache")
    assert status == 1
    assert "1 extracted, 2 unreadable" in out and "broken.mp4: cannot open" in out and "gone.mp4" in out
    assert "kitchen.mp4" in _table(out)[2]


def test_the_page_of_the_command_in_a_browser(world, tmp_path, capsys):
    page = tmp_path / "results.html"
    status, out, _ = _main(capsys, "search", world.model, world.videos, *QUERIES, "--top-k", "2",
                           "--cache", tmp_path / "cache", "--html", page)
    assert status == 0 and f"wrote {page}" in out
    results, _ = search_videos(world.model, world.videos, QUERIES, 2, tmp_path / "cache")
    loaded = load(page, tmp_path)
    assert loaded.requests == []
    cards = Cards()
    cards.feed(loaded.dom)
    moments = [m for r in results for m in r.moments]
    assert len(cards.cards) == len(moments) == 8  # 2 queries x 2 videos x 2 moments
    for card, m in zip(cards.cards, moments):
        assert (card["start"], card["end"]) == (pytest.approx(m.start, abs=1e-3), pytest.approx(m.end, abs=1e-3))
        assert card["time"] == f"{format_time(m.start)} – {format_time(m.end)}"
        kitchen = m.video.endswith("kitchen.mp4")  # h264 in mp4 plays; the .avi gets frames but no player
        assert card["video"] == (f"{world.kitchen.resolve().as_uri()}#t={m.start:.2f},{m.end:.2f}" if kitchen else None)
    assert cards.images == 4 * 8  # every card's strip, inline
    for query in QUERIES:
        assert query in loaded.dom


def test_the_contact_sheet_has_one_strip_per_moment(world, tmp_path, capsys):
    sheet_path = tmp_path / "sheet.png"
    status, _, _ = _main(capsys, "search", world.model, world.kitchen, QUERIES[0], "--top-k", "3",
                         "--cache", tmp_path / "cache", "--png", sheet_path)
    assert status == 0
    sheet = np.asarray(Image.open(sheet_path).convert("RGB")).astype(int)
    assert sheet.shape[1] >= 4 * THUMB_HEIGHT and sheet.std() > 40  # four thumbnails wide, not blank
    inked = (np.abs(sheet[:, :140] - 255).max(axis=2) > 30).any(axis=1)  # rows with ink left of x = 140
    edges = np.flatnonzero(np.diff(np.r_[0, inked.astype(int), 0]))
    runs = edges[1::2] - edges[::2]
    assert (runs >= THUMB_HEIGHT).sum() == 3 and runs.max() == THUMB_HEIGHT  # one thumbnail row per moment


# --------------------------------------------------------------------------- clips


def test_recall_at_k_by_hand():
    similarity = np.array([[0.9, 0.1, 0.2, 0.3, 0.0, 0.0, 0.0],  # text 0: its clip 0 first
                           [0.5, 0.4, 0.8, 0.1, 0.0, 0.0, 0.0],  # text 1: clip 1, under clips 0 and 2: third
                           [0.1, 0.2, 0.3, 0.4, 0.0, 0.0, 0.0],  # text 2: clips 0 and 3; clip 3 is first
                           [0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.6]])  # text 3: clip 6, under 6 others: seventh
    truth = np.zeros_like(similarity, dtype=bool)
    truth[0, 0] = truth[1, 1] = truth[2, 0] = truth[2, 3] = truth[3, 6] = True
    recall = recall_at(similarity, truth)
    assert recall["text -> video"] == {1: 50.0, 5: 75.0, 10: 100.0}
    # clip 0 (texts 0, 2): 0.9 first; clip 1 (text 1): 0.4 under 0.7; clip 3 (text 2): 0.4 under 0.7;
    # clip 6 (text 3): 0.6 first; clips 2, 4, 5 have no true text and are not queries
    assert recall["video -> text"] == {1: 50.0, 5: 100.0, 10: 100.0}
    ties = recall_at(np.array([[0.5, 0.5]]), np.array([[False, True]]))
    assert ties["text -> video"][1] == 0.0  # a false clip scoring as high counts against


def _pairs(path: Path, rows: str) -> Path:
    path.write_text("video,text\n" + rows)
    return path


def test_clip_retrieval_ranks_and_recalls_known_embeddings(world, tmp_path, monkeypatch, capsys):
    """Embeddings chosen by hand: clip kitchen is text A's, garage is B's and C's; C is closest to kitchen."""
    import svitt_ego.eval.embed as zero_shot

    clips = {"garage.avi": [1.0, 0.0], "kitchen.mp4": [0.0, 1.0], "broken.mp4": [float("nan")] * 2}
    texts = {"A": [0.0, 1.0], "B": [1.0, 0.0], "C": [0.1, 0.9]}
    monkeypatch.setattr(zero_shot, "embed_clips", lambda model, items, *a: (
        torch.tensor([clips[p.name] for p in items]),
        {i: f"{p}: cannot open" for i, p in enumerate(items) if p.name == "broken.mp4"}))
    monkeypatch.setattr(zero_shot, "embed_texts", lambda model, batch, *a: torch.tensor([texts[t] for t in batch]))
    folder = tmp_path / "clips"
    shutil.copytree(world.videos, folder)
    shutil.copy(world.root / "junk" / "broken.mp4", folder / "broken.mp4")
    pairs = _pairs(folder / "pairs.csv", "kitchen.mp4,A\ngarage.avi,B\ngarage.avi,C\n")
    status, out, _ = _main(capsys, "search", world.model, folder, "--mode", "clips", "--pairs", pairs)
    assert status == 1  # the broken clip is left out, named
    lines = out.splitlines()
    assert lines[1].split() == ["text", "->", "video", "66.7", "100.0", "100.0"]  # C ranks kitchen first
    assert lines[2].split() == ["video", "->", "text", "100.0", "100.0", "100.0"]  # garage: B first
    assert "3 texts; 1 unreadable clips left out" in out and "broken.mp4: cannot open" in out

    status, out, _ = _main(capsys, "search", world.model, world.videos, "C", "--mode", "clips")
    assert status == 0
    ranked = [line.split() for line in out.splitlines()[2:4]]
    assert [(r[0], r[1], r[2]) for r in ranked] == [("1", "kitchen.mp4", "4.00"), ("2", "garage.avi", "3.00")]


@pytest.mark.parametrize("rows, line, field", [
    ("kitchen.mp4,A\n../videos/kitchen.mp4,B\n", 3, "field 'video': '../videos/kitchen.mp4' is not one of"),
    ("kitchen.mp4,A\n/etc/passwd,B\n", 3, "field 'video': '/etc/passwd' is not one of"),
    ("kitchen.mp4,  \n", 2, "field 'text': empty"),
    ("kitchen.mp4,A,extra\n", 2, "expected the 2 fields of the header"),
    ("", None, "holds no pairs"),
])
def test_a_bad_pairs_file_is_one_line_naming_file_and_line(world, tmp_path, rows, line, field, capsys):
    folder = tmp_path / "clips"
    shutil.copytree(world.videos, folder)
    pairs = _pairs(folder / "pairs.csv", rows)
    status, _, err = _main(capsys, "search", world.model, folder, "--mode", "clips", "--pairs", pairs)
    where = f"{pairs}, line {line}" if line else str(pairs)
    assert status == 2 and err.count("\n") == 1 and where in err and field in err, err


def test_a_pairs_file_without_its_columns_is_refused(world, tmp_path, capsys):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("clip,caption\nkitchen.mp4,A\n")
    status, _, err = _main(capsys, "search", world.model, world.videos, "--mode", "clips", "--pairs", pairs)
    assert status == 2 and f"{pairs}, line 1: missing column(s) video, text" in err


@pytest.mark.parametrize("clips, paired, refusal", [
    (["broken.mp4"], "broken.mp4", "none of its 1 clips could be read; the first unreadable: "),
    (["broken.mp4", "kitchen.mp4"], "broken.mp4", "none of the clips its pairs name could be read (1 unreadable), "
                                                  "so Recall@K has no query"),
])
def test_pairs_with_no_readable_clip_are_one_line_not_nan(world, tmp_path, capsys, clips, paired, refusal):
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in clips:
        shutil.copy(world.root / "junk" / "broken.mp4" if name == "broken.mp4" else world.kitchen, folder / name)
    pairs = _pairs(tmp_path / "pairs.csv", f"{folder / paired},A\n")
    status, out, err = _main(capsys, "search", world.model, folder, "--mode", "clips", "--pairs", pairs)
    last = err.splitlines()[-1]  # after the progress bar
    assert status == 2 and last.startswith("svitt-ego: error: ") and refusal in last and "nan" not in out, err


def test_names_with_escape_sequences_print_escaped(world, tmp_path, capsys):
    video = shutil.copy(world.kitchen, tmp_path / "\x1b]0;x\x07\x1b[2J.mp4")
    status, out, _ = _main(capsys, "search", world.model, video, "drawer", "--top-k", "1", "--cache", tmp_path / "c")
    assert status == 0 and "\x1b" not in out and "\x07" not in out
    assert f"extracted {tmp_path}/\\x1b]0;x\\x07\\x1b[2J.mp4 into" in out
    assert _table(out)[2].split()[1] == "\\x1b]0;x\\x07\\x1b[2J.mp4"

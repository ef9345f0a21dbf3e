"""The toy EK-100 MIR and Charades-Ego analogues: real layouts the readers accept, determinism, sizes."""

from __future__ import annotations

import numpy as np
import pytest

from svitt_ego.eval.charades_ego import read_charades_annotations
from svitt_ego.data import toy_benchmarks
from svitt_ego.eval.epic_mir import RELEVANCY_PKL, load_relevancy, read_mir_annotations


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    toy_benchmarks.make_toy_benchmarks(root, seed=0, num_videos=40)
    return root


def test_the_readers_accept_the_analogues(root):
    mir = read_mir_annotations(root / "epic_mir")
    relevancy = load_relevancy(root / "epic_mir" / RELEVANCY_PKL, (len(mir.clips), len(mir.columns)))
    assert (relevancy == 1).any(axis=0).all() and (relevancy == 1).any(axis=1).all()
    assert sorted(set(np.unique(relevancy))) == [0.0, 0.5, 1.0]
    assert len(set(mir.texts)) == len(mir.columns)  # one column per distinct narration
    for clip in mir.clips:
        assert (root / "epic_mir" / "videos" / clip.participant_id / f"{clip.video_id}.MP4").is_file()
    charades = read_charades_annotations(root / "charades_ego")
    labels = charades.labels()
    assert labels.any(axis=0).all() and labels.any(axis=1).all()  # every class shown, every video labelled
    assert len(charades.videos) == toy_benchmarks.benchmark_sizes(40)[1] == 6
    assert all((root / "charades_ego" / "videos" / f"{v.video_id}.mp4").is_file() for v in charades.videos)


def test_same_seed_same_files(root, tmp_path):
    toy_benchmarks.make_toy_benchmarks(tmp_path, seed=0, num_videos=40)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert all((root / p).read_bytes() == (tmp_path / p).read_bytes() for p in files)


def test_complete_analogues_are_not_regenerated(root):
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    toy_benchmarks.make_toy_benchmarks(root, seed=0, num_videos=40)
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}

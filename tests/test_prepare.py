"""prepare-videos: resize, chunk, resume, and carry on past a corrupt input."""

from __future__ import annotations

import json
import math
import os
import re
from fractions import Fraction

import numpy as np
import pytest
from helpers import HEIGHT, WIDTH, corrupt_concealed, draw_code, read_code, write_video

av = pytest.importorskip("av")  # prepare-videos writes videos with PyAV

from svitt_ego.data import prepare  # noqa: E402
from svitt_ego.data.prepare import MANIFEST, output_size, prepare_videos  # noqa: E402
from svitt_ego.data.video import read_frames  # noqa: E402


def upscaled_code(index: int) -> np.ndarray:
    """draw_code at twice the size, so that halving it gives back the test frame size."""
    return draw_code(index, 0).repeat(2, axis=0).repeat(2, axis=1)


@pytest.fixture
def sources(tmp_path):
    src = tmp_path / "src"
    write_video(src / "a.mp4", [upscaled_code(i) for i in range(150)], Fraction(30), gop=250)
    write_video(src / "b.mp4", [upscaled_code(i) for i in range(40)], Fraction(30000, 1001))
    (src / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    return src


def test_output_size_keeps_aspect_with_even_sides():
    assert output_size(1920, 1080, 256) == (456, 256)
    assert output_size(1080, 1920, 256) == (256, 456)
    assert output_size(1440, 1080, 256) == (342, 256)
    assert output_size(128, 96, 48) == (64, 48)


def test_prepare_resizes_chunks_resumes_and_reports_failures(sources, tmp_path, capsys):
    dst = tmp_path / "dst"
    summary = prepare_videos(sources, dst, short_side=HEIGHT, chunk_seconds=2.0, workers=2)
    assert (summary.done, summary.skipped) == (2, 0)
    assert [path.split("/")[-1] for path, _ in summary.failed] == ["broken.mp4"]
    assert "broken.mp4" in capsys.readouterr().out

    assert sorted(p.name for p in (dst / "a").glob("*.mp4")) == ["0.mp4", "1.mp4", "2.mp4"]
    assert json.loads((dst / "a" / MANIFEST).read_text())["chunks"] == [0, 1, 2]
    assert not list(dst.glob("*/.*.part"))
    with av.open(str(dst / "a" / "1.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height, stream.average_rate, stream.frames) == (WIDTH, HEIGHT, 30, 60)
    with av.open(str(dst / "b" / "0.mp4")) as container:
        assert container.streams.video[0].average_rate == Fraction(30000, 1001)

    # Frame j of chunk k shows source frame k * 60 + j, so reading at t gives floor(t * 30).
    times = np.array([0.0, 1.99, 2.0, 2.5, 4.1, 4.95])
    frames = read_frames(dst, "a", times, chunk_seconds=2.0)
    assert [read_code(f.numpy())[0] for f in frames] == [math.floor(t * 30 + 1e-6) for t in times]

    mtimes = {p: p.stat().st_mtime_ns for p in dst.rglob("*.mp4")}
    again = prepare_videos(sources, dst, short_side=HEIGHT, chunk_seconds=2.0, workers=1)
    assert (again.done, again.skipped, len(again.failed)) == (0, 2, 1)
    assert {p: p.stat().st_mtime_ns for p in dst.rglob("*.mp4")} == mtimes


def test_incomplete_video_is_redone(sources, tmp_path):
    dst = tmp_path / "dst"
    prepare_videos(sources, dst, short_side=HEIGHT, chunk_seconds=2.0, workers=1)
    (dst / "a" / "2.mp4").unlink()
    summary = prepare_videos(sources, dst, short_side=HEIGHT, chunk_seconds=2.0, workers=1)
    assert (summary.done, summary.skipped) == (1, 1)
    assert (dst / "a" / "2.mp4").is_file()


def test_a_source_name_that_is_not_a_video_id_writes_nothing_outside_dst(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out" / "dst"
    frames = [upscaled_code(i) for i in range(30)]
    for name in ("...mp4", "..mp4", "-x.mp4", "ok.mp4"):
        write_video(src / name, frames, Fraction(30))
    summary = prepare_videos(src, dst, short_side=HEIGHT, chunk_seconds=2.0, workers=1)
    assert summary.done == 1
    assert sorted(path.split("/")[-1] for path, _ in summary.failed) == ["-x.mp4", "...mp4", "..mp4"]
    assert all("is not a video id" in error for _, error in summary.failed)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "out").rglob("*")) == [
        "out/dst", "out/dst/ok", "out/dst/ok/0.mp4", f"out/dst/ok/{MANIFEST}"]


def test_truncated_source_fails_and_leaves_no_chunks(tmp_path):
    """A cut download with its index at the front opens and decodes without an error, short of
    the duration its container declares."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    path = write_video(src / "cut.mp4", [upscaled_code(i) for i in range(150)], Fraction(30), faststart=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    summary = prepare_videos(src, dst, short_side=HEIGHT, chunk_seconds=2.0, workers=1)
    assert summary.done == 0 and len(summary.failed) == 1
    assert re.search(r"decoded \d\.\d\d s of the 5\.00 s the container declares", summary.failed[0][1])
    assert list((dst / "cut").iterdir()) == []


def test_source_with_concealed_damage_fails(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    path = write_video(src / "damaged.mp4", [upscaled_code(i) for i in range(90)], Fraction(30))
    corrupt_concealed(path)
    summary = prepare_videos(src, dst, short_side=HEIGHT, chunk_seconds=2.0, workers=1)
    assert summary.done == 0 and len(summary.failed) == 1
    assert re.search(r"the decoder reports \d+ corrupt frame\(s\), the first at \d+\.\d\d s", summary.failed[0][1])
    assert list((dst / "damaged").iterdir()) == []


def _killed_after_first_chunk(source, out_dir, short_side: int, chunk_seconds: float) -> None:
    """Run prepare_video in a child process that dies (no cleanup runs) once a chunk is written."""
    pid = os.fork()
    if pid == 0:
        try:
            original = prepare._ChunkWriter.close
            prepare._ChunkWriter.close = lambda self: (original(self), os._exit(0))
            prepare.prepare_video(source, out_dir, short_side, chunk_seconds)
        finally:
            os._exit(1)
    os.waitpid(pid, 0)


def _heights(folder) -> list[int]:
    heights = []
    for path in sorted(folder.glob("*.mp4")):
        with av.open(str(path)) as container:
            heights.append(container.streams.video[0].height)
    return heights


def test_a_killed_re_prepare_is_redone_never_mixed(sources, tmp_path):
    dst = tmp_path / "dst"
    src = tmp_path / "one"
    src.mkdir()
    (src / "a.mp4").symlink_to(sources / "a.mp4")
    assert prepare_videos(src, dst, short_side=HEIGHT, chunk_seconds=2.0, workers=1).done == 1
    _killed_after_first_chunk(src / "a.mp4", dst / "a", HEIGHT // 2, 2.0)
    assert _heights(dst / "a") == [HEIGHT // 2, HEIGHT, HEIGHT]  # the kill left old and new chunks
    summary = prepare_videos(src, dst, short_side=HEIGHT, chunk_seconds=2.0, workers=1)
    assert (summary.done, summary.skipped) == (1, 0)
    assert _heights(dst / "a") == [HEIGHT] * 3


def test_a_chunk_of_another_size_or_left_from_other_settings_is_not_done(sources, tmp_path):
    dst = tmp_path / "dst"
    prepare_videos(sources, dst, short_side=HEIGHT, chunk_seconds=2.0, workers=1)
    (dst / "a" / "1.mp4").write_bytes((dst / "a" / "1.mp4").read_bytes()[:-10])
    assert prepare_videos(sources, dst, short_side=HEIGHT, chunk_seconds=2.0, workers=1).done == 1
    prepare_videos(sources, dst, short_side=HEIGHT, chunk_seconds=10.0, workers=1)
    assert sorted(p.name for p in (dst / "a").glob("*.mp4")) == ["0.mp4"]  # 1.mp4 and 2.mp4 were stale


def test_a_source_that_is_not_a_regular_file_fails_without_opening_it(sources, tmp_path):
    os.mkfifo(sources / "fifo.mp4")
    summary = prepare_videos(sources, tmp_path / "dst", short_side=HEIGHT, chunk_seconds=2.0, workers=1)
    assert summary.done == 2
    assert [(path.split("/")[-1], error) for path, error in summary.failed if "fifo" in path] == [
        ("fifo.mp4", "not a regular file")]

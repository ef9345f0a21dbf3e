"""Every failure of bad input or a full disk is one line and exit 2, never a traceback: the writers'
own errors (safetensors, lmdb, Arrow), CSV headers past the csv module's field limit, numbers too
large for a float, crafted relevancy files (codecs, huge shapes), matrices larger than memory,
decompression bombs among the frames, and clip retrieval with nothing readable. Headers are crafted
(no file here is large)."""

from __future__ import annotations

import errno
import json
import pickle
import struct
import zlib
from fractions import Fraction
from pathlib import Path

import lmdb
import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers import SMALL_MODEL, draw_code, write_video
from PIL import Image
from safetensors import SafetensorError

from svitt_ego.eval import epic_mir
from svitt_ego.atomic import WriteError, atomic_write
from svitt_ego.eval.charades_ego import read_charades_annotations
from svitt_ego.cli import main
from svitt_ego.config import load_config
from svitt_ego.data.errors import MetadataError
from svitt_ego.data.toy_benchmarks import make_toy_benchmarks
from svitt_ego.data.video import VideoReadError
from svitt_ego.eval.epic_mir import ClipReader, MIRClip, load_relevancy, read_mir_annotations
from svitt_ego.models import SViTTEgo, create_model
from svitt_ego.nlq.annotations import NLQFormatError, read_nlq


def _main(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    status = main(list(map(str, argv)))
    return status, capsys.readouterr().err


def _one_line(status: int, err: str) -> str:
    """The error line (after any progress bar), checked to be the command's one line with exit 2."""
    last = err.splitlines()[-1] if err else ""
    assert status == 2 and last.startswith("svitt-ego: error: ") and "Traceback" not in err, err
    return last


# --------------------------------------------------------------------------- a full disk, whatever the writer


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"), RuntimeError("PytorchStreamWriter failed writing file"),
    SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
    lmdb.Error("mdb_put: MDB_MAP_FULL: Environment mapsize limit reached"), pa.ArrowIOError("No space left"),
], ids=type)
def test_every_writers_failure_is_a_write_error_and_leaves_nothing(tmp_path, failure):
    def write(tmp: Path):
        tmp.write_bytes(b"half")
        raise failure

    with pytest.raises(WriteError, match=rf"{tmp_path / 'out.bin'}: could not write \(.+\)") as err:
        atomic_write(tmp_path / "out.bin", write)
    assert err.value.__cause__ is failure and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_is_not_a_write_error(tmp_path):
    def write(tmp: Path):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "out.bin", write)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def model_and_video(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk")
    torch.manual_seed(0)
    create_model(load_config("tiny", SMALL_MODEL).model, load_pretrained=False).save_pretrained(root / "model")
    write_video(root / "a.mp4", [draw_code(j, 0) for j in range(20)], Fraction(10))
    return root


@pytest.mark.parametrize("command", ["extract-features", "search"])
def test_a_full_disk_while_writing_features_is_one_line(model_and_video, tmp_path, monkeypatch, capsys, command):
    import safetensors.torch

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    root = model_and_video
    argv = ([command, root / "model", root / "a.mp4", "--output", tmp_path / "f"] if command == "extract-features"
            else [command, root / "model", root / "a.mp4", "drawer", "--cache", tmp_path / "c"])
    assert "StorageFull" in _one_line(*_main(capsys, *argv))


def test_a_full_disk_while_exporting_to_lmdb_is_one_line(tmp_path, monkeypatch, capsys):
    from test_nlq_model import _feature_folder

    def full(*args, **kwargs):
        raise lmdb.Error("mdb_env_open: No space left on device")

    annotations = _feature_folder(tmp_path / "features")
    monkeypatch.setattr(lmdb, "open", full)
    line = _one_line(*_main(capsys, "export-nlq-features", tmp_path / "features", "--to", "groundnlq",
                            tmp_path / "out", "--annotations", annotations))
    assert "data.mdb: could not write (mdb_env_open: No space left on device)" in line


# --------------------------------------------------------------------------- CSV, JSON and numbers


def test_a_csv_header_field_over_the_csv_modules_limit_is_one_line(tmp_path):
    (tmp_path / epic_mir.TEST_CSV).write_text('"' + "h" * 200_000 + '",narration_id\n')
    with pytest.raises(MetadataError, match=rf"{epic_mir.TEST_CSV}, line 1: not valid CSV: field larger"):
        read_mir_annotations(tmp_path)
    (tmp_path / "Charades_v1_classes.txt").write_text("c000 Holding a bag\n")
    (tmp_path / "CharadesEgo_v1_test_only1st.csv").write_text('id,"' + "h" * 200_000 + '"\n')
    with pytest.raises(MetadataError, match=r"line 1: not valid CSV: field larger") as err:
        read_charades_annotations(tmp_path)
    assert len(str(err.value)) < 600


def test_a_400_digit_integer_in_predicted_times_is_one_line(tmp_path, capsys):
    annotations = {"videos": [{"video_uid": "v1", "clips": [{"clip_uid": "c1", "video_start_sec": 0.0,
                                                             "video_end_sec": 9.0, "annotations": [{
        "annotation_uid": "a1", "language_queries": [{"query": "where?", "clip_start_sec": 1, "clip_end_sec": 2}]}]}]}]}
    (tmp_path / "nlq.json").write_text(json.dumps(annotations))
    (tmp_path / "sub.json").write_text('{"results": [{"clip_uid": "c1", "annotation_uid": "a1", "query_idx": 0, '
                                       '"predicted_times": [[0, 1' + "0" * 400 + ']]}]}')
    line = _one_line(*_main(capsys, "eval-nlq", tmp_path / "sub.json", "--annotations", tmp_path / "nlq.json"))
    assert "predicted_times[0] must be [start, end]" in line and len(line) < 600
    annotations["videos"][0]["clips"][0]["video_end_sec"] = 10**400
    (tmp_path / "nlq.json").write_text(json.dumps(annotations))
    with pytest.raises(NLQFormatError, match="field 'video_end_sec' must be a finite number"):
        read_nlq(tmp_path / "nlq.json")


# --------------------------------------------------------------------------- relevancy files


class _Calls:
    """Pickles as a call of ``function(*args)``, as a crafted file would."""

    def __init__(self, function, *args):
        self.call = function, args

    def __reduce__(self):
        return self.call


@pytest.mark.parametrize("codec", ["rot13", "zlib_codec", "no-such-codec"])
def test_a_relevancy_pickle_naming_another_codec_is_refused(tmp_path, codec):
    import codecs

    path = tmp_path / "relevancy.pkl"
    path.write_bytes(pickle.dumps(_Calls(codecs.encode, "x", codec), protocol=2))
    with pytest.raises(MetadataError, match=rf"refusing the codec '{codec}'"):
        load_relevancy(path)


def test_a_small_pickle_asking_for_a_huge_array_is_refused_before_allocating(tmp_path):
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    path = tmp_path / "relevancy.pkl"
    path.write_bytes(pickle.dumps(_Calls(reconstruct, np.ndarray, (10**6, 10**6), b"b"), protocol=4))
    assert path.stat().st_size < 120
    with pytest.raises(MetadataError, match=r"not a relevancy matrix: .*not one of shape \(1000000, 1000000\)"):
        load_relevancy(path)


def test_an_npy_header_is_checked_against_the_csvs_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "relevancy.npy"
    with path.open("wb") as file:  # the header of a 23170 x 23170 float64 matrix (4.3 GB), and no data
        np.lib.format.write_array_header_1_0(file, {"descr": "<f8", "fortran_order": False, "shape": (23170, 23170)})
    with pytest.raises(MetadataError, match=r"not a relevancy matrix"):
        load_relevancy(path, (3, 3))
    with path.open("ab") as file:  # the data is there (a sparse file): the header is checked first, nothing read
        file.truncate(path.stat().st_size + 23170 * 23170 * 8)
    monkeypatch.setattr(np.lib.format, "read_array", None)  # reading it whole (4.3 GB) would fail here
    with pytest.raises(MetadataError, match=r"is 23170 x 23170 but the annotations have 3 clips x 3 sentences"):
        load_relevancy(path, (3, 3))


def test_a_relevancy_matrix_larger_than_memory_is_refused_saying_what_it_needs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(epic_mir, "physical_memory", lambda: 128 * 2**30)
    with pytest.raises(MetadataError, match=r"of 200000 clips x 200000 sentences needs about 1192\.1 GiB of memory "
                                            r"to build, more than this machine's 128\.0 GiB"):
        epic_mir.check_relevancy_fits(200_000, 200_000)
    epic_mir.check_relevancy_fits(1000, 1000)  # 32 MB
    toy = tmp_path / "toy"
    make_toy_benchmarks(toy, seed=0, num_videos=2)
    monkeypatch.setattr(epic_mir, "physical_memory", lambda: 1000)
    line = _one_line(*_main(capsys, "epic-mir-relevancy", "--annotations", toy / "epic_mir",
                            "--output", tmp_path / "r.npy"))
    assert "sentences needs about 0.0 GiB of memory to build, more than this machine's 0.0 GiB" in line
    assert not (tmp_path / "r.npy").exists()


# --------------------------------------------------------------------------- images


def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG that claims ``width`` x ``height`` pixels and holds none."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))


def test_a_decompression_bomb_frame_is_a_video_read_error(tmp_path):
    (tmp_path / "P01_01").mkdir()
    for i in range(1, 4):
        Image.fromarray(draw_code(i, 0)).save(tmp_path / "P01_01" / f"frame_{i:010d}.jpg")
    _png_header(tmp_path / "P01_01" / "frame_0000000002.jpg", 14000, 14000)
    clip = MIRClip("P01_01_0", "P01", "P01_01", 0, 1, 1, 3, "x", 0, (0,))
    with pytest.raises(VideoReadError, match=r"frame_0000000002.jpg: cannot decode: .*decompression bomb"):
        ClipReader(tmp_path, "frames", 2)(clip)
    Image.new("RGB", (40, 30)).save(tmp_path / "P01_01" / "frame_0000000002.jpg", format="PNG")  # another size
    with pytest.raises(VideoReadError, match=r"the frames of clip P01_01_0 differ in size"):
        ClipReader(tmp_path, "frames", 2)(clip)


def test_a_bomb_frame_under_on_error_skip_is_skipped_and_counted(tmp_path, capsys):
    root = tmp_path / "toy"
    make_toy_benchmarks(root, seed=0, num_videos=2)
    mir = read_mir_annotations(root / "epic_mir")
    frames = tmp_path / "frames"
    for clip in mir.clips:
        (frames / clip.video_id).mkdir(parents=True, exist_ok=True)
        for i in range(clip.start_frame, clip.stop_frame + 1):
            Image.fromarray(draw_code(i % 100, 0)).save(frames / clip.video_id / f"frame_{i:010d}.jpg")
    bomb = mir.clips[0]
    for i in range(bomb.start_frame, bomb.stop_frame + 1):
        _png_header(frames / bomb.video_id / f"frame_{i:010d}.jpg", 14000, 14000)
    SViTTEgo(load_config("tiny", [*SMALL_MODEL, "model.vision.image_size=32"]).model).save_pretrained(tmp_path / "m")
    args = ["eval-epic-mir", tmp_path / "m", "--annotations", root / "epic_mir", "--frames-root", frames,
            "--workers", "0"]
    assert "decompression bomb" in _one_line(*_main(capsys, *args))
    assert main(list(map(str, [*args, "--on-error", "skip", "--output", tmp_path / "mir.json"]))) == 1
    result = json.loads((tmp_path / "mir.json").read_text())
    assert result["skipped_clips"] == len(result["skipped"]) == sum(map(_fails(ClipReader(frames, "frames", 4)),
                                                                        mir.clips)) >= 1


def _fails(read):
    def fails(clip) -> bool:
        try:
            read(clip)
        except VideoReadError:
            return True
        return False
    return fails

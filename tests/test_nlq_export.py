import io
import json

import lmdb
import numpy as np
import pytest

from svitt_ego.cli import main
from svitt_ego.nlq.annotations import NLQFormatError
from svitt_ego.nlq.export import export_groundnlq
from svitt_ego.nlq.features import NLQFeatures
from test_nlq_model import _feature_folder


def _read(folder, key):
    """As GroundNLQ's ego4d_loader reads a value (but without pickles)."""
    env = lmdb.open(str(folder), readonly=True, create=False, lock=False, readahead=False)
    with env.begin(buffers=True) as txn, io.BytesIO(txn.get(key.encode())) as reader:
        arrays = dict(np.load(reader, allow_pickle=False))
    env.close()
    return arrays


def test_round_trip_as_groundnlq_reads_it(tmp_path):
    annotations = _feature_folder(tmp_path / "features", windows=600)
    config = export_groundnlq(tmp_path / "features", [annotations], tmp_path / "out")
    assert config == {"input_vid_dim": 8, "input_txt_dim": 8, "feat_stride": 4, "num_frames": 4,
                      "default_fps": 10.0, "max_seq_len": 1024}
    video = _read(tmp_path / "out" / "video_features", "c3")["features"]
    assert video.dtype == np.float32
    np.testing.assert_array_equal(video, NLQFeatures(tmp_path / "features").video("c3").float().numpy())
    text = _read(tmp_path / "out" / "text_features", "a3_1")["token_features"]
    assert text.dtype == np.float32 and text.shape == (2, 8)
    lines = [json.loads(line) for line in (tmp_path / "out" / "nlq.jsonl").read_text().splitlines()]
    assert len(lines) == 12
    assert lines[1] == {"query_id": "a0_1", "video_id": "c0", "duration": 240.0, "query": "q01", "query_type": "nlq",
                        "timestamps": [[pytest.approx(4.8), 8.0]]}
    assert "max_seq_len: 1024," in (tmp_path / "out" / "groundnlq_dataset.yaml").read_text()


def test_mixed_frame_rates_and_shared_annotation_ids_are_refused(tmp_path, capsys):
    annotations = _feature_folder(tmp_path / "features")
    manifest = json.loads((tmp_path / "features" / "manifest.json").read_text())
    manifest["videos"]["c2"]["fps"] = 30.0
    (tmp_path / "features" / "manifest.json").write_text(json.dumps(manifest))
    assert main(["export-nlq-features", str(tmp_path / "features"), "--to", "groundnlq", str(tmp_path / "out"),
                 "--annotations", str(annotations)]) == 2
    err = capsys.readouterr().err
    assert "c0 10 fps" in err and "c2 30 fps" in err and "--fps" in err
    data = json.loads(annotations.read_text())
    data["videos"][1]["clips"][0]["annotations"][0]["annotation_uid"] = "a0"
    (tmp_path / "shared.json").write_text(json.dumps(data))
    with pytest.raises(NLQFormatError, match="annotation_uid a0 is under clip c0 .* and clip c1"):
        export_groundnlq(tmp_path / "features", [tmp_path / "shared.json"], tmp_path / "out")


def _export(capsys, features, out, *annotations):
    capsys.readouterr()
    status = main(["export-nlq-features", str(features), "--to", "groundnlq", str(out),
                   "--annotations", *map(str, annotations)])
    return status, capsys.readouterr().err


def test_an_export_replaces_an_earlier_one_whole_and_never_mixes_with_other_files(tmp_path, capsys):
    annotations = _feature_folder(tmp_path / "features")
    other = tmp_path / "other" / "nlq.json"
    other.parent.mkdir()
    data = json.loads(annotations.read_text())
    data["videos"] = data["videos"][:1]
    other.write_text(json.dumps(data))
    status, err = _export(capsys, tmp_path / "features", tmp_path / "out", annotations, other)
    assert status == 2 and err.count("\n") == 1
    assert f"{annotations} and {other} would both be written as nlq.jsonl" in err
    assert not (tmp_path / "out").exists()

    subset = tmp_path / "nlq_val.json"
    subset.write_text(json.dumps(data))
    assert _export(capsys, tmp_path / "features", tmp_path / "out", annotations, subset)[0] == 0
    assert _export(capsys, tmp_path / "features", tmp_path / "out", subset)[0] == 0  # a subset, into the same folder
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == [
        "groundnlq_dataset.yaml", "nlq_val.jsonl", "text_features", "video_features"]
    env = lmdb.open(str(tmp_path / "out" / "text_features" / "data.mdb"), subdir=False, readonly=True, lock=False)
    assert env.stat()["entries"] == 2  # the subset's queries only
    env.close()

    mine = tmp_path / "mine"
    (mine / "video_features").mkdir(parents=True)
    (mine / "video_features" / "data.mdb").write_bytes(b"a user's database")
    status, err = _export(capsys, tmp_path / "features", mine, subset)
    assert status == 2 and f"{mine} exists and was not made by svitt-ego export-nlq-features" in err
    assert (mine / "video_features" / "data.mdb").read_bytes() == b"a user's database" and not (mine / ".lock").exists()

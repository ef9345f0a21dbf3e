"""video-uids: the Ego4D videos annotation files refer to; prepare-videos --uids; data.exclude_videos."""

from __future__ import annotations

import json
import logging
from fractions import Fraction

import pandas as pd
import pytest
from helpers import draw_code, mcq_question, write_egomcq, write_video

pytest.importorskip("av")  # prepare-videos writes videos with PyAV

from svitt_ego.cli import main  # noqa: E402
from svitt_ego.config import load_config  # noqa: E402
from svitt_ego.data.dataset import EgoClipDataset  # noqa: E402
from svitt_ego.data.errors import MetadataError  # noqa: E402
from svitt_ego.data.prepare import prepare_videos  # noqa: E402
from svitt_ego.data.toy import make_toy_data, toy_data_overrides  # noqa: E402
from svitt_ego.data.video_uids import collect_videos, read_uid_list, read_videos, warn_shared_eval_videos  # noqa: E402

EGOCLIP_HEADER = ("clip_idx\tvideo_uid\tvideo_dur\tnarration_source\tnarration_ind\tnarration_time\tclip_start\t"
                  "clip_end\tclip_text\ttag_verb\ttag_noun\n")


def egoclip_row(i: int, uid: str, duration: float) -> str:
    return f"{i}\t{uid}\t{duration}\tnarration_pass_1\t{i}\t1.5\t1.0\t2.0\t#C C picks a cup\t[1]\t[2]\n"


def episodic(videos: dict[str, list[dict]]) -> dict:
    """An Ego4D episodic-memory file: each video with one clip holding the given annotations."""
    return {"version": "v2", "videos": [{"video_uid": uid, "split": "train", "clips": [
        {"clip_uid": f"clip-{uid}", "video_start_sec": 0.0, "video_end_sec": 60.0, "annotations": annotations}]}
        for uid, annotations in videos.items()]}


NLQ_ANNOTATION = {"annotation_uid": "a", "language_queries": [{"query": "where is the cup?"}]}
MQ_ANNOTATION = {"annotator_uid": "a", "labels": [{"label": "cut_dough", "start_time": 1.0, "end_time": 3.0}]}
VQ_ANNOTATION = {"annotation_uid": "a", "query_sets": {"1": {"is_valid": True, "object_title": "cup"}}}


@pytest.fixture
def files(tmp_path):
    paths = {"egoclip": tmp_path / "egoclip.csv", "egomcq": tmp_path / "egomcq.json",
             "nlq": tmp_path / "nlq_val.json", "mq": tmp_path / "moments_val.json", "vq": tmp_path / "vq_val.json"}
    paths["egoclip"].write_text(EGOCLIP_HEADER + egoclip_row(0, "e1", 600.0) + egoclip_row(1, "e1", 600.0)
                                + egoclip_row(2, "e2", 1200.0))
    write_egomcq(paths["egomcq"], {"0": mcq_question()})  # videos v1 (query and odd choices), v2
    paths["nlq"].write_text(json.dumps(episodic({"n1": [NLQ_ANNOTATION], "v1": [NLQ_ANNOTATION]})))
    paths["mq"].write_text(json.dumps(episodic({"m1": [MQ_ANNOTATION], "n1": []})))
    paths["vq"].write_text(json.dumps(episodic({"q1": [VQ_ANNOTATION]})))
    return paths


def test_each_kind_of_file_is_recognised_with_its_videos(files):
    assert read_videos(files["egoclip"]) == ("EgoClip", {"e1": 600.0, "e2": 1200.0})
    assert read_videos(files["egomcq"]) == ("EgoMCQ", {"v1": None, "v2": None})
    assert read_videos(files["nlq"]) == ("NLQ", {"n1": None, "v1": None})
    assert read_videos(files["mq"]) == ("MQ", {"m1": None, "n1": None})
    assert read_videos(files["vq"]) == ("VQ", {"q1": None})


def test_the_command_lists_each_video_once_less_the_excluded(files, tmp_path, capsys):
    assert main(["video-uids", *map(str, files.values()), "--exclude", str(files["egomcq"])]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["e1", "e2", "m1", "n1", "q1"]  # v1, v2 are EgoMCQ's; n1 is in NLQ and MQ
    assert "5 videos from" in err and f"{files['mq']} (MQ)" in err and "0.5 hours in the 2" in err
    listing = tmp_path / "uids.txt"
    assert main(["video-uids", str(files["nlq"]), "--exclude", str(files["egomcq"]), "--output", str(listing)]) == 0
    assert read_uid_list(listing) == ["n1"]
    assert collect_videos([files["mq"]], [listing]).uids == ["m1"]  # a .txt uid list excludes too


def test_the_list_never_replaces_an_annotation_file(files, tmp_path, capsys):
    saved = files["nlq"].read_bytes()
    assert main(["video-uids", str(files["nlq"]), "--output", str(files["nlq"])]) == 2
    assert f"{files['nlq']} is also an input of this command" in capsys.readouterr().err
    assert files["nlq"].read_bytes() == saved


@pytest.mark.parametrize("content, message", [
    ('{"videos": [{"video_uid": "x", "clips": [{"annotations": [{"something": 1}]}]}]}', "cannot tell NLQ, MQ"),
    ('[1, 2]', "not an EgoClip, EgoMCQ, NLQ, MQ or VQ file"),
    ('{"videos": [{"video_uid": "../etc", "clips": [{"annotations": [{"labels": []}]}]}]}',
     "videos[0], field 'video_uid': '../etc' is not an id"),
    ('{"videos": [{"video_uid": "x", "clips": [{"annotations": [{"labels": []}, {"query_sets": {}}]}]}]}',
     "several benchmarks in one file (MQ, VQ)"),
])
def test_an_unknown_or_malformed_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "annotations.json"
    path.write_text(content)
    assert main(["video-uids", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and message in err


def test_a_uid_list_names_its_bad_line(tmp_path):
    path = tmp_path / "uids.txt"
    path.write_text("# wanted\nabc-1\n\n../x\n")
    with pytest.raises(MetadataError, match=r"uids.txt, line 4: '../x' is not an id"):
        read_uid_list(path)
    path.write_text("# nothing\n")
    with pytest.raises(MetadataError, match="empty"):
        read_uid_list(path)


def test_prepare_videos_takes_only_the_listed_uids(tmp_path, capsys):
    src = tmp_path / "src"
    for uid in ("a", "b"):
        write_video(src / f"{uid}.mp4", [draw_code(i, 0) for i in range(10)], Fraction(10))
    summary = prepare_videos(src, tmp_path / "dst", short_side=32, workers=1, uids=["b", "missing", "b"])
    assert summary.done == 1 and [p.split("/")[-1] for p, _ in summary.failed] == ["missing.mp4"]
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["b"]
    assert "1 converted, 0 already done, 1 failed, of 2 videos" in capsys.readouterr().out


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("toy") / "toy", seed=0, num_videos=10)


def test_exclude_videos_drops_the_rows_of_evaluation_videos(toy, tmp_path, caplog):
    table = pd.read_csv(toy / "egoclip.csv", sep="\t")
    nlq = json.loads((toy / "nlq_train.json").read_text())  # the toy world's NLQ videos are its EgoClip videos
    nlq["videos"] = nlq["videos"][:2]  # as if two of them were held out for NLQ evaluation
    held_out = tmp_path / "nlq_held_out.json"
    held_out.write_text(json.dumps(nlq))
    nlq_videos = {v["video_uid"] for v in nlq["videos"]}
    shared = table.video_uid.isin(nlq_videos)
    assert 0 < shared.sum() < len(table)
    cfg = load_config("tiny", [*toy_data_overrides(toy), f"data.exclude_videos=[{held_out}]"])
    with caplog.at_level(logging.INFO, logger="svitt_ego.data.video_uids"):
        dataset = EgoClipDataset(cfg, train=True)
    assert len(dataset) == (~shared).sum() and not set(dataset.table.video_uid) & nlq_videos
    assert f"dropped {shared.sum()} EgoClip rows of 2 videos ({held_out})" in caplog.text


def test_pretraining_warns_when_its_egomcq_shares_training_videos(toy, tmp_path, caplog):
    table = pd.read_csv(toy / "egoclip.csv", sep="\t")
    question = mcq_question()
    question["query"]["video_uid"] = table.video_uid[0]
    egomcq = write_egomcq(tmp_path / "egomcq.json", {"0": question})  # also v1 and v2, which EgoClip lacks
    with caplog.at_level(logging.WARNING, logger="svitt_ego.data.video_uids"):
        assert warn_shared_eval_videos(table, egomcq, exclude=[]) == 1
    assert f"{egomcq} shares 1 videos with the pretraining rows ({(table.video_uid == table.video_uid[0]).sum()} rows)" \
        in caplog.text
    assert warn_shared_eval_videos(table, egomcq, exclude=[str(egomcq)]) == 0
    assert warn_shared_eval_videos(table, toy / "egomcq.json", exclude=[]) == 0  # the toy's own is held out

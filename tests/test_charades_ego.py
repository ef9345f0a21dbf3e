"""Charades-Ego: the reference mAP (hand-worked, EgoVLP's outputs, properties), the readers, the frames
of a whole video and the evaluation command."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SMALL_MODEL, draw_code, read_code, write_video
from hypothesis import given
from hypothesis import strategies as st

from svitt_ego.eval import charades_ego
from svitt_ego.eval.charades_ego import (CharadesVideo, VideoReader, chance_map, charades_ego_map,
                                         read_charades_annotations)
from svitt_ego.cli import main
from svitt_ego.config import load_config
from svitt_ego.data.errors import MetadataError
from svitt_ego.data.toy_benchmarks import make_toy_benchmarks
from svitt_ego.data.transforms import eval_transform
from svitt_ego.models import SViTTEgo

OFFICIAL = json.loads((Path(__file__).parent / "data" / "zero_shot_official.json").read_text())


def test_hand_worked_map_drops_unlabelled_videos():
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.3, 0.9], [0.5, 0.2], [1.0, 1.0]])
    labels = np.array([[0, 1], [1, 0], [1, 1], [0, 0], [0, 0]])  # the last two have no label
    # Class 0 ranks videos 0, 1, 2 (0, 1, 1): (1/2 + 2/3) / 2. Class 1 ranks 2, 1, 0 (1, 0, 1): (1 + 2/3) / 2.
    expected = 100 * ((1 / 2 + 2 / 3) / 2 + (1 + 2 / 3) / 2) / 2
    assert charades_ego_map(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_egovlp_outputs_on_scores_with_ties():
    case = OFFICIAL["charades_ego"]
    labels = np.array(case["labels"])
    assert (~labels.any(axis=1)).sum() == 3  # videos without a label, dropped
    assert charades_ego_map(case["scores"], labels) == pytest.approx(case["mAP"], abs=1e-10)


def test_a_class_without_positives_is_an_error_naming_it():
    labels = np.array([[1, 0, 0], [1, 0, 1]])
    with pytest.raises(ValueError, match=r"1 classes have no positive video: Holding a bag$"):
        charades_ego_map(np.zeros((2, 3)), labels, ["Opening a door", "Holding a bag", "Eating"])
    with pytest.raises(ValueError, match="same shape"):
        charades_ego_map(np.zeros((2, 2)), labels)


def _case(seed: int, videos: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random((videos, classes)) < 0.3).astype(int)
    labels[rng.integers(videos, size=classes), np.arange(classes)] = 1
    return rng.permutation(videos * classes).reshape(videos, classes).astype(float), labels


@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(1, 5))
def test_perfect_scores_give_100_and_order_does_not_matter(seed, videos, classes):
    scores, labels = _case(seed, videos, classes)
    assert charades_ego_map(labels.astype(float), labels) == pytest.approx(100)
    order = np.random.default_rng(seed + 1).permutation(videos)
    assert charades_ego_map(scores[order], labels[order]) == pytest.approx(charades_ego_map(scores, labels))


def test_chance_is_the_mean_over_every_ranking():
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [0, 1]])  # video 3 has no label: dropped
    kept = labels[labels.any(axis=1)]
    every = [charades_ego_map(np.tile(-np.asarray(order, dtype=float)[:, None], (1, 2)), kept)
             for order in itertools.permutations(range(len(kept)))]
    assert chance_map(labels) == pytest.approx(np.mean(every), abs=1e-12)


# --------------------------------------------------------------------------- the annotations

HEADER = "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length"


def _write(folder: Path, rows: list[str], classes: str = "c000 Holding a bag\nc001 Opening a door\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / charades_ego.TEST_CSV).write_text("\n".join([HEADER, *rows]) + "\n")
    (folder / charades_ego.CLASSES_TXT).write_text(classes)
    return folder


def test_annotations_are_read_into_multi_hot_labels(tmp_path):
    folder = _write(tmp_path, ['AB12EGO,S,K,7,7,Yes,s,o,d,"c001 11.90 21.20;c000 0.00 12.60;c001 30 31",33.10',
                               "CD34EGO,S,K,7,7,Yes,s,o,d,,20.5"])
    annotations = read_charades_annotations(folder)
    assert annotations.class_names == ["Holding a bag", "Opening a door"]
    assert annotations.videos == [CharadesVideo("AB12EGO", 33.1, (0, 1), ((1, 11.9, 21.2), (0, 0.0, 12.6), (1, 30.0, 31.0))),
                                  CharadesVideo("CD34EGO", 20.5, ())]
    assert annotations.labels().tolist() == [[1, 1], [0, 0]]


@pytest.mark.parametrize("row, field", [
    ("AB12EGO,S,K,7,7,Yes,s,o,d,c009 1 2,33.1", "actions"),
    ("AB12EGO,S,K,7,7,Yes,s,o,d,c000 1,33.1", "actions"),
    ("AB12EGO,S,K,7,7,Yes,s,o,d,,long", "length"),
    ("AB12EGO,S,K,7,7,Yes,s,o,d,,-3", "length"),
    ("../x,S,K,7,7,Yes,s,o,d,,3", "id"),
])
def test_a_malformed_row_names_file_line_and_field(tmp_path, row, field):
    folder = _write(tmp_path, ["CD34EGO,S,K,7,7,Yes,s,o,d,,20.5", row])
    with pytest.raises(MetadataError) as err:
        read_charades_annotations(folder)
    assert str(err.value).startswith(f"{folder / charades_ego.TEST_CSV}, line 3, field '{field}'")


def test_a_malformed_class_line_is_named(tmp_path):
    folder = _write(tmp_path, [], classes="c000 Holding a bag\nHolding\n")
    with pytest.raises(MetadataError, match=r"Charades_v1_classes.txt, line 2: expected 'cNNN class name'"):
        read_charades_annotations(folder)


def test_one_clip_spreads_over_the_whole_video_at_its_frame_rate(tmp_path):
    fps = Fraction(30000, 1001)
    write_video(tmp_path / "AB12EGO.mp4", [draw_code(i, 0) for i in range(120)], fps)
    frames = VideoReader(tmp_path, 4)(CharadesVideo("AB12EGO", 4.0, ()))
    end = float(fps) * 4.0  # frames 0 .. length x fps, segments as LaViLa rounds them
    seg = (end - 1) / 4
    expected = [int((int(np.round(seg * i)) + min(int(np.round(seg * (i + 1))), end)) // 2) for i in range(4)]
    assert [read_code(f.numpy())[0] for f in frames] == expected == [15, 44, 74, 104]


# --------------------------------------------------------------------------- the evaluation

def test_eval_charades_ego_reinflates_and_scores_the_cosine(tmp_path, capsys):
    make_toy_benchmarks(tmp_path, seed=0, num_videos=6)
    folder = tmp_path / "charades_ego"
    SViTTEgo(load_config("tiny", SMALL_MODEL).model).save_pretrained(tmp_path / "model")  # a 4-frame model
    out = tmp_path / "charades.json"
    assert main(["eval-charades-ego", str(tmp_path / "model"), "--annotations", str(folder), "--videos",
                 str(folder / "videos"), "--workers", "0", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_frames"] == 16 and "Charades-Ego" in capsys.readouterr().out

    model = SViTTEgo.from_pretrained(tmp_path / "model", {"vision": {"num_frames": 16}}).eval()
    annotations = read_charades_annotations(folder)
    reader, transform = VideoReader(folder / "videos", 16), eval_transform(model.config.vision)
    with torch.no_grad():
        videos = torch.cat([model.encode_video(transform(reader(video))[None]) for video in annotations.videos])
        texts = model.encode_text(annotations.class_names)
    expected = charades_ego_map((videos @ texts.T).double().numpy(), annotations.labels(), annotations.class_names)
    assert result["mAP"] == pytest.approx(expected, abs=1e-4)
    assert result["videos"] == len(annotations.videos) and result["classes"] == len(annotations.class_names)

"""EK-100 MIR: the official metric (hand-worked, the official code's outputs, properties), the relevancy
matrix (builder, restricted unpickler), the readers, both frame layouts and the evaluation command."""

from __future__ import annotations

import itertools
import json
import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SMALL_MODEL, draw_code, read_code, write_video
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from svitt_ego.eval import epic_mir
from svitt_ego.cli import main
from svitt_ego.config import load_config
from svitt_ego.data.errors import MetadataError
from svitt_ego.data.toy_benchmarks import make_toy_benchmarks
from svitt_ego.data.transforms import eval_transform
from svitt_ego.data.video import VideoReadError
from svitt_ego.eval.epic_mir import (ClipReader, MIRClip, build_relevancy, chance_scores, epic_mir_scores,
                                     load_relevancy, read_mir_annotations)
from svitt_ego.models import SViTTEgo

OFFICIAL = json.loads((Path(__file__).parent / "data" / "zero_shot_official.json").read_text())

# Rows are videos, columns texts. Graded relevancy: binary AP and the official graded-cumsum AP differ.
SIMILARITY = np.array([[0.9, 0.8, 0.3, 0.1],
                       [0.2, 0.7, 0.6, 0.4],
                       [0.5, 0.1, 0.4, 0.8]])
RELEVANCY = np.array([[1.0, 0.5, 0.0, 1.0],
                      [0.0, 1.0, 0.5, 0.0],
                      [0.5, 0.0, 1.0, 1.0]])


def test_hand_worked_graded_average_precision():
    # V->T. Row 0 ranks columns 0, 1, 2, 3 (relevancy 1, .5, 0, 1): positives at ranks 1 and 4,
    # precisions 1/1 and (1 + .5 + 0 + 1)/4. Row 1: its positive first, 1. Row 2 ranks 3, 0, 2, 1
    # (1, .5, 1, 0): 1/1 and (1 + .5 + 1)/3.
    v2t = [(1 + 2.5 / 4) / 2, 1.0, (1 + 2.5 / 3) / 2]
    # T->V. Column 0 ranks rows 0, 2, 1 (1, .5, 0): 1. Column 1 ranks 0, 1, 2 (.5, 1, 0): (.5 + 1)/2.
    # Column 2 ranks 1, 2, 0 (.5, 1, 0): (.5 + 1)/2. Column 3 ranks 2, 1, 0 (1, 0, 1): 1 and 2/3.
    t2v = [1.0, 0.75, 0.75, (1 + 2 / 3) / 2]
    # Binary AP would count only the positives above: row 0 (1 + 2/4)/2, column 1 1/2, ...
    binary_v2t = [(1 + 2 / 4) / 2, 1.0, (1 + 2 / 3) / 2]
    log3 = np.log2(3)
    ndcg_v2t = [(1 + 0.5 / log3) / (1 + 1 / log3 + 0.5 / 2), 1.0, (1 + 0.5 / log3 + 1 / 2) / (1 + 1 / log3 + 0.5 / 2)]
    scores = epic_mir_scores(SIMILARITY, RELEVANCY)
    assert scores["mAP V->T"] == pytest.approx(100 * np.mean(v2t), abs=1e-12)  # 131/144
    assert scores["mAP T->V"] == pytest.approx(100 * np.mean(t2v), abs=1e-12)  # 5/6
    assert scores["mAP avg"] == pytest.approx(50 * (np.mean(v2t) + np.mean(t2v)), abs=1e-12)
    assert scores["nDCG V->T"] == pytest.approx(100 * np.mean(ndcg_v2t), abs=1e-12)
    assert scores["mAP V->T"] - 100 * np.mean(binary_v2t) == pytest.approx(100 * 7 / 144)  # 131/144 - 124/144


def test_official_outputs_on_a_matrix_with_ties():
    case = OFFICIAL["epic_mir"]
    similarity = np.array(case["similarity"])
    assert len(np.unique(similarity)) < similarity.size / 10  # ties everywhere
    scores = epic_mir_scores(similarity, np.array(case["relevancy"]))
    assert scores == pytest.approx(case["scores"], abs=1e-10)


def _matrices(draw_seed: int, rows: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """A tie-free similarity and a graded relevancy with a 1 in every row and column."""
    rng = np.random.default_rng(draw_seed)
    relevancy = rng.choice([0.0, 0.25, 0.5, 1.0], size=(rows, columns))
    relevancy[np.arange(rows), rng.integers(columns, size=rows)] = 1
    relevancy[rng.integers(rows, size=columns), np.arange(columns)] = 1
    return rng.permutation(rows * columns).reshape(rows, columns) / (rows * columns), relevancy


@given(st.integers(0, 2**32 - 1), st.integers(1, 7), st.integers(1, 7))
def test_a_ranking_by_relevancy_scores_100(seed, rows, columns):
    _, relevancy = _matrices(seed, rows, columns)
    assert all(v == pytest.approx(100) for v in epic_mir_scores(relevancy, relevancy).values())


@given(st.integers(0, 2**32 - 1), st.integers(1, 7), st.integers(1, 7))
def test_permuting_rows_and_columns_together_changes_nothing(seed, rows, columns):
    similarity, relevancy = _matrices(seed, rows, columns)
    rng = np.random.default_rng(seed + 1)
    r, c = rng.permutation(rows), rng.permutation(columns)
    moved = epic_mir_scores(similarity[r][:, c], relevancy[r][:, c])
    assert moved == pytest.approx(epic_mir_scores(similarity, relevancy), abs=1e-9)


def test_chance_is_the_mean_over_every_ranking():
    relevancy = np.array([[1.0, 0.5, 0.0, 1.0], [0.25, 1.0, 1.0, 0.5]])
    totals = []
    for order in itertools.permutations(range(4)):
        similarity = np.tile(-np.asarray(order, dtype=float), (2, 1))  # every row ranks columns by ``order``
        totals.append([epic_mir.mean_average_precision(similarity[i:i + 1], relevancy[i:i + 1]) for i in range(2)]
                      + [epic_mir.normalised_dcg(similarity[i:i + 1], relevancy[i:i + 1]) for i in range(2)])
    exact = 100 * np.mean(totals, axis=0)
    chance = chance_scores(relevancy)
    assert chance["mAP V->T"] == pytest.approx(np.mean(exact[:2]), abs=1e-12)
    assert chance["nDCG V->T"] == pytest.approx(np.mean(exact[2:]), abs=1e-12)


def test_queries_without_a_positive_and_bad_shapes_are_errors():
    relevancy = RELEVANCY.copy()
    relevancy[1, 1] = 0.5  # row 1 and column 1 keep no cell of 1
    with pytest.raises(ValueError, match=r"V->T: 1 queries have no item of relevancy 1 \(indices 1\)"):
        epic_mir_scores(SIMILARITY, relevancy)
    with pytest.raises(ValueError, match="same shape"):
        epic_mir_scores(SIMILARITY, RELEVANCY[:2])
    with pytest.raises(ValueError, match="NaN"):
        epic_mir_scores(SIMILARITY * np.nan, RELEVANCY)


# --------------------------------------------------------------------------- annotations and relevancy

HEADER = ",".join(epic_mir.TEST_COLUMNS)


def _row(nid: str, verb: int, nouns: list[int], narration: str, start="00:00:01.00", stop="00:00:02.50",
         video="P01_01") -> str:
    noun_list = "[" + ", ".join(map(str, nouns)) + "]"
    return (f'{nid},P01,{video},{start},{start},{stop},60,150,{narration},v,{verb},n,{nouns[0]},"[\'n\']",'
            f'"{noun_list}"')


def _write_annotations(folder: Path, rows: list[str], sentences: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / epic_mir.TEST_CSV).write_text("\n".join([HEADER, *rows]) + "\n")
    (folder / epic_mir.SENTENCE_CSV).write_text("\n".join(["narration_id,narration", *sentences]) + "\n")
    return folder


@pytest.fixture
def annotations(tmp_path):
    rows = [_row("P01_01_0", 3, [3, 13], "put cup on table"),
            _row("P01_01_1", 3, [3], "put cup"),
            _row("P01_01_2", 5, [3, 13], "wash cup on table"),
            _row("P01_01_3", 3, [3, 13], "put cup on table")]
    # The sentence file's own texts are shifted by one row, as in the real file's last rows.
    return _write_annotations(tmp_path / "ann", rows, ["P01_01_0,put cup", "P01_01_1,wash cup on table",
                                                       "P01_01_2,put cup on table"])


def test_relevancy_is_verb_match_plus_noun_iou_over_two(annotations):
    mir = read_mir_annotations(annotations)
    assert mir.columns == [0, 1, 2]
    assert mir.texts == ["put cup on table", "put cup", "wash cup on table"]  # from the test CSV, by id
    relevancy = build_relevancy(mir)
    assert relevancy.dtype == np.float64 and relevancy.shape == (4, 3)
    assert relevancy[0, 1] == 0.75  # the same verb, half the nouns shared ({3} of {3, 13})
    assert relevancy[0, 2] == 0.5  # another verb, the same nouns
    assert relevancy[1, 2] == 0.25  # another verb, half the nouns
    assert relevancy[3, 0] == 1.0  # another clip with the same classes
    assert all(relevancy[j, j] == 1 for j in mir.columns)  # column j's own clip


@pytest.mark.parametrize("row, field", [
    (_row("P01_01_9", 3, [3], "x", start="1:2"), "start_timestamp"),
    (_row("P01_01_9", 3, [3], "x", stop="00:00:00.50"), "stop_timestamp"),
    (_row("P01_01_9", 3, [3], "x", video="../etc"), "video_id"),
    (_row("P01_01_9", 3, [3], "x").replace('"[3]"', '"[3, x]"'), "all_noun_classes"),
    (_row("P01_01_9", 3, [3], "x").replace(",3,n,", ",three,n,"), "verb_class"),
    (_row("P01_01_0", 3, [3], "x"), "narration_id"),
])
def test_a_malformed_row_names_file_line_and_field(annotations, row, field):
    path = annotations / epic_mir.TEST_CSV
    path.write_text(path.read_text() + row + "\n")
    with pytest.raises(MetadataError) as err:
        read_mir_annotations(annotations)
    assert str(err.value).startswith(f"{path}, line 6, field '{field}'") and "\n" not in str(err.value)


def test_a_sentence_of_no_clip_and_a_short_row_are_named(annotations):
    sentences = annotations / epic_mir.SENTENCE_CSV
    sentences.write_text(sentences.read_text() + "P09_09_9,nothing\n")
    with pytest.raises(MetadataError, match=rf"{sentences}, line 5, field 'narration_id': 'P09_09_9'"):
        read_mir_annotations(annotations)
    test = annotations / epic_mir.TEST_CSV
    test.write_text(test.read_text() + "P01_01_7,P01\n")
    with pytest.raises(MetadataError, match=rf"{test}, line 6: expected the 15 fields"):
        read_mir_annotations(annotations)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_the_distributed_pickle_loads(tmp_path, protocol):
    matrix = np.random.default_rng(0).random((4, 3))
    path = tmp_path / "relevancy.pkl"
    path.write_bytes(pickle.dumps(matrix, protocol=protocol))
    assert np.array_equal(load_relevancy(path, (4, 3)), matrix)
    with pytest.raises(MetadataError, match=r"is 4 x 3 but the annotations have 5 clips x 3 sentences"):
        load_relevancy(path, (5, 3))


class _WritesAFile:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return exec, (f"open({str(self.target)!r}, 'w').write('ran')",)


def test_a_crafted_pickle_is_refused_without_running(tmp_path):
    target = tmp_path / "ran.txt"
    path = tmp_path / "relevancy.pkl"
    path.write_bytes(pickle.dumps(_WritesAFile(target)))
    with pytest.raises(MetadataError, match=r"refusing to load builtins.exec"):
        load_relevancy(path)
    assert not target.exists()
    path.write_bytes(pickle.dumps({"a": np.zeros(2)}))
    with pytest.raises(MetadataError, match="expected a 2-D numeric numpy array"):
        load_relevancy(path)


def test_epic_mir_relevancy_command_writes_npy_and_compares(annotations, tmp_path, capsys):
    out = tmp_path / "relevancy.npy"
    expected = build_relevancy(read_mir_annotations(annotations))
    pkl = tmp_path / "distributed.pkl"
    pkl.write_bytes(pickle.dumps(expected))
    assert main(["epic-mir-relevancy", "--annotations", str(annotations), "--output", str(out),
                 "--compare", str(pkl)]) == 0
    assert np.array_equal(np.load(out, allow_pickle=False), expected)
    assert "largest difference from" in capsys.readouterr().out
    (annotations / epic_mir.TEST_CSV).write_text(HEADER + "\nbroken\n")
    assert main(["epic-mir-relevancy", "--annotations", str(annotations), "--output", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# --------------------------------------------------------------------------- the two frame layouts

def _clip(start: float, stop: float, start_frame: int = 0, stop_frame: int = 1) -> MIRClip:
    return MIRClip("P01_01_0", "P01", "P01_01", start, stop, start_frame, stop_frame, "x", 0, (0,))


@pytest.mark.parametrize("fps", [Fraction(30000, 1001), Fraction(25)])
def test_videos_are_read_by_timestamps_at_the_files_frame_rate(tmp_path, fps):
    write_video(tmp_path / "P01" / "P01_01.MP4", [draw_code(i, 0) for i in range(100)], fps)
    frames = ClipReader(tmp_path, "videos", 4)(_clip(1.0, 2.5))
    first, last = round(1.0 * float(fps)), int(np.ceil(2.5 * float(fps)))
    seg = (last - first - 1) / 4  # LaViLa's rounding of the middle of each segment, by hand
    expected = [(int(round(seg * i)) + first + min(int(round(seg * (i + 1))) + first, last)) // 2 for i in range(4)]
    assert [read_code(f.numpy())[0] for f in frames] == expected


def test_jpeg_frames_are_read_by_the_csv_frame_numbers(tmp_path):
    folder = tmp_path / "P01_01"
    folder.mkdir()
    for i in range(1, 40):
        Image.fromarray(draw_code(i, 0)).save(folder / f"frame_{i:010d}.jpg", quality=95)
    frames = ClipReader(tmp_path, "frames", 4)(_clip(0, 1, start_frame=10, stop_frame=30))
    # linspace(10, 30, 5) = 10, 15, 20, 25, 30: the middles (a + b - 1) // 2 as EgoVLP takes them
    assert [read_code(f.numpy())[0] for f in frames] == [12, 17, 22, 27]
    with pytest.raises(VideoReadError, match=r"P01_01/frame_0000000094.jpg: no such frame"):
        ClipReader(tmp_path, "frames", 2)(_clip(0, 1, start_frame=90, stop_frame=110))


# --------------------------------------------------------------------------- the evaluation

@pytest.fixture(scope="module")
def toy_epic(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    make_toy_benchmarks(root, seed=0, num_videos=6)
    return root / "epic_mir"


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "model"
    SViTTEgo(load_config("tiny", [*SMALL_MODEL, "model.vision.image_size=32"]).model).save_pretrained(folder)
    return folder


def test_the_toy_relevancy_is_the_one_built_from_its_csvs(toy_epic):
    mir = read_mir_annotations(toy_epic)
    stored = load_relevancy(toy_epic / epic_mir.RELEVANCY_PKL, (len(mir.clips), len(mir.columns)))
    assert np.array_equal(stored, build_relevancy(mir))


def test_eval_epic_mir_scores_the_cosine_of_the_embeddings(toy_epic, small_model, tmp_path, capsys):
    out = tmp_path / "mir.json"
    assert main(["eval-epic-mir", str(small_model), "--annotations", str(toy_epic), "--videos",
                 str(toy_epic / "videos"), "--relevancy", str(toy_epic / epic_mir.RELEVANCY_PKL), "--workers", "0",
                 "--batch-size", "3", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "LaViLa's protocol" in printed and "mAP V->T" in printed

    model = SViTTEgo.from_pretrained(small_model).eval()
    mir = read_mir_annotations(toy_epic)
    reader, transform = ClipReader(toy_epic / "videos", "videos", 4), eval_transform(model.config.vision)
    with torch.no_grad():
        videos = torch.cat([model.encode_video(transform(reader(clip))[None]) for clip in mir.clips])
        texts = model.encode_text(mir.texts)
    expected = epic_mir_scores((videos @ texts.T).double().numpy(), build_relevancy(mir))
    assert {k: result[k] for k in expected} == pytest.approx(expected, abs=1e-4)
    assert result["clips"] == len(mir.clips) and result["protocol"] == "videos" and result["skipped_clips"] == 0


def test_a_missing_video_fails_or_is_skipped_and_counted(toy_epic, small_model, tmp_path, capsys):
    videos = tmp_path / "videos"
    (videos / "P01").mkdir(parents=True)
    (videos / "P01" / "P01_01.MP4").symlink_to(toy_epic / "videos" / "P01" / "P01_01.MP4")
    args = ["eval-epic-mir", str(small_model), "--annotations", str(toy_epic), "--videos", str(videos),
            "--workers", "0"]
    assert main(args) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert last.startswith("svitt-ego: error: ") and last.endswith("P02/P02_01.MP4: no such video file")
    out = tmp_path / "mir.json"
    assert main([*args, "--on-error", "skip", "--output", str(out)]) == 1
    result = json.loads(out.read_text())
    missing = sum(clip.video_id == "P02_01" for clip in read_mir_annotations(toy_epic).clips)
    assert result["skipped_clips"] == missing == len(result["skipped"]) > 0
    assert "not comparable" in capsys.readouterr().out

"""EgoClip metadata: parsing, errors with line numbers, the cache, positives, negatives."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from svitt_ego.data.egoclip import COLUMNS, SceneNegatives, action_positive_mask, pad_tags, read_egoclip
from svitt_ego.data.errors import MetadataError

ROWS = [
    # clip_idx video_uid video_dur narration_source narration_ind narration_time clip_start clip_end clip_text tag_verb tag_noun
    ("0", "001e3e4e-2743", "128.033333", "narration_pass_1", "0", "3.3445", "2.967651", "3.721266",
     "#C C picks a bag of clothes from the floor", "[93]", "[192, 115, 12]"),
    ("1", "001e3e4e-2743", "128.033333", "narration_pass_1", "1", "5.5", "5.0", "6.0", "#C C drops the bag", "[]", "[]"),
    ("2", "002a", "60.5", "narration_pass_2", "0", "10", "9.5", "10.5", '#C C says "hi"', "[ 1,2 ]", "[7]"),
]


def write_egoclip(path, rows=ROWS, header=COLUMNS):
    lines = ["\t".join(header)] + ["\t".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_round_trip_with_empty_tag_lists_and_cache(tmp_path):
    path = write_egoclip(tmp_path / "egoclip.csv")
    df = read_egoclip(path)
    assert list(df.columns) == list(COLUMNS) and len(df) == 3
    assert df.clip_idx.tolist() == [0, 1, 2]
    assert df.video_uid.tolist() == ["001e3e4e-2743", "001e3e4e-2743", "002a"]
    assert df.narration_time.tolist() == [3.3445, 5.5, 10.0]
    assert df.clip_text.iloc[0] == "#C C picks a bag of clothes from the floor"
    assert df.clip_text.iloc[2] == '#C C says "hi"'
    assert [list(v) for v in df.tag_verb] == [[93], [], [1, 2]]
    assert [list(n) for n in df.tag_noun] == [[192, 115, 12], [], [7]]

    assert (tmp_path / "egoclip.csv.cache.parquet").is_file()
    cached = read_egoclip(path)
    pd.testing.assert_frame_equal(df, cached, check_dtype=False)
    assert list(cached.tag_noun.iloc[0]) == [192, 115, 12]

    # A changed file is parsed again, not served from the stale cache.
    write_egoclip(path, ROWS[:2])
    os.utime(path, ns=(1, 1))
    assert len(read_egoclip(path)) == 2


@pytest.mark.parametrize("index, value, field", [
    (5, "3.3s", "narration_time"),
    (0, "", "clip_idx"),
    (2, "nan", "video_dur"),
    (10, "[192, x]", "tag_noun"),
    (9, "93", "tag_verb"),
    (7, "1.0", "clip_end': '1.0' is before clip_start '5.0"),
    (0, "+5", "clip_idx': expected an integer, got '\\+5"),
    (4, "0x10", "narration_ind': expected an integer, got '0x10"),
    (0, "9" * 19, "clip_idx': expected an integer, got '9999999999999999999"),
    (1, "../../x", "video_uid': '\\.\\./\\.\\./x"),
    (1, "/etc", "video_uid': '/etc"),
    (1, "..", "video_uid': '\\.\\."),
    (1, "", "video_uid': '"),
])
def test_malformed_row_names_file_line_and_field(tmp_path, index, value, field):
    bad = list(ROWS[1])
    bad[index] = value
    path = write_egoclip(tmp_path / "egoclip.csv", [ROWS[0], ROWS[2], tuple(bad), ROWS[0]])
    with pytest.raises(MetadataError, match=rf"{path}, line 4, field '{field}'"):
        read_egoclip(path)
    assert not (tmp_path / "egoclip.csv.cache.parquet").exists()


def test_wrong_field_count_names_line(tmp_path):
    path = write_egoclip(tmp_path / "egoclip.csv", [ROWS[0], ROWS[0][:-1], ROWS[1], ROWS[2] + ("extra",)])
    with pytest.raises(MetadataError, match=rf"{path}, line 3, field 'tag_noun': the row has 10 .* expected 11"):
        read_egoclip(path)


def test_bytes_that_are_not_utf8_name_line_and_field(tmp_path):
    path = write_egoclip(tmp_path / "egoclip.csv", [ROWS[0], ROWS[1], ROWS[2]])
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"drops", b"dr\xffps")
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(MetadataError, match=rf"{path}, line 3, field 'clip_text': not valid UTF-8"):
        read_egoclip(path)
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        df = read_egoclip(path, lax=True)
    assert df.clip_idx.tolist() == [0, 2]


# pyarrow's report of the row it cannot decode must not reach stderr as a traceback.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_short_row_with_bytes_that_are_not_utf8_names_its_line_even_in_lax_mode(tmp_path):
    path = write_egoclip(tmp_path / "egoclip.csv", [ROWS[0], ROWS[1]])
    path.write_bytes(path.read_bytes() + b"\x80\t1\n")
    for lax in (False, True):
        with pytest.raises(MetadataError, match=rf"{path}, line 4, field 'video_dur': the row has 2 tab-separated "
                                                r"fields, expected 11, and bytes that are not UTF-8"):
            read_egoclip(path, lax=lax)


@pytest.mark.parametrize("end", ["", "\n"])
def test_header_alone_is_an_empty_table(tmp_path, end):
    path = tmp_path / "egoclip.csv"
    path.write_text("\t".join(COLUMNS) + end)
    df = read_egoclip(path)
    assert len(df) == 0 and list(df.columns) == list(COLUMNS)


def test_missing_file_is_a_metadata_error(tmp_path):
    with pytest.raises(MetadataError, match=rf"{tmp_path / 'nope.csv'}: no such EgoClip metadata file"):
        read_egoclip(tmp_path / "nope.csv")


def test_missing_column_is_an_error(tmp_path):
    path = write_egoclip(tmp_path / "egoclip.csv", [row[:-1] for row in ROWS], header=COLUMNS[:-1])
    with pytest.raises(MetadataError, match=rf"{path}, line 1: missing column\(s\) tag_noun"):
        read_egoclip(path)


def test_lax_mode_skips_and_counts(tmp_path):
    bad_time = ROWS[1][:5] + ("x",) + ROWS[1][6:]
    bad_tags = ROWS[2][:9] + ("[1,",) + ROWS[2][10:]
    path = write_egoclip(tmp_path / "egoclip.csv", [ROWS[0], bad_time, ROWS[1], ROWS[1][:4], bad_tags, ROWS[2]])
    with pytest.warns(UserWarning, match=r"skipped 3 malformed .* line 3, field 'narration_time'") as record:
        df = read_egoclip(path, lax=True)
    assert len(record) == 1
    assert df.clip_idx.tolist() == [0, 1, 2]
    assert [list(n) for n in df.tag_noun] == [[192, 115, 12], [], [7]]
    assert not (tmp_path / "egoclip.csv.cache.parquet").exists()


def _rewrite_cache(path, change) -> None:
    """Replace the cached table of ``path`` by ``change(table)``, keeping the cache's key."""
    cache = path.with_name(path.name + ".cache.parquet")
    table = pq.read_table(cache)
    pq.write_table(change(table).replace_schema_metadata(table.schema.metadata), cache)


@pytest.mark.parametrize("column, values", [
    ("clip_start", [float("nan"), 5.0, 9.5]),
    ("clip_end", [-3.0, 6.0, 10.5]),
    ("video_uid", ["../../etc", "001e3e4e-2743", "002a"]),
    ("tag_noun", [[-1], [], [7]]),
])
def test_a_rewritten_cache_is_checked_like_the_file_and_rebuilt(tmp_path, column, values):
    path = write_egoclip(tmp_path / "egoclip.csv")
    expected = read_egoclip(path)

    def change(table):
        array = pa.array(values, type=table.schema.field(column).type.value_type
                         if column == "video_uid" else table.schema.field(column).type)
        return table.set_column(table.column_names.index(column), column,
                                pc.dictionary_encode(array) if column == "video_uid" else array)

    _rewrite_cache(path, change)
    with pytest.warns(UserWarning, match=rf"egoclip\.csv\.cache\.parquet: .*{column}.*; rebuilding it from"):
        df = read_egoclip(path)
    pd.testing.assert_frame_equal(df, expected, check_dtype=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pd.testing.assert_frame_equal(read_egoclip(path), expected, check_dtype=False)  # the rebuilt cache


def test_a_change_that_keeps_size_and_mtime_is_not_served_from_the_cache(tmp_path):
    path = write_egoclip(tmp_path / "egoclip.csv")
    assert read_egoclip(path).clip_text.iloc[1] == "#C C drops the bag"
    stat = path.stat()
    path.write_text(path.read_text().replace("drops the bag", "drops the box"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert read_egoclip(path).clip_text.iloc[1] == "#C C drops the box"


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = write_egoclip(tmp_path / "egoclip.csv")
    plain = read_egoclip(path, cache=False)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    pd.testing.assert_frame_equal(read_egoclip(path, cache=False), plain)


def test_action_positive_mask_hand_made():
    nouns = [[1, 2], [2], [3], [1], [], [2]]
    verbs = [[10], [10, 11], [10], [12], [10], []]
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0],   # shares noun 2 and verb 10 with clip 1
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],   # verb 10 but no shared noun
        [0, 0, 0, 1, 0, 0],   # noun 1 but verb 12 is its own
        [0, 0, 0, 0, 1, 0],   # no nouns: only itself
        [0, 0, 0, 0, 0, 1],   # no verbs: only itself
    ], dtype=torch.bool)
    assert torch.equal(action_positive_mask(nouns, verbs), expected)
    assert torch.equal(action_positive_mask([[], []], [[], []]), torch.eye(2, dtype=torch.bool))
    # The padded form (as batches carry it) gives the same mask.
    assert torch.equal(action_positive_mask(pad_tags(nouns), pad_tags(verbs)), expected)
    assert pad_tags([[3, 1], []]).tolist() == [[3, 1], [-1, -1]]


def negative_table() -> pd.DataFrame:
    # video v: window 0 holds clips 0-4 (1 overlaps 0, 4 duplicates 0's moment); window 1 holds
    # clip 5 alone; video w holds one clip.
    rows = [("v", 1.0, 0.5, 1.5), ("v", 1.8, 1.2, 2.4), ("v", 10.0, 9.5, 10.5), ("v", 30.0, 29.0, 31.0),
            ("v", 1.1, 0.6, 1.6), ("v", 70.0, 69.0, 71.0), ("w", 5.0, 4.0, 6.0)]
    return pd.DataFrame(rows, columns=["video_uid", "narration_time", "clip_start", "clip_end"])


def test_negatives_same_video_same_window_not_overlapping():
    table = negative_table()
    sampler = SceneNegatives(table, window=60.0)
    rng = np.random.default_rng(0)
    for anchor in range(5):
        drawn = set()
        for _ in range(50):
            negative, how = sampler.sample(anchor, rng)
            assert how == "window" and negative != anchor
            assert table.video_uid[negative] == table.video_uid[anchor]
            assert table.narration_time[negative] // 60 == table.narration_time[anchor] // 60
            assert (table.clip_end[negative] < table.clip_start[anchor]
                    or table.clip_start[negative] > table.clip_end[anchor])
            drawn.add(negative)
        assert len(drawn) > 1
    assert sampler.fallbacks == {"nearest": 0, "other_video": 0}


def test_negative_fallbacks_are_documented_and_counted():
    table = negative_table()
    sampler = SceneNegatives(table, window=60.0)
    rng = np.random.default_rng(0)
    assert sampler.sample(5, rng) == (3, "nearest")  # alone in its window; clip 3 ends closest
    for _ in range(3):  # the only clip of its video
        negative, how = sampler.sample(6, rng)
        assert how == "other_video" and table.video_uid[negative] == "v"
    assert sampler.fallbacks == {"nearest": 1, "other_video": 3}

    lonely = SceneNegatives(table[table.video_uid == "w"].reset_index(drop=True))
    with pytest.raises(ValueError, match="no negative"):
        lonely.sample(0, rng)


def test_negatives_on_a_large_table_are_fast():
    rng = np.random.default_rng(0)
    n = 200_000
    video = rng.integers(0, 500, n)
    time = rng.random(n) * 3000
    table = pd.DataFrame({"video_uid": video.astype(str), "narration_time": time,
                          "clip_start": time - 0.5, "clip_end": time + 0.5})
    sampler = SceneNegatives(table)
    for anchor in rng.integers(0, n, 200):
        negative, how = sampler.sample(int(anchor), rng)
        assert video[negative] == video[anchor] and how == "window"
        assert abs(time[negative] - time[anchor]) > 1.0

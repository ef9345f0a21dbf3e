"""EgoClip / EgoMCQ datasets, collate functions, transforms and the per-epoch subset."""

from __future__ import annotations

import json
import logging
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import write_chunked_video

from svitt_ego.config import Config, TextConfig
from svitt_ego.data.dataset import EgoClipDataset, collate_egoclip, epoch_indices
from svitt_ego.data.egoclip import action_positive_mask
from svitt_ego.data.egomcq import EgoMCQDataset, collate_egomcq, read_egomcq
from svitt_ego.data.tokenizer import load_tokenizer
from svitt_ego.data.transforms import ClipTransform
from svitt_ego.data.video import VideoReadError

SIZE, FRAMES = 32, 2
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "#", "c", "picks", "drops", "a", "the", "cup", "bag", "opens", "door"]


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for uid in ("v1", "v2"):
        write_chunked_video(root, uid, seconds=4.0, fps=Fraction(30), chunk_seconds=2.0)
    return root


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return load_tokenizer(TextConfig(tokenizer=str(folder)))


def make_config(video_root, **data) -> Config:
    cfg = Config()
    cfg.model.vision.image_size, cfg.model.vision.num_frames = SIZE, FRAMES
    cfg.data.video_root, cfg.data.chunk_seconds = str(video_root), 2.0
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def make_table(uids=("v1", "v1", "v1", "v2", "v2")) -> pd.DataFrame:
    times = [0.5, 1.5, 3.0, 1.0, 3.5]
    return pd.DataFrame({
        "clip_idx": np.arange(len(uids)) + 100, "video_uid": list(uids),
        "narration_time": times[:len(uids)],
        "clip_start": [t - 0.4 for t in times[:len(uids)]], "clip_end": [t + 0.4 for t in times[:len(uids)]],
        "clip_text": ["#C C picks a cup", "#C C drops the bag", "#C C opens the door", "#C C picks the bag",
                      "#C C drops a cup"][:len(uids)],
        "tag_verb": [[1], [2], [3], [1], [2]][:len(uids)], "tag_noun": [[5], [6], [7], [6], [5, 6]][:len(uids)],
    })


def test_item_and_batch(video_root, tokenizer):
    table = make_table()
    dataset = EgoClipDataset(make_config(video_root), train=True, table=table)
    item = dataset[0]
    assert item["frames"].shape == (FRAMES, 3, SIZE, SIZE) and item["frames"].dtype == torch.float32
    assert item["text"] == "#C C picks a cup" and item["nouns"] == [5] and item["verbs"] == [1]
    assert item["clip_idx"] == 100 and item["skipped"] == 0
    negative = item["negative"]
    assert negative["clip_idx"] in (101, 102) and negative["fallback"] is False
    assert negative["frames"].shape == item["frames"].shape

    batch = collate_egoclip(tokenizer, max_length=8)([dataset[i] for i in range(3)])
    assert batch["frames"].shape == (6, FRAMES, 3, SIZE, SIZE)
    assert batch["input_ids"].shape[0] == 6 and batch["input_ids"].shape[1] <= 8
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["clip_idx"][:3].tolist() == [100, 101, 102]
    rows = (batch["clip_idx"] - 100).tolist()
    expected = action_positive_mask([table.tag_noun[i] for i in rows], [table.tag_verb[i] for i in rows])
    assert torch.equal(action_positive_mask(batch["nouns"], batch["verbs"]), expected)
    assert batch["nouns"].shape[0] == batch["verbs"].shape[0] == 6
    assert batch["skipped"] == 0 and batch["negative_fallbacks"] >= 0


def test_without_negatives_and_eval_is_deterministic(video_root, tokenizer):
    cfg = make_config(video_root, hard_negatives=False)
    dataset = EgoClipDataset(cfg, train=False, table=make_table())
    assert "negative" not in dataset[1]
    assert torch.equal(dataset[1]["frames"], dataset[1]["frames"])
    batch = collate_egoclip(tokenizer, 8)([dataset[0], dataset[1]])
    assert batch["frames"].shape[0] == 2 and batch["nouns"].shape[0] == 2


def test_randomness_depends_on_seed_epoch_and_index(video_root):
    dataset = EgoClipDataset(make_config(video_root), train=True, table=make_table())
    first = dataset[2]["frames"]
    assert torch.equal(first, dataset[2]["frames"])
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[2]["frames"])


def test_on_error_skip_counts_and_draws_another(video_root, tokenizer, caplog):
    table = make_table(("v1", "ghost", "v1", "v2", "v2"))
    cfg = make_config(video_root, on_error="skip", hard_negatives=False)
    dataset = EgoClipDataset(cfg, train=True, table=table)
    with caplog.at_level(logging.WARNING):
        item = dataset[1]
    assert item["skipped"] >= 1 and item["clip_idx"] != 101 and dataset.num_skipped == item["skipped"]
    assert "ghost/0.mp4" in caplog.text
    assert dataset[1]["clip_idx"] == item["clip_idx"]  # the replacement is drawn deterministically
    assert collate_egoclip(tokenizer, 8)([item, dataset[0]])["skipped"] == item["skipped"]

    loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=2, sampler=[1, 1, 0, 2, 3],
                                         collate_fn=collate_egoclip(tokenizer, 8))
    (batch,) = list(loader)
    assert batch["skipped"] == 2 * item["skipped"]

    cfg.data.on_error = "raise"
    with pytest.raises(VideoReadError, match="ghost"):
        EgoClipDataset(cfg, train=True, table=table)[1]


def test_epoch_indices():
    first = epoch_indices(1000, 0.1, epoch=0, seed=0)
    assert len(first) == 100 and len(np.unique(first)) == 100 and first.max() < 1000
    assert np.array_equal(first, epoch_indices(1000, 0.1, epoch=0, seed=0))
    assert not np.array_equal(first, epoch_indices(1000, 0.1, epoch=1, seed=0))
    assert sorted(epoch_indices(50, 1.0, epoch=3, seed=1)) == list(range(50))
    assert len(epoch_indices(5, 0.01, epoch=0, seed=0)) == 1


def test_transforms_shape_normalisation_and_shared_crop():
    rng = np.random.default_rng(0)
    gray = torch.full((3, 48, 64, 3), 153, dtype=torch.uint8)
    for train in (True, False):
        out = ClipTransform(SIZE, train, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])(gray, rng)
        assert out.shape == (3, 3, SIZE, SIZE) and out.dtype == torch.float32
        torch.testing.assert_close(out, torch.full_like(out, (153 / 255 - 0.5) / 0.5))
    out = ClipTransform(SIZE, False, [0.1, 0.2, 0.3], [0.2, 0.3, 0.4])(gray, rng)
    torch.testing.assert_close(out[0, :, 0, 0], (153 / 255 - torch.tensor([0.1, 0.2, 0.3])) / torch.tensor([0.2, 0.3, 0.4]))

    image = torch.randint(0, 256, (1, 48, 64, 3), dtype=torch.uint8)
    clip = torch.cat([image, image, image])
    transform = ClipTransform(SIZE, True, [0.5] * 3, [0.5] * 3, scale=(0.2, 0.5))
    outputs = [transform(clip, np.random.default_rng(seed)) for seed in range(8)]
    for out in outputs:  # every frame of a clip gets the same crop and flip
        assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    assert len({out[0].sum().item() for out in outputs}) > 1  # the crop does vary between clips


def test_eval_transform_is_centre_crop():
    # A horizontal ramp: the centre crop of the 64-wide frame keeps columns 8..55.
    ramp = torch.arange(64, dtype=torch.uint8).mul(4).view(1, 1, 64, 1).expand(1, 48, 64, 3).contiguous()
    out = ClipTransform(48, False, [0.0] * 3, [1 / 255] * 3)(ramp)
    assert out.shape == (1, 3, 48, 48)
    torch.testing.assert_close(out[0, 0, 0], ramp[0, 0, 8:56, 0].float())


def write_egomcq(path, questions):
    path.write_text(json.dumps(questions))
    return path


def mcq_question(answer=2, types=2):
    row = lambda uid, s, text=None: {"video_uid": uid, "clip_start": s, "clip_end": s + 0.8,  # noqa: E731
                                     "clip_text": text or "#C C picks a cup", "clip_idx": 7}
    return {"query": row("v1", 0.5, "#C C opens the door"),
            "choices": {str(i): row("v1" if i % 2 else "v2", 0.3 * i) for i in range(5)},
            "answer": answer, "types": types}


def test_egomcq_read_dataset_and_collate(tmp_path, video_root, tokenizer):
    path = write_egomcq(tmp_path / "egomcq.json", {"0": mcq_question(), "17": mcq_question(4, 1)})
    questions = read_egomcq(path)
    assert [q.question_id for q in questions] == ["0", "17"]
    assert [q.type for q in questions] == [2, 1] and questions[1].answer == 4
    dataset = EgoMCQDataset(make_config(video_root), questions)
    item = dataset[0]
    assert item["frames"].shape == (5, FRAMES, 3, SIZE, SIZE)
    assert item["text"] == "#C C opens the door" and item["answer"] == 2 and item["type"] == 2
    batch = collate_egomcq(tokenizer, 8)([dataset[0], dataset[1]])
    assert batch["frames"].shape == (2, 5, FRAMES, 3, SIZE, SIZE)
    assert batch["answer"].tolist() == [2, 4] and batch["type"].tolist() == [2, 1]
    assert batch["input_ids"].shape[0] == 2 and batch["question_id"] == ["0", "17"]


@pytest.mark.parametrize("change, message", [
    (lambda q: q.pop("answer"), "field 'answer': missing"),
    (lambda q: q.update(types=3), "field 'types'"),
    (lambda q: q.update(answer=5), "field 'answer'"),
    (lambda q: q["choices"]["3"].update(clip_start="soon"), r"field 'choices\.3\.clip_start': expected a number, got 'soon'"),
    (lambda q: q["choices"].pop("1"), "field 'choices'"),
    (lambda q: q["query"].pop("clip_text"), r"field 'query\.clip_text'"),
    (lambda q: q["query"].update(clip_end=0.0), r"field 'query\.clip_end': 0\.0 is before clip_start 0\.5"),
])
def test_egomcq_errors_name_question_and_field(tmp_path, change, message):
    bad = mcq_question()
    change(bad)
    path = write_egomcq(tmp_path / "egomcq.json", {"0": mcq_question(), "42": bad})
    with pytest.raises(ValueError, match=rf"egomcq.json: question '42', {message}"):
        read_egomcq(path)

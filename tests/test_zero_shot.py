"""What the zero-shot benchmarks share: LaViLa's frame numbers, chance AP, clip embeddings under torchrun."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import SMALL_MODEL

from svitt_ego.config import load_config
from svitt_ego.data.transforms import eval_transform
from svitt_ego.data.video import VideoReadError
from svitt_ego.models import SViTTEgo
from svitt_ego.eval.embed import embed_clips, expected_random_ap, segment_frame_ids

ITEMS = list(range(5))
BROKEN = 3  # the item whose "video" cannot be read


def test_segment_frame_ids_round_as_lavila():
    # Frames 60..150: segments of (150 - 60 - 1) / 4 = 22.25 frames, edges 60, 82, 104, 127, 149.
    assert segment_frame_ids(60, 150, 4).tolist() == [71, 93, 115, 138]
    # Frames 10..12, segments of 1/4 frame: edges 10, 10, 10 (0.5 rounds to even, as in LaViLa), 11, 11.
    assert segment_frame_ids(10, 12, 4).tolist() == [10, 10, 10, 11]


@pytest.mark.parametrize("relevance", [[1, 0, 0, 1, 0], [1, 0.5, 0.25, 0, 1]])
def test_expected_random_ap_is_the_mean_over_every_ranking(relevance):
    relevance = np.asarray(relevance, dtype=float)
    aps = []
    for order in itertools.permutations(range(len(relevance))):
        ranked = relevance[list(order)]
        precision = np.cumsum(ranked) / np.arange(1, len(ranked) + 1)
        aps.append(precision[ranked == 1].sum() / (ranked == 1).sum())
    assert expected_random_ap(len(relevance), relevance.sum()) == pytest.approx(np.mean(aps), abs=1e-12)


def _read(item: int) -> torch.Tensor:
    if item == BROKEN:
        raise VideoReadError(f"video {item}: no such video file")
    return torch.from_numpy(np.random.default_rng(item).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))


def _model():
    torch.manual_seed(0)
    cfg = load_config("tiny", [*SMALL_MODEL, "model.vision.image_size=32", "data.num_workers=0"])
    return SViTTEgo(cfg.model), cfg


def _worker(rank, world_size, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model, cfg = _model()
        embeddings, skipped = embed_clips(model, ITEMS, _read, cfg, torch.device("cpu"), 2, "skip", "test")
        try:  # the broken clip is rank 1's: every rank stops, none waits for the other forever
            embed_clips(model, ITEMS, _read, cfg, torch.device("cpu"), 2, "fail", "test")
            failed = None
        except VideoReadError as err:
            failed = str(err)
        torch.save((embeddings, skipped, failed), f"{out_file}.{rank}")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_each_clip_is_embedded_once_under_two_processes(tmp_path):
    model, cfg = _model()
    alone, skipped = embed_clips(model, ITEMS, _read, cfg, torch.device("cpu"), 2, "skip", "test")
    assert list(skipped) == [BROKEN] and torch.isnan(alone[BROKEN]).all()
    with torch.no_grad():
        direct = model.eval().encode_video(eval_transform(cfg.model.vision)(_read(0))[None])
    torch.testing.assert_close(alone[0], direct[0])

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2)
    kept = [i for i in ITEMS if i != BROKEN]
    for rank in range(2):
        together, skipped_together, failed = torch.load(tmp_path / f"out.pt.{rank}", weights_only=True)
        assert skipped_together == skipped and failed == "video 3: no such video file"
        torch.testing.assert_close(together[kept], alone[kept])
    with pytest.raises(VideoReadError, match="video 3: no such video file"):
        embed_clips(model, ITEMS, _read, cfg, torch.device("cpu"), 2, "fail", "test")

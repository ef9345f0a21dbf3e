"""Helpers shared by the tests: small model settings, toy-data configs, synthetic videos, text batches."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from svitt_ego.config import Config, load_config
from svitt_ego.data.toy import toy_data_overrides

# A model small enough for a test step on a CPU in a fraction of a second, with both sparsities on.
SMALL_MODEL = ["model.vision.width=48", "model.vision.num_heads=2", "model.vision.depth=2",
               "model.vision.image_size=32", "model.vision.block_size=4", "model.vision.prune_layers=[0]",
               "model.text.width=32", "model.text.depth=4", "model.text.num_fusion_layers=2",
               "model.text.num_heads=2", "model.text.intermediate_size=64", "model.text.pretrained=null",
               "model.text.tokenizer=minilm", "model.embed_dim=16"]


def record_bars(monkeypatch, module) -> list:
    """Every tqdm bar ``module`` makes from now on, kept to look at after it closes."""
    from tqdm import tqdm

    bars = []

    class Recorded(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(module, "tqdm", Recorded)
    return bars


def toy_config(toy: Path, out: Path, *overrides: str) -> Config:
    """The ``tiny`` preset at :data:`SMALL_MODEL` size on a toy dataset, writing into ``out``."""
    return load_config("tiny", toy_run_overrides(toy, out, *overrides))


def toy_run_overrides(toy: Path, out: Path, *overrides: str) -> list[str]:
    return [*toy_data_overrides(toy), f"train.output_dir={out}", *SMALL_MODEL, "train.batch_size=4",
            "train.eval_every_epoch=false", "data.num_workers=0", "train.log_every=1", *overrides]


def text_batch(tokenizer, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Random token ids [n, length] framed by the tokenizer's [CLS] ... [SEP]."""
    ids = torch.randint(1000, 2000, (n, length), generator=generator)
    ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    return ids


def objective_batch(n: int, seed: int) -> dict:
    """A random batch of ``n`` clips for a :data:`SMALL_MODEL` ``PretrainingObjective`` (4 frames of 32x32)."""
    from svitt_ego.data.tokenizer import load_tokenizer

    g = torch.Generator().manual_seed(seed)
    ids = text_batch(load_tokenizer(load_config("tiny", SMALL_MODEL).model.text), n, 8, g)
    nouns = torch.randint(0, 3, (n, 2), generator=g)
    nouns[::3, 1] = -1
    return {"frames": torch.randn(n, 4, 3, 32, 32, generator=g), "input_ids": ids,
            "attention_mask": torch.ones_like(ids), "nouns": nouns, "verbs": torch.randint(0, 2, (n, 1), generator=g),
            "clip_idx": torch.arange(n)}


# --------------------------------------------------------------------------- synthetic videos

WIDTH, HEIGHT, BITS = 64, 48, 8


def draw_code(index: int, chunk: int) -> np.ndarray:
    """A frame whose top half shows ``index`` and bottom half ``chunk`` as 8 black/white bars."""
    image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    bar = WIDTH // BITS
    for row, value in ((0, index), (1, chunk)):
        for bit in range(BITS):
            if value >> bit & 1:
                image[row * HEIGHT // 2:(row + 1) * HEIGHT // 2, bit * bar:(bit + 1) * bar] = 255
    return image


def read_code(image: np.ndarray) -> tuple[int, int]:
    """Inverse of :func:`draw_code`, robust to compression (looks at the bars' centres)."""
    bar, half = WIDTH // BITS, HEIGHT // 2
    values = []
    for row in range(2):
        centres = image[row * half + 4:(row + 1) * half - 4].astype(float).mean(axis=(0, 2))
        bits = [centres[bit * bar + 2:(bit + 1) * bar - 2].mean() > 128 for bit in range(BITS)]
        values.append(sum(1 << bit for bit, on in enumerate(bits) if on))
    return values[0], values[1]


def write_video(path: Path, frames: list[np.ndarray], fps: Fraction, gop: int = 15, faststart: bool = False) -> Path:
    """An h264 mp4 of ``frames``; with ``faststart`` its index comes before the frames, so that
    a cut copy still opens."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        stream.gop_size = gop
        stream.options = {"crf": "12", "preset": "veryfast"}
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, 1 / fps
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def write_chunked_video(root: Path, video_uid: str, seconds: float, fps: Fraction, chunk_seconds: float) -> list[int]:
    """A video cut into chunks like ``prepare_videos`` does; frame j of chunk k shows (j, k).
    Returns the number of frames of each chunk."""
    counts = []
    for chunk in range(math.ceil(seconds / chunk_seconds)):
        length = min(chunk_seconds, seconds - chunk * chunk_seconds)
        count = math.ceil(length * fps)
        write_video(root / video_uid / f"{chunk}.mp4", [draw_code(j, chunk) for j in range(count)], fps)
        counts.append(count)
    return counts


# --------------------------------------------------------------------------- datasets on synthetic videos

SIZE, FRAMES = 32, 2  # frame size and frames per clip of the dataset tests
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "#", "c", "picks", "drops", "a", "the", "cup", "bag", "opens", "door"]


def make_config(video_root, **data) -> Config:
    """A default config reading SIZE x SIZE, FRAMES-frame clips from ``video_root`` (2-s chunks)."""
    cfg = Config()
    cfg.model.vision.image_size, cfg.model.vision.num_frames = SIZE, FRAMES
    cfg.data.video_root, cfg.data.chunk_seconds = str(video_root), 2.0
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def write_egomcq(path, questions):
    """Write ``{question_id: question}`` as an egomcq.json."""
    path.write_text(json.dumps(questions))
    return path


def mcq_question(answer=2, types=2, choices=5):
    """An EgoMCQ question on the videos of the ``video_root`` fixture."""
    row = lambda uid, s, text=None: {"video_uid": uid, "clip_start": s, "clip_end": s + 0.8,  # noqa: E731
                                     "clip_text": text or "#C C picks a cup", "clip_idx": 7}
    return {"query": row("v1", 0.5, "#C C opens the door"),
            "choices": {str(i): row("v1" if i % 2 else "v2", 0.3 * i) for i in range(choices)},
            "answer": answer, "types": types}

def corrupt_concealed(path: Path) -> int:
    """Flip bytes spread over the frame data of the mp4 at ``path`` until FFmpeg decodes every
    frame without an error but reports some as corrupt (it conceals the damage). Returns the
    number of frames it reports as corrupt."""
    import av

    data = path.read_bytes()
    start, end = data.find(b"mdat") + 8, data.find(b"moov")
    end = end if end > start else len(data)
    num_frames = len(_decode_all(path))
    for step in range(301, 401, 2):
        damaged = bytearray(data)
        for position in range(start + 200, end - 8, step):
            damaged[position] ^= 0x55
        path.write_bytes(damaged)
        try:
            frames = _decode_all(path)
        except av.FFmpegError:
            continue
        corrupt = sum(frame.is_corrupt for frame in frames)
        if corrupt and len(frames) == num_frames:
            return corrupt
    raise AssertionError(f"found no damage to {path} that FFmpeg conceals")


def _decode_all(path: Path) -> list:
    import av

    with av.open(str(path)) as container:
        return list(container.decode(video=0))

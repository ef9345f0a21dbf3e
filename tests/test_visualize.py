"""``svitt-ego visualize``: the figure darkens exactly the patches the model prunes; the CLI end to end."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from svitt_ego.config import Config, load_config
from svitt_ego.data.toy import plan_world, render_video
from svitt_ego.models import SViTTEgo
from svitt_ego.data.transforms import eval_transform
from svitt_ego.visualize import (DARKEN, Layout, as_seen, clip_figure, kept_masks,
                                 read_video)

SMALL = ["model.vision.width=32", "model.vision.num_heads=2", "model.vision.drop_path=0.0",
         "model.text.width=32", "model.text.depth=3", "model.text.num_fusion_layers=2", "model.text.num_heads=2",
         "model.text.intermediate_size=64", "model.text.tokenizer=minilm", "model.embed_dim=16"]
TEXT = "#C C picks up the red cup"


def _model(*overrides) -> SViTTEgo:
    return SViTTEgo(load_config("svitt_ego_kr3", [*SMALL, *overrides]).model).eval()


def _expected_kept(model: SViTTEgo, clip: torch.Tensor) -> list[set]:
    """Per pruning step, the set of (t, y, x) patches the model keeps, read from its own kept indices."""
    vision = model.config.vision
    grid, per_frame = vision.grid_size, vision.grid_size ** 2
    with torch.no_grad():
        video = model.forward_video(clip[None])
        enc = model.tokenize([TEXT])
        fused = model.fusion(model.forward_text(enc["input_ids"], enc["attention_mask"]), enc["attention_mask"],
                             video.tokens)
    layers = [positions[0].tolist() for positions in video.kept_positions]
    layers.append([layers[-1][i - 1] for i in fused.kept_video_tokens[0, 1:].tolist()])
    return [{(p // per_frame, p % per_frame // grid, p % grid) for p in positions} for positions in layers]


def _png(image: Image.Image) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


@pytest.mark.parametrize("overrides", [
    ["model.vision.depth=3", "model.vision.prune_layers=[0,2]", "model.vision.num_frames=3",
     "model.vision.image_size=64", "model.vision.block_size=4", "model.text.keep_rate=0.3"],
    ["model.vision.depth=2", "model.vision.prune_layers=[1]", "model.vision.num_frames=2",
     "model.vision.image_size=48", "model.vision.attention=dense", "model.vision.keep_rate=0.5"],
])
def test_figure_darkens_exactly_the_pruned_patches(overrides):
    model = _model(*overrides)
    vision = model.config.vision
    frames = torch.randint(0, 256, (vision.num_frames, 50, 70, 3), dtype=torch.uint8)  # not square: centre crop
    image = _png(clip_figure(model, frames, TEXT))

    clip = eval_transform(vision)(frames)
    expected = _expected_kept(model, clip)
    layout = Layout(vision.num_frames, vision.image_size)
    assert image.shape[:2] == layout.size(1 + len(expected))[::-1]
    seen = as_seen(clip, vision).repeat(layout.scale, axis=1).repeat(layout.scale, axis=2)
    side = vision.patch_size * layout.scale
    for t in range(vision.num_frames):
        x0, y0 = layout.origin(0, t)
        np.testing.assert_array_equal(image[y0:y0 + layout.cell, x0:x0 + layout.cell], seen[t])
    for row, kept in enumerate(expected, start=1):
        darkened = 0
        for t in range(vision.num_frames):
            x0, y0 = layout.origin(row, t)
            for y in range(vision.grid_size):
                for x in range(vision.grid_size):
                    box = (slice(y0 + y * side, y0 + (y + 1) * side), slice(x0 + x * side, x0 + (x + 1) * side))
                    reference = seen[t][box[0].start - y0:box[0].stop - y0, box[1].start - x0:box[1].stop - x0]
                    want = reference if (t, y, x) in kept else (reference * DARKEN).astype(np.uint8)
                    np.testing.assert_array_equal(image[box], want, err_msg=f"row {row}, frame {t}, patch {y, x}")
                    darkened += (t, y, x) not in kept
        assert darkened == vision.num_frames * vision.grid_size ** 2 - len(kept) > 0


def test_rows_at_the_paper_setting():
    """4 frames at 224, q_v = 0.7 after layers 3, 6, 9, q_m = 0.1: 549, 385, 270 patches, then 27."""
    model = _model("model.vision.depth=10")
    rows = kept_masks(model, torch.randn(1, 4, 3, 224, 224), [TEXT])
    assert [int(row.mask.sum()) for row in rows] == [549, 385, 270, 27]
    assert [row.label.split(":")[1].split(" patches")[0].strip() for row in rows[:3]] == [
        "549 of 784", "385 of 784", "270 of 784"]
    assert "27 of 270 video tokens" in rows[3].label
    for earlier, later in zip(rows, rows[1:]):
        assert not (later.mask & ~earlier.mask).any()  # every step keeps a subset of the one before


@pytest.fixture(scope="module")
def toy_video(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    plan = plan_world(seed=0, num_videos=3)[-1]
    render_video(plan, root)
    return root / plan.uid


def test_read_video_takes_a_chunk_folder_or_a_file(toy_video):
    from_folder = read_video(toy_video, 1.0, 3.0, 4)
    from_file = read_video(toy_video / "0.mp4", 1.0, 3.0, 4)
    assert from_folder.shape == (4, 96, 96, 3) and from_folder.dtype == torch.uint8
    assert torch.equal(from_folder, from_file)


def test_cli_writes_the_figure(toy_video, tmp_path, capsys):
    from svitt_ego.cli import main

    model = _model("model.vision.depth=3", "model.vision.prune_layers=[0,2]", "model.vision.image_size=64",
                   "model.vision.block_size=4")
    folder = model.save_pretrained(tmp_path / "model")
    checkpoint = tmp_path / "last.pt"
    torch.save({"config": Config(model=model.config).to_dict(), "model": model.state_dict()}, checkpoint)
    for source, video in ((folder, toy_video), (checkpoint, toy_video / "0.mp4")):
        out = tmp_path / f"{source.name}.png"
        assert main(["visualize", str(source), str(video), "--start", "1", "--end", "3", "--text", TEXT,
                     "--output", str(out)]) == 0
        assert f"wrote {out}" in capsys.readouterr().out
        assert Image.open(out).size == Layout(4, 64).size(1 + 2 + 1)
        assert not list(tmp_path.glob(".*.tmp"))
        umask = os.umask(0)
        os.umask(umask)
        assert out.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("missing_video, start, end, message", [
    (False, "3", "1", "expected 0 <= --start < --end"),
    (True, "0", "1", "missing.mp4: no such video file"),
])
def test_cli_bad_input_is_one_line(toy_video, tmp_path, capsys, missing_video, start, end, message):
    from svitt_ego.cli import main

    folder = _model("model.vision.depth=1", "model.vision.prune_layers=[0]").save_pretrained(tmp_path / "m")
    video = tmp_path / "missing.mp4" if missing_video else toy_video
    out = tmp_path / "f.png"
    assert main(["visualize", str(folder), str(video), "--start", start, "--end", end, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_demo_figure_puts_before_and_after_side_by_side(toy_video, tmp_path):
    import json

    from svitt_ego.visualize import GAP, LABEL_HEIGHT, demo_figure

    row = {"video_uid": toy_video.name, "clip_start": 1.0, "clip_end": 3.0, "clip_text": TEXT}
    question = {"query": row, "choices": {"0": row}, "answer": 0, "types": 1}
    (tmp_path / "egomcq.json").write_text(json.dumps({"0": question}))
    cfg = load_config("svitt_ego_kr3", [*SMALL, "model.vision.depth=3", "model.vision.prune_layers=[0,2]",
                                        "model.vision.image_size=64", "model.vision.block_size=4",
                                        f"data.egomcq={tmp_path / 'egomcq.json'}", f"data.video_root={toy_video.parent}"])
    untrained, pretrained = SViTTEgo(cfg.model), SViTTEgo(cfg.model)
    path = demo_figure(untrained, pretrained, cfg, tmp_path / "figure1.png")
    width, height = Layout(4, 64).size(1 + 2 + 1)
    assert Image.open(path).size == (2 * width + GAP, LABEL_HEIGHT + height)
    assert untrained.training and pretrained.training  # the figure leaves the models' mode as it found it


def test_kept_masks_do_not_depend_on_the_models_mode():
    """A model in training mode (dropout, fresh random blocks) is measured as in evaluation, and left training."""
    model = _model("model.vision.depth=3", "model.vision.prune_layers=[0,2]", "model.vision.image_size=64",
                   "model.vision.block_size=4", "model.text.keep_rate=0.3")
    assert model.config.text.dropout > 0
    frames = torch.randn(2, 4, 3, 64, 64)
    expected = kept_masks(model, frames, [TEXT, "#C C shakes the green box"])
    model.train()
    for _ in range(3):
        got = kept_masks(model, frames, [TEXT, "#C C shakes the green box"])
        assert model.training
        assert [row.label for row in got] == [row.label for row in expected]
        for a, b in zip(got, expected):
            assert torch.equal(a.mask, b.mask)

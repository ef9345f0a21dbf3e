import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from svitt_ego.nlq import features as nlq_features
from svitt_ego.nlq.annotations import NLQClip
from svitt_ego.nlq.features import (ClipFrames, NLQFeatures, extract_nlq_features, window_centre,
                                    window_frame_indices, window_index)

av = pytest.importorskip("av")  # these tests write and read videos (PyAV)

FPS = 10


def test_windows_pad_with_the_last_frame():
    assert window_frame_indices(10, 4, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 9, 9]]
    assert window_frame_indices(8, 4, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert window_frame_indices(3, 4, 2).tolist() == [[0, 1, 2, 2], [2, 2, 2, 2]]


def test_window_time_convention():
    # window i covers frames [4i, 4i + 4): at 10 fps, [0.4 i, 0.4 i + 0.4) s, centre 0.4 i + 0.2
    assert window_centre(0, 4, 4, 10.0) == pytest.approx(0.2)
    assert window_centre(2, 4, 4, 10.0) == pytest.approx(1.0)
    assert window_index(1.0, 4, 4, 10.0) == pytest.approx(2.0)
    assert window_index(window_centre(7.25, 4, 2, 30.0), 4, 2, 30.0) == pytest.approx(7.25)


def test_clip_frames():
    frames = ClipFrames.of(NLQClip("c", "v", 1.25, 3.0), 10.0)
    assert (frames.first, frames.count) == (12, 18)
    assert frames.times(torch.tensor([0, 17])).tolist() == pytest.approx([1.25, 2.95])


def _write_video(path, num_frames):
    """Grey frames whose brightness is 10 x the frame index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "0", "g": "5"}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 10 * i, np.uint8), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


class _BrightnessModel(torch.nn.Module):
    """Stands in for SViTT-Ego: a window's feature is its frames' brightness, a query's tokens its length."""
    config = SimpleNamespace(vision=SimpleNamespace(num_frames=4, image_size=8, mean=[0.0] * 3, std=[1.0] * 3,
                                                    width=4), text=SimpleNamespace(width=3))

    def forward_video(self, frames):
        return SimpleNamespace(pooled=frames.mean(dim=(2, 3, 4)) * 255 / 10)  # [B, 4] frame indices

    def tokenize(self, texts):
        return {"input_ids": torch.tensor([[len(texts[0]), 7, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}

    def forward_text(self, ids, mask):
        return ids[..., None].float().expand(-1, -1, 3)


def _annotations(path):
    query = {"query": "when did I?", "clip_start_sec": 0.1, "clip_end_sec": 0.5}
    clip = lambda uid, vid, a, b: {"clip_uid": uid, "video_start_sec": a, "video_end_sec": b,  # noqa: E731
                                   "annotations": [{"annotation_uid": f"a{uid}", "language_queries": [query]}]}
    data = {"videos": [{"video_uid": "v1", "clips": [clip("c1", "v1", 0.5, 1.9)]},
                       {"video_uid": "gone", "clips": [clip("c2", "gone", 0.0, 1.0)]}]}
    path.write_text(json.dumps(data))
    return path


def test_extraction_window_contents_resume_and_unreadable(tmp_path, monkeypatch):
    _write_video(tmp_path / "videos" / "v1" / "0.mp4", 20)
    annotations = _annotations(tmp_path / "nlq.json")
    monkeypatch.setattr("svitt_ego.evaluate.load_for_eval", lambda checkpoint: (_BrightnessModel(), None))
    with pytest.raises(ValueError, match="ckpt: no such checkpoint"):
        extract_nlq_features(tmp_path / "ckpt", [annotations], tmp_path / "videos", tmp_path / "out")
    checkpoint = tmp_path / "ckpt"
    checkpoint.write_bytes(b"")
    meta = extract_nlq_features(checkpoint, [annotations], tmp_path / "videos", tmp_path / "out", batch_size=3)

    # clip c1 is frames 5..18 of v1: 14 frames, 4 windows, the last padded with frame 18
    video = torch.load(tmp_path / "out" / "video" / "c1.pt", weights_only=True)
    assert video.dtype == torch.float16
    expected = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16], [17, 18, 18, 18]]
    torch.testing.assert_close(video.float(), torch.tensor(expected, dtype=torch.float32), atol=0.3, rtol=0)
    assert meta["clips"]["c1"] == {"fps": 10.0, "frames": 14, "windows": 4}
    assert "gone" in meta["failed"]["c2"] and not (tmp_path / "out" / "video" / "c2.pt").exists()
    text = torch.load(tmp_path / "out" / "text" / "ac1_0.pt", weights_only=True)
    assert text.tolist() == [[11.0] * 3, [7.0] * 3]  # padding removed
    features = NLQFeatures(tmp_path / "out")
    assert features.to_seconds("c1", 1) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="clip c2 has no features .*gone"):
        features.video("c2")

    # a second run finds the clip done and writes nothing
    monkeypatch.setattr(nlq_features.WindowFeatureExtractor, "clip_features",
                        lambda *a, **k: pytest.fail("a finished clip was extracted again"))
    extract_nlq_features(checkpoint, [annotations], tmp_path / "videos", tmp_path / "out")
    with pytest.raises(ValueError, match="field 'stride' is 4, this run has 2"):
        extract_nlq_features(checkpoint, [annotations], tmp_path / "videos", tmp_path / "out", stride=2)

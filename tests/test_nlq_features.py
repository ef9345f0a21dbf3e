import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from svitt_ego.features import FeatureFolderError, WindowExtractor, feature_file
from svitt_ego.nlq.annotations import NLQClip, NLQQuery
from svitt_ego.nlq.features import NLQFeatures, clip_frames, extract_nlq_features, text_file

av = pytest.importorskip("av")  # these tests write and read videos (PyAV)

FPS = 10


def test_clip_frames():
    assert clip_frames(NLQClip("c", "v", 1.25, 3.0), 10.0) == (12, 18)


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


def _annotations(path, annotation_uid=None):
    query = {"query": "when did I?", "clip_start_sec": 0.1, "clip_end_sec": 0.5}
    clip = lambda uid, vid, a, b: {"clip_uid": uid, "video_start_sec": a, "video_end_sec": b,  # noqa: E731
                                   "annotations": [{"annotation_uid": annotation_uid or f"a{uid}",
                                                    "language_queries": [{**query, "query": f"{uid} when?"}]}]}
    data = {"videos": [{"video_uid": "v1", "clips": [clip("c1", "v1", 0.5, 1.9), clip("c3", "v1", 0.0, 0.8)]},
                       {"video_uid": "gone", "clips": [clip("c2", "gone", 0.0, 1.0)]}]}
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def brightness(tmp_path, monkeypatch):
    _write_video(tmp_path / "videos" / "v1" / "0.mp4", 20)
    monkeypatch.setattr("svitt_ego.models.loading.load_for_eval", lambda checkpoint: (_BrightnessModel(), None))
    return tmp_path


def test_extraction_window_contents_resume_and_unreadable(brightness, monkeypatch):
    tmp_path = brightness
    annotations = _annotations(tmp_path / "nlq.json")
    checkpoint = tmp_path / "ckpt"
    manifest = extract_nlq_features(checkpoint, [annotations], tmp_path / "videos", tmp_path / "out", batch_size=3)

    # clip c1 is frames 5..18 of v1: 14 frames, 4 windows, the last padded with frame 18
    features = NLQFeatures(tmp_path / "out")
    video = features.video("c1")
    assert video.dtype == torch.float16
    expected = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16], [17, 18, 18, 18]]
    torch.testing.assert_close(video.float(), torch.tensor(expected, dtype=torch.float32), atol=0.3, rtol=0)
    identity = manifest["videos"]["c1"].pop("identity")  # the chunk folder the clip was read from
    assert manifest["videos"]["c1"] == {"source": f"{tmp_path / 'videos' / 'v1'} (clip c1)", "fps": 10.0,
                                        "first_frame": 5, "frames": 14, "windows": 4}
    assert identity["video"] == str((tmp_path / "videos" / "v1").resolve())
    assert manifest["checkpoint"] == str(checkpoint.resolve()) and manifest["text_dimension"] == 3
    assert "gone" in manifest["failed"]["c2"] and not feature_file(tmp_path / "out", "c2").exists()
    text = features.text(NLQQuery("c1", "ac1", 0, "", None, None))
    assert text.tolist() == [[8.0] * 3, [7.0] * 3]  # "c1 when?" has 8 characters; padding removed
    assert features.to_seconds("c1", 1) == pytest.approx(0.6)
    with pytest.raises(FeatureFolderError, match="c2 has no features .*gone"):
        features.video("c2")

    # a second run finds the clips done and writes nothing
    monkeypatch.setattr(WindowExtractor, "rows", lambda *a, **k: pytest.fail("a finished clip was extracted again"))
    extract_nlq_features(checkpoint, [annotations], tmp_path / "videos", tmp_path / "out")
    with pytest.raises(FeatureFolderError, match=r"stride 4 -> 2"):
        extract_nlq_features(checkpoint, [annotations], tmp_path / "videos", tmp_path / "out", stride=2)


def test_an_interrupted_extraction_refuses_other_settings_or_weights(brightness, monkeypatch):
    """Killed after its first clip's files, a rerun with another stride or checkpoint is refused
    (the manifest is written before the first feature), and the same rerun completes."""
    tmp_path = brightness
    annotations, out = _annotations(tmp_path / "nlq.json"), tmp_path / "out"
    real_rows = WindowExtractor.rows
    calls = []

    def killed_on_the_second(self, source, progress=None):
        calls.append(source.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_rows(self, source, progress)

    monkeypatch.setattr(WindowExtractor, "rows", killed_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        extract_nlq_features(tmp_path / "ckpt", [annotations], tmp_path / "videos", out)
    assert feature_file(out, "c1").exists() and not feature_file(out, "c3").exists()
    assert json.loads((out / "manifest.json").read_text())["stride"] == 4
    with pytest.raises(FeatureFolderError, match="stride 4 -> 2"):
        extract_nlq_features(tmp_path / "ckpt", [annotations], tmp_path / "videos", out, stride=2)

    other = _BrightnessModel()
    other.register_buffer("scale", torch.ones(1))  # other weights, so another digest
    monkeypatch.setattr("svitt_ego.models.loading.load_for_eval", lambda checkpoint: (other, None))
    with pytest.raises(FeatureFolderError, match="weights_digest 'sha256:"):
        extract_nlq_features(tmp_path / "run_c", [annotations], tmp_path / "videos", out)

    monkeypatch.setattr("svitt_ego.models.loading.load_for_eval", lambda checkpoint: (_BrightnessModel(), None))
    monkeypatch.setattr(WindowExtractor, "rows", real_rows)
    calls.clear()
    manifest = extract_nlq_features(tmp_path / "ckpt", [annotations], tmp_path / "videos", out)
    assert set(manifest["videos"]) == {"c1", "c3"}
    assert NLQFeatures(out).video("c3").shape == (2, 4)


def test_every_file_is_checked_on_resume_and_on_reading(brightness):
    tmp_path = brightness
    annotations, out = _annotations(tmp_path / "nlq.json"), tmp_path / "out"
    extract_nlq_features(tmp_path / "ckpt", [annotations], tmp_path / "videos", out)
    good = feature_file(out, "c1").read_bytes()
    from safetensors.torch import save_file

    save_file({"features": torch.zeros(75, 4, dtype=torch.float16)}, feature_file(out, "c1"))  # a stride-4 75-row file
    with pytest.raises(FeatureFolderError, match=r"c1.safetensors: tensor 'features' is float16 \[75, 4\], the "
                                                 r"manifest says float16 \[4, 4\]"):
        NLQFeatures(out).video("c1")
    extract_nlq_features(tmp_path / "ckpt", [annotations], tmp_path / "videos", out)  # makes it again
    assert feature_file(out, "c1").read_bytes() == good


def test_the_same_annotation_id_under_two_clips_keeps_both_queries(brightness):
    tmp_path = brightness
    annotations = _annotations(tmp_path / "nlq.json", annotation_uid="shared")
    extract_nlq_features(tmp_path / "ckpt", [annotations], tmp_path / "videos", tmp_path / "out")
    features = NLQFeatures(tmp_path / "out")
    first = features.text(NLQQuery("c1", "shared", 0, "", None, None))
    third = features.text(NLQQuery("c3", "shared", 0, "", None, None))
    assert first[0, 0] == len("c1 when?") and third[0, 0] == len("c3 when?")
    assert text_file(tmp_path / "out", NLQQuery("c1", "shared", 0, "", None, None)) != text_file(
        tmp_path / "out", NLQQuery("c3", "shared", 0, "", None, None))

"""The paper presets pool the video by its [CLS] token; a saved model keeps the pooling it was trained with."""

import pytest
import torch

from svitt_ego.config import Config, load_config
from svitt_ego.models.loading import load_for_eval
from svitt_ego.models import SViTTEgo

SMALL = ["model.vision.width=32", "model.vision.num_heads=2", "model.vision.depth=2", "model.vision.image_size=32",
         "model.vision.prune_layers=[1]", "model.vision.drop_path=0.0", "model.text.width=32",
         "model.text.depth=2", "model.text.num_fusion_layers=1", "model.text.num_heads=2",
         "model.text.intermediate_size=64", "model.text.vocab_size=120", "model.embed_dim=16"]


@pytest.mark.parametrize("preset", ["svitt_ego_kr3", "svitt_ego_kr5", "dense"])
def test_paper_presets_pool_by_cls(preset):
    model = SViTTEgo(load_config(preset, SMALL).model).eval()
    assert model.visual.fc_norm is None
    frames = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        video = model.forward_video(frames)
    torch.testing.assert_close(video.pooled, video.tokens[:, 0])


def test_saved_model_keeps_its_pooling(tmp_path):
    """A mean-pooling model still pools by the mean when loaded next to a [CLS] preset."""
    model = SViTTEgo(load_config("svitt_ego_kr3", [*SMALL, "model.vision.pooling=mean"]).model).eval()
    frames = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        expected = model.encode_video(frames)
    folder = model.save_pretrained(tmp_path / "model")
    checkpoint = tmp_path / "last.pt"
    torch.save({"config": Config(model=model.config).to_dict(), "model": model.state_dict()}, checkpoint)
    for loaded in (SViTTEgo.from_pretrained(folder), load_for_eval(checkpoint, "svitt_ego_kr3")[0],
                   load_for_eval(folder, "svitt_ego_kr3")[0]):
        assert loaded.config.vision.pooling == "mean" and loaded.visual.fc_norm is not None
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval().encode_video(frames), expected)

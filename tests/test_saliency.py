"""The saliency measurement's helpers: where the toy world's object and hand are, patch coverage, survival."""

import numpy as np
import pytest
import torch

from svitt_ego.config import VisionConfig
from svitt_ego.data.toy import COLOURS, FPS, NOUNS, actor_masks, plan_world, render_frames
from svitt_ego.visualize import patch_coverage, survival


@pytest.fixture(scope="module")
def plan_and_frames():
    plan = plan_world(seed=0, num_videos=3)[-1]
    return plan, list(render_frames(plan))


def test_actor_masks_are_where_the_renderer_draws_the_object_and_the_hand(plan_and_frames):
    plan, frames = plan_and_frames
    skin = np.array(plan.skin)
    seen = 0
    for f in range(0, plan.num_frames, 3):
        obj, hand = actor_masks(plan, f)
        t = f / FPS
        acting = [a for a in plan.actions if a.start <= t < a.end]
        assert obj.any() == hand.any() == bool(acting), f"frame {f}"
        if not acting:
            continue
        seen += 1
        colour = np.array(COLOURS[NOUNS[plan.objects[acting[0].obj].noun].split(" ")[0]])
        pixels = frames[f].astype(int)
        assert not (obj & hand).any()
        assert (pixels[hand] == skin).all()
        is_object = (pixels[obj] == colour).all(-1) | (pixels[obj] == colour // 2).all(-1)  # body or marker
        assert is_object.all(), f"frame {f}"
    assert seen > 20


def test_patch_coverage_by_hand():
    vision = VisionConfig(image_size=64, patch_size=16)  # a 4 x 4 grid
    masks = np.zeros((2, 96, 128), bool)  # 96 x 128: the centre crop drops 16 columns on each side
    masks[0, :24, 16:40] = True  # exactly patch (0, 0) of the crop
    masks[0, 48:60, 88:112] = True  # half of patch (2, 3)
    masks[1, :, :16] = True  # outside the crop
    coverage = patch_coverage(masks, vision)
    expected = torch.zeros(2, 4, 4)
    expected[0, 0, 0], expected[0, 2, 3] = 1.0, 0.5
    torch.testing.assert_close(coverage, expected)


def test_survival_by_hand():
    kept = torch.tensor([[True, False], [True, True]])
    weight = torch.tensor([[0.5, 1.0], [0.25, 0.0]])
    assert survival(kept, weight) == (0.75, 1.75)
    assert survival(kept, torch.ones(2, 2)) == (3.0, 4.0)

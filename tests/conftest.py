import sys
from fractions import Fraction
from pathlib import Path

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-based tests: a bounded run by default; SVITT_EGO_HYPOTHESIS=long (or pytest
# --hypothesis-profile=long) runs many more examples.
settings.register_profile("bounded", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("SVITT_EGO_HYPOTHESIS", "bounded"))

sys.path.insert(0, str(Path(__file__).parent))  # ``import helpers`` under any --import-mode

from helpers import WORDS, write_chunked_video  # noqa: E402

pytest_plugins = ["ci_skips", "pytester"]  # ci_skips: under CI=true only a gpu test may skip

from svitt_ego.config import TextConfig  # noqa: E402
from svitt_ego.data.tokenizer import load_tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def video_root(tmp_path_factory):
    """Two 4-second videos ``v1``, ``v2`` in 2-second chunks (see :func:`helpers.write_chunked_video`)."""
    root = tmp_path_factory.mktemp("videos")
    for uid in ("v1", "v2"):
        write_chunked_video(root, uid, seconds=4.0, fps=Fraction(30), chunk_seconds=2.0)
    return root


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory):
    """A BERT tokenizer over the few :data:`helpers.WORDS`."""
    folder = tmp_path_factory.mktemp("vocab")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return load_tokenizer(TextConfig(tokenizer=str(folder)))

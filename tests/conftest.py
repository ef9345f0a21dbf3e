import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-based tests: a bounded run by default; SVITT_EGO_HYPOTHESIS=long (or pytest
# --hypothesis-profile=long) runs many more examples.
settings.register_profile("bounded", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("SVITT_EGO_HYPOTHESIS", "bounded"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

"""benchmarks/objectives.py's summary: means, standard errors and paired differences worked out by hand."""

import importlib.util
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "objectives.py"
_spec = importlib.util.spec_from_file_location("objectives_benchmark", _PATH)
objectives = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(objectives)


def test_arms_separate_the_two_ingredients_of_egonce():
    arms = {name: set(overrides) for name, (_, overrides) in objectives.ARMS.items()}
    assert arms["egonce"] == {"loss.contrastive=egonce", "data.hard_negatives=true"}
    assert arms["infonce"] == {"loss.contrastive=infonce", "data.hard_negatives=false"}
    assert arms["infonce_scene"] == {"loss.contrastive=infonce", "data.hard_negatives=true"}


def test_mean_and_standard_error():
    mean, se = objectives.mean_and_se([50.0, 54.0, 58.0])
    assert mean == 54.0 and se == pytest.approx(4.0 / math.sqrt(3))  # sample sd 4
    mean, se = objectives.mean_and_se([61.0])
    assert mean == 61.0 and math.isnan(se)


def test_summary_pairs_differences_by_seed():
    rows = [{"arm": "egonce", "seed": s, "inter": i, "intra": j} for s, i, j in [(0, 60, 50), (1, 62, 56), (2, 64, 53)]]
    rows += [{"arm": "infonce", "seed": s, "inter": i, "intra": j} for s, i, j in [(0, 61, 45), (2, 63, 47)]]
    lines = objectives.summarize(rows).splitlines()
    assert len(lines) == 3 and "infonce_scene" not in lines[0]
    egonce, infonce = lines[1].split(), lines[2].split()
    assert egonce[1:] == ["3", "62.0", "+-", "1.2", "53.0", "+-", "1.7", "-", "-"]
    # InfoNCE: inter 62.0 +- 1.0, intra 46.0 +- 1.0; differences over seeds 0 and 2: inter +1, -1; intra -5, -6.
    assert infonce[3:] == ["2", "62.0", "+-", "1.0", "46.0", "+-", "1.0", "+0.0", "+-", "1.0", "-5.5", "+-", "0.5"]

"""EgoMCQ evaluation: the accuracy (ties, question types, inter/intra labels), edge cases, loading models."""

import numpy as np
import pytest
import torch

from svitt_ego.evaluate import egomcq_accuracy


def test_accuracy_per_type_with_ties():
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.3, 0.2, 0.0],  # type 1, argmax 1, answer 1: right
            [0.5, 0.5, 0.1, 0.0, 0.0],  # type 1, tie 0/1 -> 0, answer 1: wrong
            [0.2, 0.7, 0.7, 0.7, 0.1],  # type 1, tie 1/2/3 -> 1, answer 1: right
            [0.0, 0.0, 0.0, 0.0, 0.0],  # type 1, all tied -> 0, answer 0: right
            [0.3, 0.1, 0.2, 0.0, 0.8],  # type 2, argmax 4, answer 4: right
            [0.3, 0.1, 0.3, 0.0, 0.2],  # type 2, tie 0/2 -> 0, answer 2: wrong
            [0.0, 0.1, 0.2, 0.3, 0.4],  # type 2, argmax 4, answer 3: wrong
        ]
    )
    answers = torch.tensor([1, 1, 1, 0, 4, 2, 3])
    types = torch.tensor([1, 1, 1, 1, 2, 2, 2])
    result = egomcq_accuracy(scores, answers, types)
    assert result == {"inter": 75.0, "intra": pytest.approx(100 / 3), "num_inter": 4, "num_intra": 3}


def test_type_1_is_inter_video():
    # Only type-1 questions, all right: the "inter" entry carries them.
    result = egomcq_accuracy(np.eye(5)[:3], np.arange(3), np.ones(3, dtype=int))
    assert result["inter"] == 100.0 and result["num_inter"] == 3
    # The absent type is None (null in JSON), never NaN: NaN compares false and is not valid JSON.
    assert result["intra"] is None and result["num_intra"] == 0


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        egomcq_accuracy(torch.zeros(2, 5), torch.zeros(2), torch.tensor([1, 3]))
    with pytest.raises(ValueError):
        egomcq_accuracy(torch.zeros(2, 5), torch.zeros(3), torch.ones(2))

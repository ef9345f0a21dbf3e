"""Node sparsity's one home: token counts, the kept indices and the pruned tokens, by hand."""

import torch

from svitt_ego.models.pruning import gather_tokens, kept_indices, num_kept, prune_tokens


def test_num_kept_rounds_up_without_float_error():
    assert num_kept(0.1, 270) == 27  # 0.1 * 270 is 27.000000000000004 in floating point
    assert num_kept(0.7, 784) == 549 and num_kept(0.7, 549) == 385 and num_kept(0.7, 385) == 270
    assert num_kept(0.01, 5) == 1


def test_kept_indices_by_hand():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.0, 0.1, 0.7]])
    assert kept_indices(scores, 0.5).tolist() == [[0, 2, 3], [0, 1, 4]]  # [CLS], then the top 2, in order


def test_prune_tokens_keeps_rows_and_positions():
    x = torch.arange(2 * 5 * 3, dtype=torch.float).view(2, 5, 3).requires_grad_()
    positions = torch.tensor([[-1, 10, 11, 12, 13]])
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.0, 0.1, 0.7]])
    kept, kept_positions = prune_tokens(x, positions, scores, 0.5)
    assert kept_positions.tolist() == [[-1, 11, 12], [-1, 10, 13]]
    assert torch.equal(kept, torch.stack([x[0, [0, 2, 3]], x[1, [0, 1, 4]]]))
    kept.sum().backward()
    assert x.grad[:, :, 0].tolist() == [[1, 0, 1, 1, 0], [1, 1, 0, 0, 1]]  # the gradient reaches the kept rows only


def test_gather_tokens_is_a_row_gather():
    x = torch.randn(2, 6, 4)
    idx = torch.tensor([[0, 5], [0, 2]])
    assert torch.equal(gather_tokens(x, idx), torch.stack([x[0, [0, 5]], x[1, [0, 2]]]))

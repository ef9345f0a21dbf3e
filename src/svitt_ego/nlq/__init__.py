"""Ego4D natural language queries: features, a grounding model, the official metric.

The names below are imported on first use, so ``svitt_ego.nlq.recipe`` (read by ``svitt-ego
--help``) loads without torch.
"""

__all__ = ["NLQFormatError", "evaluate_nlq", "read_nlq"]


def __getattr__(name: str):
    if name in ("NLQFormatError", "read_nlq"):
        from svitt_ego.nlq import annotations

        return getattr(annotations, name)
    if name == "evaluate_nlq":
        from svitt_ego.nlq.metric import evaluate_nlq

        return evaluate_nlq
    raise AttributeError(f"module 'svitt_ego.nlq' has no attribute {name!r}")

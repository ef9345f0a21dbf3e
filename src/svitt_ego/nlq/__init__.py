"""Ego4D natural language queries: features, a grounding model, the official metric."""

from svitt_ego.nlq.annotations import NLQFormatError, read_nlq
from svitt_ego.nlq.metric import evaluate_nlq

__all__ = ["NLQFormatError", "evaluate_nlq", "read_nlq"]

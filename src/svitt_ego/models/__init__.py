"""SViTT-Ego models: sparse BEiT video encoder, BERT text and multimodal encoders."""

from svitt_ego.models.model import SViTTEgo, create_model
from svitt_ego.models.video import VideoEncoder, VideoOutput

__all__ = ["SViTTEgo", "create_model", "VideoEncoder", "VideoOutput"]

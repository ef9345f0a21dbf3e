"""SViTT-Ego: a sparse video-text transformer for egocentric video."""

__version__ = "0.1.0"

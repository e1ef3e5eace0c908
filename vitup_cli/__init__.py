"""vitup: dense, faithful, per-pixel features from Vision Transformers (ViT-Up)."""

__version__ = "0.1.0"

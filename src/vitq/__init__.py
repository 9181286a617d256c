"""vitq: post-training quantization for Vision Transformers."""

__version__ = "0.1.0"

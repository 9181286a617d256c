"""Quantization methods that plug into vitq's core through its interfaces.

Importing this package runs each method's registrations (e.g. AIQViT's ``"dfq"`` post-softmax
quantizer), so the core imports it before resolving a recipe's names.
"""

from . import aiqvit  # noqa: F401  (registrations)

__all__ = ["aiqvit"]

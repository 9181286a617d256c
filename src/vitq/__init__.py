"""vitq: post-training quantization for Vision Transformers.

    import vitq
    model = vitq.load_model("cifar10_vit")
    calib = vitq.calibration_images(model, "cifar10", 128)
    qmodel = vitq.quantize(model, calib, "mse", w_bits=4, a_bits=4)
"""

__version__ = "0.1.0"

from . import methods  # noqa: E402,F401  (method packages register their quantizers on import)
from .api import (QuantizeResult, calibration_images, load_quantized, quantize, quantize_with_summary,  # noqa: E402
                  recipe_of, save_quantized)
from .errors import VitqError  # noqa: E402
from .export import export, packed_size_report  # noqa: E402  (the function shadows the subpackage's name)
from .models import load_model  # noqa: E402
from .recipes import PRESETS, Recipe, get_recipe, recipe_names  # noqa: E402
from .reporting import write_report  # noqa: E402  (matplotlib is imported only when a page is drawn)

__all__ = [
    "PRESETS", "QuantizeResult", "Recipe", "VitqError", "calibration_images", "export", "get_recipe", "load_model",
    "load_quantized", "packed_size_report", "quantize", "quantize_with_summary", "recipe_names", "recipe_of",
    "save_quantized", "write_report",
]

"""Bundle -> smaller bundle: int8 (dynamic or static QDQ), int4 (MatMulNBits, GatherBlockQuantized), fp16, and
mixed precision searched under an accuracy budget. Everything goes through onnxruntime's own quantizers.

    from edgevlm.quant import quantize_bundle
    quantize_bundle("demo/", "demo-int4/", "int4", overrides={"vision": "fp16"})
"""

from .api import SCHEMES, quantize_bundle
from .graphs import LEVELS, Options, QuantError

__all__ = ["quantize_bundle", "Options", "QuantError", "SCHEMES", "LEVELS"]

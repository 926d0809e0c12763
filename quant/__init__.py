"""Bundle -> smaller bundle: int8 (dynamic or static QDQ), int4 (MatMulNBits, GatherBlockQuantized), fp16, and
mixed precision searched under an accuracy budget. Everything goes through onnxruntime's own quantizers.

    from edgevlm.quant import quantize_bundle
    quantize_bundle("demo/", "demo-int4/", "int4", overrides={"vision": "fp16"})
"""

from .schemes import LEVELS, SCHEMES

__all__ = ["quantize_bundle", "Options", "QuantError", "SCHEMES", "LEVELS"]


def __getattr__(name: str):  # the parts that need onnx load on first use: edgevlm.quant.schemes does not
    if name == "quantize_bundle":
        from .api import quantize_bundle

        return quantize_bundle
    if name in ("Options", "QuantError"):
        from . import graphs

        return getattr(graphs, name)
    raise AttributeError(f"module 'edgevlm.quant' has no attribute {name!r}")

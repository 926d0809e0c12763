"""The names quantization takes (no onnx needed: the CLI reads them before checking that the quant extra is in)."""

LEVELS = ("fp32", "fp16", "int8", "int8-static", "int4")  # what one weight node (or a component) can be
SCHEMES = LEVELS + ("mixed",)  # what a whole bundle can be asked to become
BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int8-static": 8, "int4": 4}
TARGETS = ("auto", "cpu", "npu")  # int8-static: CPU kernels, or plain QDQ for NPU providers
INT8_RANGES = ("portable", "full")  # int8 weights: 7 bits, exact on every CPU; or 8 bits (VNNI / ARM)

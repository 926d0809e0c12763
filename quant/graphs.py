"""One ONNX graph -> a quantized ONNX graph, each node at its own level, through onnxruntime's quantizers.

Levels (a weight node is a MatMul/Conv/Gather whose weight is a constant initializer):

    fp32         left as is
    fp16         the whole graph's weights and arithmetic in fp16, inputs/outputs kept fp32
                 (onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True))
    int8         dynamic: int8 weights, activations quantized at run time
                 (quantize_dynamic: MatMulInteger / ConvInteger after DynamicQuantizeLinear); for target
                 "cpu", a MatMul that computes one row per run (a decoder's logits of the last position)
                 becomes 8-bit MatMulNBits instead (`ROW_BLOCK` weights per scale), a faster matrix-vector
                 kernel
    int8-static  QDQ: int8 per-channel weights and calibrated uint8 activations
                 (quantize_static, QuantFormat.QDQ: the form QNN / NNAPI need); for target "cpu", a Gelu
                 between two quantized nodes runs in uint8 too (`lut_gelu`)
    int4         block-wise 4-bit weights: MatMul -> MatMulNBits, Gather -> GatherBlockQuantized
                 (matmul_nbits_quantizer.MatMulNBitsQuantizer; Conv has no 4-bit kernel)

int8 weight range (`Options.int8_range`, recorded per component in the manifest): onnxruntime's x86 int8
kernels multiply uint8 activations by int8 weights. With VNNI (vpdpbusd) the products are summed in 32 bits;
without it (AVX2-only CPUs) vpmaddubsw adds two products into a saturating int16 first, and 255 x 127 x 2
overflows it. "portable" (the default) quantizes those weights to 7 bits ([-64, 64], onnxruntime's
reduce_range), per output channel so that the lost bit costs little accuracy: 255 x 64 x 2 = 32,640 fits, so the same graph is exact on every CPU, at the same speed. Which
ops saturate was measured (tests/test_int8_isa.py, on an emulated AVX2 CPU): dynamic MatMulInteger and static
QLinearConv / QLinearMatMul do; dynamic ConvInteger does not, and keeps 8-bit weights. "full" keeps 8-bit
weights: one bit more precision where VNNI (or ARM's dot product) runs it, saturation where it does not --
`edgevlm.cpu` warns when such a bundle loads on a CPU without VNNI. (uint8 weights would not saturate
either, but measured 2x slower than int8 ones on both kernels.)
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from edgevlm.errors import EdgeVLMError

from .rewrites import fold_conv_scales, lut_gelu
from .schemes import BITS, INT8_RANGES, LEVELS, TARGETS

# int8, target cpu: a one-row MatMul (the lm_head) as 8-bit MatMulNBits, symmetric, this many weights per scale.
# Measured on Qwen2-0.5B's lm_head (896 x 151,936) at 2 threads: 4.9 ms vs 6.3 ms for DynamicQuantizeMatMul.
ROW_BLOCK = 128
WEIGHT_OPS = ("MatMul", "Conv", "Gather")


class QuantError(EdgeVLMError):
    """A bundle could not be quantized as asked (unsupported level for a node, failed check, ...)."""


@dataclass(frozen=True)
class Options:
    block_size: int = 32  # int4: weights per scale (a power of two >= 16)
    symmetric: bool = False  # int4: no zero points
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations in the kernel (fast on VNNI)
    # int8-static: "cpu" also uses onnxruntime's CPU-only quantized kernels where they are faster (`lut_gelu`);
    # "npu" keeps plain QDQ, the form NPU providers take; "auto" = "npu" for a static bundle, else "cpu"
    # (quantize_bundle decides; `quantize`, which sees one graph, treats "auto" as "cpu")
    target: str = "auto"
    int8_range: str = "portable"  # "portable": 7-bit int8 weights, exact on every CPU; "full": 8-bit (VNNI, ARM)


@dataclass(frozen=True)
class WeightNode:
    name: str
    op: str
    weight: str  # initializer name
    params: int
    groups: int = 1  # Conv: its `group` attribute
    out_channels: int = 0  # Conv: its weight's first dimension

    @property
    def mixing_groups(self) -> bool:
        """A grouped Conv that is not depthwise (several output channels per group, e.g. FastViT's stride-2
        patch embedding). onnxruntime's x86 QLinearConv takes a generic path for it, measured 19x slower
        than fp32 (226 vs 12 ms at 1024 px), and its weight is tiny: it stays float."""
        return self.op == "Conv" and 1 < self.groups < self.out_channels


# onnx's shape inference knows no ONNX Runtime contrib op (GroupQueryAttention, SkipSimplifiedLayerNormalization:
# export/gqa.py), so tensors after one have no inferred type; every float tensor in our graphs is fp32.
UNTYPED_ARE_FLOAT = {"DefaultTensorType": onnx.TensorProto.FLOAT}


def weight_nodes(model: onnx.ModelProto) -> list[WeightNode]:
    """The graph's MatMul/Conv/Gather nodes whose weight is a float initializer, in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type not in WEIGHT_OPS:
            continue
        w = n.input[0] if n.op_type == "Gather" else n.input[1]
        t = inits.get(w)
        if t is not None and t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2:
            groups = next((a.i for a in n.attribute if a.name == "group"), 1)
            out.append(WeightNode(n.name, n.op_type, w, int(np.prod(t.dims)), groups, int(t.dims[0])))
    return out


def allowed(node: WeightNode) -> tuple[str, ...]:
    """The levels a node can take here."""
    if node.op == "Conv":
        return ("fp32", "fp16") if node.mixing_groups else ("fp32", "fp16", "int8", "int8-static")
    if node.op == "Gather":  # embeddings: weight-only; a static QDQ Gather gains nothing over 4-bit
        return ("fp32", "fp16", "int8", "int4")
    return LEVELS


def estimate_bytes(node: WeightNode, level: str, opts: Options) -> float:
    """Bytes a node's weight takes at a level (scales included), to rank choices before measuring."""
    n = node.params
    if level == "int4":
        per_block = 4 + (0 if opts.symmetric else 0.5)  # fp32 scale (+ 4-bit zero point) per block
        return n / 2 + n / opts.block_size * per_block
    return n * BITS[level] / 8


@contextlib.contextmanager
def quiet():
    """onnxruntime's quantizers log at INFO/WARNING on the root logger; keep the user's console clean."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401  (its import calls basicConfig)

            root.setLevel(logging.ERROR)
            yield
    finally:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)


def quantize(model: onnx.ModelProto, levels: dict[str, str], opts: Options,
             calibration: Callable[[], Iterable[dict[str, np.ndarray]]] | None = None,
             cache: Path | None = None, copy: bool = True) -> onnx.ModelProto:
    """Quantize each weight node named in `levels` (node name -> level); others stay fp32.

    `calibration()` yields feeds for int8-static; `cache` keeps its activation ranges between calls.
    copy=False: `model` may be edited (onnxruntime's quantizers edit the proto they are given) -- for a
    caller that drops it afterwards, one copy of the weights less.
    """
    if opts.target not in TARGETS:
        raise QuantError(f"unknown target {opts.target!r} (one of {', '.join(TARGETS)})")
    if opts.int8_range not in INT8_RANGES:
        raise QuantError(f"unknown int8 range {opts.int8_range!r} (one of {', '.join(INT8_RANGES)})")
    reduce_range = opts.int8_range == "portable"
    nodes = {n.name: n for n in weight_nodes(model)}
    for name, level in levels.items():
        if name not in nodes:
            raise QuantError(f"no weight node {name!r} in this graph")
        if level not in allowed(nodes[name]):
            raise QuantError(f"{nodes[name].op} node {name!r} cannot be {level} (allowed: {allowed(nodes[name])})")
    by = {lv: [n for n, v in levels.items() if v == lv] for lv in LEVELS}
    if by["fp16"] and len(by["fp16"]) != len(nodes):
        raise QuantError("fp16 applies to a whole graph (every weight node), not to some of its nodes")
    if copy:
        source, model = model, onnx.ModelProto()
        model.CopyFrom(source)  # onnxruntime's quantizers edit the proto they are given
    if any(nodes[n].op == "Conv" for n in by["int8-static"] + by["int8"]):
        fold_conv_scales(model)
    with quiet(), tempfile.TemporaryDirectory(prefix="edgevlm-quant-") as tmp:
        tmp = Path(tmp)
        if by["fp16"]:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            return convert_float_to_float16(model, keep_io_types=True)
        if by["int4"]:
            model = _int4(model, set(by["int4"]), nodes, opts)
        if by["int8-static"]:
            if calibration is None:
                raise QuantError("int8-static needs calibration data")
            model = _static(model, by["int8-static"], calibration, cache or tmp / "ranges.json", tmp, reduce_range)
            if opts.target != "npu":
                lut_gelu(model)
        rows = [n for n in by["int8"] if opts.target != "npu" and nodes[n].op == "MatMul" and _one_row(model, n)]
        if rows:
            model = _nbits(model, set(rows), nodes, 8, ROW_BLOCK, True, opts.accuracy_level)
            by["int8"] = [n for n in by["int8"] if n not in rows]
        # dynamic int8 MatMuls run on the u8s8 GEMM that saturates without VNNI; ConvInteger does not (its
        # kernel widens to 16 bits first: tests/test_int8_isa.py), so convolutions keep 8-bit weights
        for part in ([n for n in by["int8"] if nodes[n].op != "Conv"], [n for n in by["int8"] if nodes[n].op == "Conv"]):
            if part:
                model = _dynamic(model, part, nodes, reduce_range and nodes[part[0]].op != "Conv", tmp)
    return model


def _dynamic(model, names: list[str], nodes: dict[str, WeightNode], reduce_range: bool, tmp: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp / "in8.onnx", tmp / "out8.onnx"
    onnx.save(model, src)
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, nodes_to_quantize=names,
                     op_types_to_quantize=sorted({nodes[n].op for n in names}), reduce_range=reduce_range,
                     per_channel=reduce_range, extra_options=UNTYPED_ARE_FLOAT)
    model = onnx.load(dst)
    if reduce_range:
        _drop_zero_weight_zero_points(model)
    return model


def _drop_zero_weight_zero_points(model: onnx.ModelProto) -> None:
    """7-bit weights are quantized per output channel, symmetric: their zero points are all 0. A MatMulInteger
    given none computes the same; given a per-column vector, onnxruntime's fused kernel takes a slower path
    (measured up to 1.5x a decode step's MatMuls). Drop them."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type == "MatMulInteger" and len(n.input) == 4 and n.input[3] in inits:
            if not numpy_helper.to_array(inits[n.input[3]]).any():
                del n.input[3]
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    live = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(live)


def _one_row(model: onnx.ModelProto, name: str) -> bool:
    """Whether node `name`'s output is a graph output of fixed shape [1, ..., 1, N]: one row per run (a
    decoder's logits of the last position), a matrix-vector product however long the prompt."""
    node = next(n for n in model.graph.node if n.name == name)
    for out in model.graph.output:
        if out.name == node.output[0]:
            dims = out.type.tensor_type.shape.dim
            return len(dims) >= 2 and all(d.HasField("dim_value") and d.dim_value == 1 for d in dims[:-1])
    return False


def _int4(model, names: set[str], nodes: dict[str, WeightNode], opts: Options) -> onnx.ModelProto:
    return _nbits(model, names, nodes, 4, opts.block_size, opts.symmetric, opts.accuracy_level)


def _nbits(model, names: set[str], nodes: dict[str, WeightNode], bits: int, block_size: int, symmetric: bool,
           accuracy_level: int) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    ops = tuple(sorted({nodes[n].op for n in names}))
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                             accuracy_level=accuracy_level, op_types_to_quantize=ops,
                             nodes_to_exclude=[n.name for n in model.graph.node if n.name not in names])
    q.process()
    out = q.model.model
    left = {n.name for n in out.graph.node} & names
    if left:
        raise QuantError(f"onnxruntime left {len(left)} node(s) unquantized at {bits} bits: {sorted(left)[:3]}")
    return out


def _static(model, names: list[str], calibration, cache: Path, tmp: Path, reduce_range: bool) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calibration())

        def get_next(self):
            return next(self.it, None)

    src, dst = tmp / "in_s.onnx", tmp / "out_s.onnx"
    onnx.save(model, src)
    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=names,
                    reduce_range=reduce_range, calibration_cache_path=cache, extra_options=UNTYPED_ARE_FLOAT)
    return onnx.load(dst)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts

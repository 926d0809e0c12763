"""Graph rewrites that make quantized graphs fast on onnxruntime's CPU kernels (quant.graphs applies them):
per-channel scales folded into convolutions, and Gelu between quantized nodes computed in uint8."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def _index(g: onnx.GraphProto) -> tuple[dict, dict[str, list]] | None:
    """(initializers by name, the nodes reading each tensor) of a graph the rewrites below may edit; None for
    a graph with control flow, whose subgraphs may read any tensor unseen here."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return None
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    return {t.name: t for t in g.initializer}, users


def fold_conv_scales(model: onnx.ModelProto) -> int:
    """Fold a constant per-channel Mul or Add that is the only consumer of a Conv's output into the Conv's
    weight and bias, in place; returns how many were folded.

    onnxruntime does this itself for a float graph, but not once quantization has put Q/DQ pairs between
    the two: FastViT's layer scales then ran as 51 separate Muls in float between int8 convolutions. The
    Conv keeps its name (the levels given to `quantize` name it)."""
    g = model.graph
    index = _index(g)
    if index is None:
        return 0
    inits, users = index
    outputs = {o.name for o in g.output}
    overridable = {i.name for i in g.input}  # an initializer that is also an input can be fed at run time
    dead, folded = set(), 0
    for conv in list(g.node):
        if conv.op_type != "Conv" or conv.input[1] not in inits or conv.input[1] in overridable:
            continue
        if inits[conv.input[1]].data_type != onnx.TensorProto.FLOAT:
            continue
        if len(conv.input) > 2 and conv.input[2] and (conv.input[2] not in inits or conv.input[2] in overridable):
            continue  # a bias computed at run time (or fed) cannot take the fold
        while True:
            after = users.get(conv.output[0], [])
            if conv.output[0] in outputs or len(after) != 1 or after[0].op_type not in ("Mul", "Add"):
                break
            op = after[0]
            const = [i for i in op.input if i != conv.output[0]]
            if (len(const) != 1 or const[0] not in inits or const[0] in overridable
                    or inits[const[0]].data_type != onnx.TensorProto.FLOAT):
                break
            w = numpy_helper.to_array(inits[conv.input[1]])
            c = numpy_helper.to_array(inits[const[0]])
            out_ch = w.shape[0]
            if c.size not in (1, out_ch) or (c.size == out_ch and c.shape[-2:] != (1, 1)) or c.ndim > 4:
                break  # not one value per output channel
            c = np.broadcast_to(c.reshape(-1), (out_ch,)).astype(np.float32)
            has_bias = len(conv.input) > 2 and conv.input[2] != ""
            b = numpy_helper.to_array(inits[conv.input[2]]) if has_bias else np.zeros(out_ch, np.float32)
            if op.op_type == "Mul":
                w, b = w * c.reshape((-1,) + (1,) * (w.ndim - 1)), b * c
            else:
                b = b + c
            names = []
            for arr, role in ((w, "weight"), (b, "bias")):
                name = f"{conv.name}.folded_{role}.{folded}"
                g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr, np.float32), name))
                inits[name] = g.initializer[-1]
                names.append(name)
            del conv.input[1:]
            conv.input.extend(names)
            conv.output[0] = op.output[0]
            dead.add(id(op))
            folded += 1
    if dead:
        keep = [n for n in g.node if id(n) not in dead]
        del g.node[:]
        g.node.extend(keep)
        used = {i for n in g.node for i in n.input} | outputs
        live = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(live)
    return folded


# x·σ(αx) nearest to the exact (erf) Gelu in max norm: max |Δ| 0.0139 at |x| ≈ 2.3 (α = 1.702, the usual
# constant, gives 0.0203); the 1/255 step of the quantized σ adds at most |x|/510.
GELU_ALPHA = 1.773


def _scalar(inits: dict, name: str, dtype) -> np.ndarray | None:
    t = inits.get(name)
    if t is None or t.dims:  # per-tensor only: a scalar initializer
        return None
    a = numpy_helper.to_array(t)
    return a if a.dtype == dtype else None


def lut_gelu(model: onnx.ModelProto) -> int:
    """Replace each DequantizeLinear -> Gelu -> QuantizeLinear (uint8, per-tensor) by onnxruntime's CPU kernels
    QLinearSigmoid and QLinearMul: Gelu(x) ~ x·σ(GELU_ALPHA·x), computed on the uint8 values (σ by a 256-entry
    table, scaled input folded into its input scale), in place; returns how many were replaced.

    onnxruntime has no quantized Gelu: between two int8 convolutions (FastViT's ConvMLP) it ran as DQ -> float
    Gelu -> Q, 18 bytes of memory traffic per element against 5, 0.24 s of FastViTHD's 1.28 s at 1024 px. The
    error is below half a quantization step of any activation range wider than ±3.5. Only the CPU provider
    has these kernels (an NPU provider hands them back to the CPU): Options.target "npu" keeps plain QDQ."""
    g = model.graph
    index = _index(g)
    if index is None:
        return 0
    inits, users = index
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    replace, dead = {}, set()
    for gelu in g.node:
        if gelu.op_type != "Gelu" or gelu.domain not in ("", "ai.onnx", "com.microsoft"):
            continue
        dq, after = producer.get(gelu.input[0]), users.get(gelu.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(after) != 1 or after[0].op_type != "QuantizeLinear":
            continue
        q = after[0]
        if gelu.output[0] in outputs or dq.output[0] in outputs or len(dq.input) < 3 or len(q.input) < 3:
            continue
        x_scale, x_zp = _scalar(inits, dq.input[1], np.float32), _scalar(inits, dq.input[2], np.uint8)
        y_scale, y_zp = _scalar(inits, q.input[1], np.float32), _scalar(inits, q.input[2], np.uint8)
        if x_scale is None or x_zp is None or y_scale is None or y_zp is None:
            continue
        base = gelu.name or gelu.output[0]
        names = {k: f"{base}.lut_{k}" for k in ("x_scale", "s_scale", "s_zp", "sigmoid")}
        g.initializer.extend([numpy_helper.from_array(np.array(x_scale * GELU_ALPHA, np.float32), names["x_scale"]),
                              numpy_helper.from_array(np.array(1 / 255, np.float32), names["s_scale"]),
                              numpy_helper.from_array(np.array(0, np.uint8), names["s_zp"])])
        sig = onnx.helper.make_node("QLinearSigmoid", [dq.input[0], names["x_scale"], dq.input[2], names["s_scale"],
                                                      names["s_zp"]], [names["sigmoid"]], name=f"{base}.sigmoid",
                                    domain="com.microsoft")
        mul = onnx.helper.make_node("QLinearMul", [dq.input[0], dq.input[1], dq.input[2], names["sigmoid"],
                                                  names["s_scale"], names["s_zp"], q.input[1], q.input[2]],
                                    [q.output[0]], name=f"{base}.mul", domain="com.microsoft")
        replace[id(gelu)] = [sig, mul]
        dead |= {id(gelu), id(q)} | ({id(dq)} if len(users[dq.output[0]]) == 1 else set())
    if not replace:
        return 0
    nodes = [m for n in g.node if id(n) in replace or id(n) not in dead for m in replace.get(id(n), [n])]
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return len(replace)

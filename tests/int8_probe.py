"""Run int8 graphs quantized both ways on this CPU (or an emulated one) and print what they computed, as JSON.

    python tests/int8_probe.py DIR          # DIR holds the graphs `write(DIR)` made (and the fp32 references)

The graphs are quantized once, on the host (onnxruntime's quantizers are plain Python, the same everywhere);
only running them depends on the CPU. tests/test_int8_isa.py runs this under `qemu-x86_64 -cpu Haswell`, an
x86 CPU with AVX2 and no AVX-512/VNNI, to see what a laptop without VNNI computes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

K, N = 64, 16


def _graphs():
    """A MatMul and a 1x1 Conv whose inputs and weights drive vpmaddubsw's int16 pair sums to their limit:
    eight large same-sign weights in a row against eight large activations."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, N)) * 0.1).astype(np.float32)
    w[:8] = 1.0
    mm = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm",
                           [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", K])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", N])],
                           [numpy_helper.from_array(w, "w")])
    conv = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "conv",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K, 4, 4])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N, 4, 4])],
                             [numpy_helper.from_array(np.ascontiguousarray(w.T[:, :, None, None]), "w")])
    make = lambda g: helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # noqa: E731
    x = np.full((1, 4, K), -0.2, np.float32)
    x[..., :8] = 1.0
    xc = np.ascontiguousarray(np.broadcast_to(x[0, :1].T[None, :, :, None], (1, K, 4, 4)))
    return {"matmul": (make(mm), x), "conv": (make(conv), xc)}


def write(root: Path) -> None:
    """Quantize each probe graph int8 (dynamic) and int8-static with both weight ranges; save graphs + inputs."""
    import onnx

    from edgevlm.quant.graphs import Options, quantize, weight_nodes

    root.mkdir(parents=True, exist_ok=True)
    for name, (model, x) in _graphs().items():
        np.save(root / f"{name}.x.npy", x)
        onnx.save(model, root / f"{name}.fp32.onnx")
        for level in ("int8", "int8-static"):
            for rng in ("portable", "full"):
                levels = {n.name: level for n in weight_nodes(model)}
                q = quantize(model, levels, Options(target="npu", int8_range=rng),
                             calibration=lambda x=x: iter([{"x": x}]))
                onnx.save(q, root / f"{name}.{level}.{rng}.onnx")


def run(root: Path) -> dict:
    import onnxruntime as ort

    from edgevlm.cpu import isa

    out = {"isa": isa(), "rel_err": {}}
    for fp32 in sorted(root.glob("*.fp32.onnx")):
        name = fp32.name.split(".")[0]
        x = np.load(root / f"{name}.x.npy")
        ref = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        for q in sorted(root.glob(f"{name}.int8*.onnx")):
            y = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            out["rel_err"][q.name[:-5]] = float(np.abs(y - ref).max() / np.abs(ref).max())
    return out


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]))))

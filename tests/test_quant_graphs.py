"""quant.graphs on hand-built graphs: folding per-channel scales into convolutions, and grouped convolutions
that stay float under int8-static."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgevlm.quant.api import resolve
from edgevlm.quant.rewrites import GELU_ALPHA, fold_conv_scales, lut_gelu
from edgevlm.quant.graphs import (ROW_BLOCK, Options, QuantError, allowed,
                                  quantize, weight_nodes)

C = 8


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def graph(per_width_mul: bool = False, scale_is_input: bool = False, conv_out_is_output: bool = False,
          bias_is_computed: bool = False):
    """x -> Conv 1x1 (4->8) -> Mul(layer scale) -> Add(shift) -> Conv 3x3 group 4 (8->8, 2 per group)
    -> Conv 3x3 depthwise (group 8) -> y."""
    rng = np.random.default_rng(0)
    inits = [_init("w1", rng.standard_normal((C, 4, 1, 1))), _init("b1", rng.standard_normal(C)),
             _init("w2", rng.standard_normal((C, 2, 3, 3))), _init("w3", rng.standard_normal((C, 1, 3, 3))),
             _init("shift", rng.standard_normal((1, C, 1, 1)))]
    scale = rng.standard_normal((C,) if per_width_mul else (C, 1, 1)) + 2
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, C, C])]
    if scale_is_input:
        inputs.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, list(scale.shape)))
    inits.append(_init("scale", scale))
    bias = "b1"
    nodes = []
    if bias_is_computed:
        nodes.append(helper.make_node("Identity", ["b1"], ["b1_run"], name="bias_at_run_time"))
        bias = "b1_run"
    nodes += [helper.make_node("Conv", ["x", "w1", bias], ["c1"], name="dense"),
              helper.make_node("Mul", ["c1", "scale"], ["m"], name="layer_scale"),
              helper.make_node("Add", ["shift", "m"], ["a"], name="shift_add"),
              helper.make_node("Conv", ["a", "w2"], ["c2"], name="grouped", group=4, pads=[1, 1, 1, 1]),
              helper.make_node("Conv", ["c2", "w3"], ["y"], name="depthwise", group=C, pads=[1, 1, 1, 1])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, C, C])]
    if conv_out_is_output:
        outputs.append(helper.make_tensor_value_info("c1", TensorProto.FLOAT, [1, C, C, C]))
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def run(model, x):
    """Without onnxruntime's own graph optimizations, which would fuse Conv+Mul themselves."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


def test_fold_conv_scales_folds_mul_and_add_and_keeps_the_output():
    model = graph()
    x = np.random.default_rng(1).standard_normal((1, 4, C, C)).astype(np.float32)
    ref = run(model, x)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert fold_conv_scales(folded) == 2
    onnx.checker.check_model(folded)
    ops = [n.op_type for n in folded.graph.node]
    assert ops == ["Conv", "Conv", "Conv"], ops
    assert [n.name for n in folded.graph.node][0] == "dense"  # levels name the Conv: it keeps its name
    assert {"w1", "b1", "scale", "shift"}.isdisjoint(t.name for t in folded.graph.initializer)  # no dead weights
    diff = float(np.abs(run(folded, x) - ref).max())
    print(f"folded vs original max |diff| {diff:.2e} (|y| max {np.abs(ref).max():.1f})")
    assert diff < 1e-4


@pytest.mark.parametrize("case", ["per_width_mul", "scale_is_input", "conv_out_is_output", "bias_is_computed"])
def test_fold_conv_scales_leaves_what_is_not_a_per_channel_constant(case):
    model = graph(**{case: True})
    x = np.random.default_rng(2).standard_normal((1, 4, C, C)).astype(np.float32)
    ref = run(model, x)
    assert fold_conv_scales(model) == 0
    assert [n.op_type for n in model.graph.node].count("Mul") == 1
    assert np.array_equal(run(model, x), ref)


def test_grouped_conv_that_mixes_channels_stays_float_under_int8_static():
    model = graph()
    nodes = {n.name: n for n in weight_nodes(model)}
    assert nodes["grouped"].mixing_groups and not nodes["depthwise"].mixing_groups and not nodes["dense"].mixing_groups
    assert "int8-static" not in allowed(nodes["grouped"]) and "int8" not in allowed(nodes["grouped"])
    plan, labels = resolve({"vision": model}, "int8-static", {})
    assert plan["vision"] == {"dense": "int8-static", "depthwise": "int8-static"} and labels["vision"] == "int8-static"
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((1, 4, C, C)).astype(np.float32)} for _ in range(4)]
    q = quantize(model, plan["vision"], Options(), calibration=lambda: iter(feeds))
    inits = {t.name: t for t in q.graph.initializer}
    convs = {n.name: n for n in q.graph.node if n.op_type == "Conv"}
    produced = {o: n for n in q.graph.node for o in n.output}
    assert convs["grouped"].input[1] in inits and inits[convs["grouped"].input[1]].data_type == TensorProto.FLOAT
    for name in ("dense", "depthwise"):  # their weights now come out of a DequantizeLinear of int8
        assert produced[convs[name].input[1]].op_type == "DequantizeLinear"
    assert not any(n.op_type == "Mul" for n in q.graph.node)  # the layer scale went into the dense conv
    x = feeds[0]["x"]
    ref, got = run(graph(), x), run(q, x)
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"int8-static vs fp32 max |diff| relative to max |y|: {rel:.3f}")
    assert rel < 0.1


def gelu_graph():
    """x -> Conv 1x1 (4->8) -> Gelu -> Conv 1x1 (8->8) -> y: FastViT's ConvMLP in small."""
    rng = np.random.default_rng(4)
    inits = [_init("w1", rng.standard_normal((C, 4, 1, 1))), _init("b1", rng.standard_normal(C)),
             _init("w2", rng.standard_normal((C, C, 1, 1)) / 3)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Gelu", ["h"], ["a"], name="act"),
             helper.make_node("Conv", ["a", "w2"], ["y"], name="fc2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, C, C])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, C, C])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)


def run_optimized(model, feeds, names=("y",)):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(list(names), feeds)


def test_lut_gelu_matches_the_sigmoid_form_on_every_uint8_value():
    """DQ -> Gelu -> Q alone, fed all 256 uint8 values: after lut_gelu each output is x·σ(1.773x) rounded to the
    output's step (one step of slack for the table's own rounding), and within the stated bound of erf-Gelu."""
    x_scale, x_zp, y_scale, y_zp = 0.05, 128, 0.04, 30
    inits = [numpy_helper.from_array(np.array(v, dt), n) for v, dt, n in
             ((x_scale, np.float32, "xs"), (x_zp, np.uint8, "xz"), (y_scale, np.float32, "ys"), (y_zp, np.uint8, "yz"))]
    nodes = [helper.make_node("DequantizeLinear", ["q", "xs", "xz"], ["x"], name="dq"),
             helper.make_node("Gelu", ["x"], ["g"], name="act"),
             helper.make_node("QuantizeLinear", ["g", "ys", "yz"], ["gq"], name="q"),
             helper.make_node("DequantizeLinear", ["gq", "ys", "yz"], ["y"], name="dq_out")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("q", TensorProto.UINT8, [256])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    q = np.arange(256, dtype=np.uint8)
    exact = run_optimized(model, {"q": q})[0]
    assert lut_gelu(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["QLinearSigmoid", "QLinearMul", "DequantizeLinear"]
    got = run_optimized(model, {"q": q})[0]
    x = (q.astype(np.float64) - x_zp) * x_scale
    sig_form = np.clip(np.round(x / (1 + np.exp(-GELU_ALPHA * x)) / y_scale) + y_zp, 0, 255)
    steps = np.abs(np.round(got / y_scale + y_zp) - sig_form)
    erf_gap = float(np.abs(got - exact).max())
    print(f"lut vs x*sigmoid({GELU_ALPHA}x): max {steps.max():.0f} step(s); vs QDQ Gelu: max |diff| {erf_gap:.4f} "
          f"(output step {y_scale})")
    assert steps.max() <= 1
    assert erf_gap <= 0.0139 + np.abs(x).max() / 510 + 2 * y_scale


@pytest.mark.parametrize("target", ["cpu", "npu"])
def test_int8_static_gelu_per_target(target):
    model = gelu_graph()
    plan, _ = resolve({"vision": model}, "int8-static", {})
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.standard_normal((1, 4, C, C)).astype(np.float32)} for _ in range(8)]
    q = quantize(model, plan["vision"], Options(target=target), calibration=lambda: iter(feeds))
    ops = {n.op_type for n in q.graph.node}
    contrib = {n.op_type for n in q.graph.node if n.domain == "com.microsoft"}
    if target == "cpu":
        assert contrib == {"QLinearSigmoid", "QLinearMul"} and "Gelu" not in ops
    else:  # plain QDQ: only standard ops, what NPU providers take
        assert not contrib and "Gelu" in ops
    ref = run_optimized(model, feeds[0])[0]
    rel = float(np.abs(run_optimized(q, feeds[0])[0] - ref).max() / np.abs(ref).max())
    print(f"int8-static target {target} vs fp32 max |diff| relative to max |y|: {rel:.4f}")
    assert rel < 0.05


def test_unknown_target_is_a_quant_error():
    model = gelu_graph()
    with pytest.raises(QuantError, match="unknown target"):
        quantize(model, {"fc1": "int8-static"}, Options(target="gpu"), calibration=lambda: iter([]))


def head_graph(rows_out: int):
    """h [1, S, 32] -> MatMul (hidden, 32 x 64) -> Slice the last position -> MatMul (head, 32 x 256) -> logits
    [1, rows_out, 256] (rows_out 1: a decoder's logits of the last position; else a symbolic row count)."""
    rng = np.random.default_rng(5)
    inits = [_init("w_hidden", rng.standard_normal((32, 32)) * 0.2), _init("w_head", rng.standard_normal((32, 256))),
             numpy_helper.from_array(np.array([-1], np.int64), "start"),
             numpy_helper.from_array(np.array([2**62], np.int64), "end"),
             numpy_helper.from_array(np.array([1], np.int64), "axis")]
    last = [helper.make_node("Slice", ["hid", "start", "end", "axis"], ["last"], name="last")] if rows_out == 1 else []
    nodes = [helper.make_node("MatMul", ["h", "w_hidden"], ["hid"], name="hidden")] + last + [
        helper.make_node("MatMul", ["last" if last else "hid", "w_head"], ["logits"], name="head")]
    out_shape = [1, 1, 256] if rows_out == 1 else [1, "S", 256]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "S", 32])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("target,rows_out,head_op", [("cpu", 1, "MatMulNBits"), ("npu", 1, "MatMulInteger"),
                                                     ("cpu", 0, "MatMulInteger")])
def test_int8_one_row_matmul_becomes_8_bit_matmulnbits_on_cpu(target, rows_out, head_op):
    """int8 (dynamic) turns a MatMul that computes one row per run (a decoder's lm_head after the last-position
    slice) into 8-bit MatMulNBits for target cpu — the faster matrix-vector kernel; npu keeps the plain form,
    and a MatMul of many rows stays MatMulInteger."""
    model = head_graph(rows_out)
    q = quantize(model, {n.name: "int8" for n in weight_nodes(model)}, Options(target=target))
    ops = [n.op_type for n in q.graph.node]
    nbits = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == (head_op == "MatMulNBits")
    assert ops.count("MatMulInteger") == 2 - len(nbits)  # the hidden MatMul stays dynamic int8 in every case
    # 7-bit weights per output channel, symmetric: no zero points (the fused kernel's fast path)
    assert all(len(n.input) == 3 for n in q.graph.node if n.op_type == "MatMulInteger")
    if nbits:
        attrs = {a.name: helper.get_attribute_value(a) for a in nbits[0].attribute}
        assert attrs["bits"] == 8 and attrs["block_size"] == ROW_BLOCK
    h = np.random.default_rng(6).standard_normal((1, 5, 32)).astype(np.float32)
    run_ = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        ["logits"], {"h": h})[0]
    want, got = run_(model), run_(q)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"int8 {target}, rows {rows_out or 'S'}: max |diff| {err:.4f} of max |logit|")
    assert got.shape == want.shape and err < 0.03

"""A decoder graph written directly in ONNX on ONNX Runtime's fused CPU kernels, for Llama/Qwen2-style models.

The torch.onnx export of a transformers decoder is correct but slow to run: every step expands the grouped KV
heads to all query heads, transposes and concatenates the cache, and builds masks out of a dozen small ops
(a third of a decode step on Qwen2-0.5B). This writes the same network with

    SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization   (RMSNorm, fused with the residual add)
    MatMul over packed q|k|v and packed gate|up weights              (two GEMMs a layer instead of five)
    com.microsoft.GroupQueryAttention                                (rotary, causal mask, GQA and the KV concat
                                                                       in one kernel, the cache in BNSH as before)

and the same inputs and outputs as `graphs.export_decoder` (inputs_embeds, attention_mask, position_ids, past and
present k/v per layer; logits of the last position), so the runtime, the caches and `edgevlm quant` (MatMulNBits
on these MatMuls) take it unchanged. Supported: a body whose layers look like transformers' Llama/Qwen2 (RMSNorm,
SiLU-gated MLP, rotary positions with precomputed frequencies); anything else returns None and the exporter
falls back to torch.onnx. The exporter's parity check against transformers covers this graph like any other.

Positions: GroupQueryAttention rotates q and k at (number of ones in attention_mask) - S + i, which is what the
runtime feeds (position_ids = past + i); position_ids stays an input so every decoder graph has the same ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .graphs import INLINE_LIMIT, PAST, PRESENT, kv_dims, strip_metadata

_ROPE_OK = {"default", "linear", "llama3", "yarn"}  # frequencies fixed at export time (dynamic NTK is not)


def supported(body, text_config) -> str | None:
    """None if `body` can be written by this module, else the reason it cannot."""
    layers = getattr(body, "layers", None)
    if layers is None or not hasattr(body, "norm") or not hasattr(body, "rotary_emb"):
        return "not a Llama/Qwen2-style decoder body"
    for layer in layers:
        att, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if att is None or mlp is None or not all(hasattr(att, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "attention is not q/k/v/o projections"
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return "MLP is not gate/up/down"
        if getattr(att, "q_norm", None) is not None or getattr(att, "sliding_window", None):
            return "q/k norms or sliding-window attention"
        if getattr(att.o_proj, "bias", None) is not None or any(
                getattr(getattr(mlp, n), "bias", None) is not None for n in ("gate_proj", "up_proj", "down_proj")):
            return "biases outside q/k/v"
    if getattr(text_config, "hidden_act", "silu") != "silu":
        return f"activation {text_config.hidden_act}"
    if getattr(body.rotary_emb, "rope_type", "default") not in _ROPE_OK:
        return f"rope type {body.rotary_emb.rope_type}"
    heads, head_dim = kv_dims(text_config)
    if text_config.num_attention_heads % heads or head_dim % 16:
        return "head layout (GroupQueryAttention wants head_dim a multiple of 16)"
    return None


class _Graph:
    """Nodes and initializers under construction, with generated names."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str | None = None,
           outputs: list[str] | None = None, **attrs) -> list[str]:
        from onnx import helper

        self.n += 1
        base = name or f"{op_type}_{self.n}"
        outs = outputs or [f"{base}/out{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain or None, **attrs))
        return outs


def _w(linear) -> np.ndarray:  # nn.Linear weight [out, in] -> MatMul's [in, out], fp32
    return linear.weight.detach().float().numpy().T


def _rope_cache(body, head_dim: int, max_pos: int) -> tuple[np.ndarray, np.ndarray]:
    rot = body.rotary_emb
    inv = rot.inv_freq.detach().double().numpy()  # [head_dim / 2], scaled as the rope type wants
    scale = float(getattr(rot, "attention_scaling", 1.0))
    ang = np.arange(max_pos, dtype=np.float64)[:, None] * inv[None, :]
    return (np.cos(ang) * scale).astype(np.float32), (np.sin(ang) * scale).astype(np.float32)


def build(body, head, text_config, output: str = "logits"):
    """-> the onnx ModelProto of the decoder (weights inline). output "logits": `head` is the lm_head, applied to
    the last position only; "fused": `head` is LLaVA-Mini's fuse_out, the output inputs_embeds + head(hidden)
    at every position (the pre-fusion graph)."""
    from onnx import TensorProto, helper

    n_layers, d = text_config.num_hidden_layers, text_config.hidden_size
    kv_heads, head_dim = kv_dims(text_config)
    heads = text_config.num_attention_heads
    eps = float(text_config.rms_norm_eps)
    max_pos = int(getattr(text_config, "max_position_embeddings", 4096))
    g = _Graph()

    # sequence lengths for GroupQueryAttention: seqlens_k = total - 1 (int32 [1]), total (int32 scalar)
    ones = g.op("ReduceSum", ["attention_mask", g.const("axes1", np.array([1], np.int64))], keepdims=0)[0]
    seqlens = g.op("Cast", [g.op("Sub", [ones, g.const("one64", np.array(1, np.int64))])[0]], to=TensorProto.INT32)[0]
    shape = g.op("Shape", ["attention_mask"])[0]
    total = g.op("Cast", [g.op("Gather", [shape, g.const("idx1", np.array(1, np.int64))], axis=0)[0]],
                 to=TensorProto.INT32)[0]
    cos, sin = _rope_cache(body, head_dim, max_pos)
    cos, sin = g.const("cos_cache", cos), g.const("sin_cache", sin)

    x, residual = "inputs_embeds", None
    normed = g.op("SimplifiedLayerNormalization",
                  [x, g.const("l0.input_norm", body.layers[0].input_layernorm.weight.detach().float().numpy())],
                  axis=-1, epsilon=eps)[0]
    residual = x
    for i, layer in enumerate(body.layers):
        att, mlp = layer.self_attn, layer.mlp
        qkv_w = np.concatenate([_w(att.q_proj), _w(att.k_proj), _w(att.v_proj)], axis=1)
        qkv = g.op("MatMul", [normed, g.const(f"l{i}.qkv.weight", qkv_w)], name=f"l{i}.qkv")[0]
        if att.q_proj.bias is not None:
            bias = np.concatenate([p.bias.detach().float().numpy() if p.bias is not None else
                                   np.zeros(p.out_features, np.float32) for p in (att.q_proj, att.k_proj, att.v_proj)])
            qkv = g.op("Add", [qkv, g.const(f"l{i}.qkv.bias", bias)])[0]
        attn = g.op("GroupQueryAttention",
                    [qkv, "", "", PAST % (i, "key"), PAST % (i, "value"), seqlens, total, cos, sin],
                    outputs=[f"l{i}.attn", PRESENT % (i, "key"), PRESENT % (i, "value")], domain="com.microsoft",
                    name=f"l{i}.gqa", num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0,
                    scale=float(getattr(att, "scaling", head_dim ** -0.5)))[0]
        o = g.op("MatMul", [attn, g.const(f"l{i}.o.weight", _w(att.o_proj))], name=f"l{i}.o")[0]
        normed, _, _, residual = g.op(
            "SkipSimplifiedLayerNormalization",
            [o, residual, g.const(f"l{i}.post_norm", layer.post_attention_layernorm.weight.detach().float().numpy())],
            outputs=[f"l{i}.mlp_in", "", "", f"l{i}.resid_mid"], domain="com.microsoft", epsilon=eps)
        gu_w = np.concatenate([_w(mlp.gate_proj), _w(mlp.up_proj)], axis=1)
        gu = g.op("MatMul", [normed, g.const(f"l{i}.gate_up.weight", gu_w)], name=f"l{i}.gate_up")[0]
        gate, up = g.op("Split", [gu], n_out=2, axis=-1, num_outputs=2)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])[0]])[0], up])[0]
        down = g.op("MatMul", [act, g.const(f"l{i}.down.weight", _w(mlp.down_proj))], name=f"l{i}.down")[0]
        if i + 1 < n_layers:
            nxt = body.layers[i + 1].input_layernorm.weight.detach().float().numpy()
            normed, _, _, residual = g.op("SkipSimplifiedLayerNormalization",
                                          [down, residual, g.const(f"l{i + 1}.input_norm", nxt)],
                                          outputs=[f"l{i + 1}.attn_in", "", "", f"l{i}.resid_out"],
                                          domain="com.microsoft", epsilon=eps)
    if output == "logits":  # only the last position reaches the final norm and the vocabulary projection
        start, end, ax = (g.const("last_start", np.array([-1], np.int64)),
                          g.const("last_end", np.array([2 ** 62], np.int64)), g.const("seq_axis", np.array([1], np.int64)))
        down, residual = g.op("Slice", [down, start, end, ax])[0], g.op("Slice", [residual, start, end, ax])[0]
    final = g.op("SkipSimplifiedLayerNormalization",
                 [down, residual, g.const("final_norm", body.norm.weight.detach().float().numpy())],
                 outputs=["final_hidden"], domain="com.microsoft", epsilon=eps)[0]
    if output == "logits":
        g.op("MatMul", [final, g.const("lm_head.weight", _w(head))], outputs=["logits"], name="lm_head")
        out_shape = [1, 1, head.out_features]
    else:
        y = g.op("MatMul", [final, g.const("fuse_out.weight", _w(head))], name="fuse_out")[0]
        if head.bias is not None:
            y = g.op("Add", [y, g.const("fuse_out.bias", head.bias.detach().float().numpy())])[0]
        g.op("Add", ["inputs_embeds", y], outputs=[output])
        out_shape = [1, "seq", d]

    f32 = TensorProto.FLOAT
    kv_shape = [1, kv_heads, "past", head_dim]
    inputs = [helper.make_tensor_value_info("inputs_embeds", f32, [1, "seq", d]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "total"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "seq"])]
    outputs = [helper.make_tensor_value_info(output, f32, out_shape)]
    for i in range(n_layers):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(PAST % (i, kv), f32, kv_shape))
            outputs.append(helper.make_tensor_value_info(PRESENT % (i, kv), f32, [1, kv_heads, "total", head_dim]))
    graph = helper.make_graph(g.nodes, "edgevlm_gqa_decoder", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="edgevlm")
    model.ir_version = 9
    strip_metadata(model)
    return model


def export_decoder(body, head, text_config, path: Path, output: str = "logits") -> list[str] | None:
    """Write the decoder (see `build`) to `path`, weights external beside it when they pass protobuf's limit;
    -> the files written, graph first, or None when the body is not of a supported kind."""
    if supported(body, text_config) is not None:
        return None
    import onnx

    with torch.no_grad():
        model = build(body, head, text_config, output)
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size < INLINE_LIMIT:
        onnx.save(model, str(path))
        return [path.name]
    data = path.name + ".data"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
              size_threshold=1024)
    return [path.name, data]

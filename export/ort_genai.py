"""An ONNX bundle -> a model directory for onnxruntime-genai, whose C library (with C#, Java/Kotlin, Objective-C/
Swift and Python bindings, and ONNX Runtime's execution providers) runs it inside native apps.

onnxruntime-genai's multimodal pipeline is fixed: on the prompt, `vision` turns `pixel_values` into
`image_features`; on every step, `embedding` turns `(input_ids, image_features)` into `inputs_embeds`; `decoder`
runs those with a KV cache. The bundle's graphs already use its tensor names; what is written here:

    vision.onnx       the bundle's vision graph, its rows flattened: one tile [1, 3, S, S] -> [n, D]; the pipeline
                      runs it once per tile of pixel_values [T, 3, S, S] (every tile of every image of the prompt,
                      in prompt order), stacking the rows -> image_features [T * n, D]
    embedding.onnx    the bundle's embed graph + a splice: rows of image_features replace the embeddings of the
                      image-token positions, in order (Equal, NonZero, Transpose, Reshape, ScatterND)
    decoder.onnx      the bundle's decoder as it is (and any external data files, under their names)
    genai_config.json the pipeline; tokenizer.json + tokenizer_config.json (a class ort-extensions knows, the chat
                      template); preprocessing.json: what the app does before `append_tokens` (docs/native-apps.md)

onnxruntime-genai has no image processor for these families: the app resizes, crops and normalizes the image,
expands each image marker of the rendered prompt into the model's placeholder tokens, and hands `pixel_values`,
`image_sizes` and `num_image_tokens` to the generator itself. Refused, each with its reason: pre-fusion
(LLaVA-Mini) bundles, anyres image layouts, static (NPU) bundles and non-ONNX graphs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from edgevlm.atomic import atomic_dir, check_target, scratch_dir
from edgevlm.bundle import Bundle, open_bundle
from edgevlm.errors import ExportError
from edgevlm.manifest import Manifest

from .ort_genai_prompt import contract_for, tokenizer_files

# onnxruntime-genai's model type names a pipeline, not our architecture. "mistral3" (Pixtral's) is its
# vision -> embedding -> decoder pipeline that runs the vision graph once per image of pixel_values [N, 3, H, W]
# (sizes in image_sizes [N, 2]), so a tile is a run of the bundle's own graph, with the optimizations ONNX Runtime
# applies to it in edgevlm (a loop inside the graph would lose its NCHWc convolution layout: features ~3e-6
# apart). Default position ids; the KV cache can be rewound (which a chat needs when the re-rendered history
# differs from the tokens the generator holds; "phi3v" cannot).
PIPELINE = "mistral3"
CONFIG, CONTRACT = "genai_config.json", "preprocessing.json"
_FLAT = "edgevlm_flat"
_SPLICE = "edgevlm_splice"


def unsupported(m: Manifest) -> str | None:
    """None if the bundle converts, else the one-line reason it cannot run in onnxruntime-genai."""
    if m.fusion == "prefusion":
        return ("a pre-fusion (LLaVA-Mini) bundle does not fit onnxruntime-genai's fixed vision -> embedding -> "
                "decoder pipeline (its text embeddings depend on the image through the pre-fusion layers); "
                "convert a bundle exported without LLaVA-Mini")
    if m.is_static:
        return ("a static (NPU) bundle's graphs take fixed chunks, but onnxruntime-genai's multimodal pipeline "
                "embeds and prefills the whole prompt in one call, and its windowed (QNN-style) KV cache needs uint8 "
                "caches in its own layout and exists only in its text-only pipeline: convert the dynamic bundle of "
                "the same checkpoint")
    if m.image_layout is not None and m.image_layout.tiling == "anyres":
        return ("an anyres image layout (LLaVA-OneVision) stitches, unpads and shrinks tile features between the "
                "vision graph and the language model; onnxruntime-genai feeds the vision output straight to the "
                "embedding graph")
    for name in ("vision", "embed", "decoder"):
        comp = m.components.get(name)
        if comp is None or comp.backend != "onnx":
            return f"components.{name} is not an ONNX graph (onnxruntime-genai runs ONNX only)"
    if m.image_layout is not None and m.image_layout.tiling == "split" and tile_patch(m) is None:
        return ("its tiles' rows do not form a grid that divides the tile size, which onnxruntime-genai needs to "
                "place each tile's rows")
    return None


def tile_patch(m: Manifest) -> int | None:
    """Pixels per row of the tile's feature grid along each side (onnxruntime-genai counts a tile's rows as
    (height / patch) * (width / patch)); None when the rows form no such grid: then one image per prompt."""
    shape = m.components["vision"].inputs.get("pixel_values") or []
    grid = m.image_layout.grid if m.image_layout else None
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape) or grid is None:
        return None
    (h, w), (gh, gw) = shape[2:], grid
    if h % gh or w % gw or h // gh != w // gw:
        return None
    return h // gh


def convert(bundle: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> dict:
    """Write the onnxruntime-genai model directory `out` for the ONNX bundle `bundle`; returns the contract
    (preprocessing.json). `out` appears only when complete (atomically, like a bundle)."""
    import onnx

    check_target(out, overwrite, marker=CONFIG)
    b = open_bundle(bundle)
    m = b.manifest
    why = unsupported(m)
    if why:
        raise ExportError(f"cannot convert {bundle} for onnxruntime-genai: {why}")
    blobs = {name: b.read(m.components[name].file) for name in ("vision", "embed", "decoder")}
    graphs = {name: onnx.load_model_from_string(blob) for name, blob in blobs.items()}
    dim = _last_dim(graphs["embed"].graph.output[0])
    raw_tok = b.read(m.tokenizer.file).decode("utf-8")
    types = [graphs[name].graph.output[0].type.tensor_type.elem_type for name in ("vision", "embed")]
    if types[0] != types[1]:
        raise ExportError(f"the vision graph's rows ({onnx.helper.tensor_dtype_to_np_dtype(types[0])}) and the "
                          f"token embeddings ({onnx.helper.tensor_dtype_to_np_dtype(types[1])}) differ in type")
    files = {"vision.onnx": _vision(graphs["vision"], dim), "embedding.onnx": _embedding(graphs["embed"], m, dim)}
    tok_config, ids, tok_info = tokenizer_files(raw_tok, m)
    contract = contract_for(m, tok_info, tile_patch(m))
    config = genai_config(m, graphs["decoder"], dim, ids, graphs["vision"].graph.input[0].name)
    with atomic_dir(out, overwrite, marker=CONFIG) as tmp:
        for name, proto in files.items():
            onnx.save(proto, str(tmp / name))
        (tmp / "decoder.onnx").write_bytes(blobs["decoder"])  # as verified
        for name in ("vision", "embed", "decoder"):  # external data: the graphs' references keep the file names
            for ref in m.components[name].data_files:
                _copy(b, ref.file, tmp / ref.file)
        for name, data in ((CONFIG, config), ("tokenizer_config.json", tok_config), (CONTRACT, contract)):
            (tmp / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "tokenizer.json").write_text(raw_tok, encoding="utf-8")
    return contract


def _copy(b: Bundle, rel: str, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(b.read(rel))  # the verified bytes


def _last_dim(value_info) -> int:
    dims = value_info.type.tensor_type.shape.dim
    if not dims or not dims[-1].HasField("dim_value"):
        raise ExportError(f"graph output {value_info.name} has no fixed last dimension")
    return int(dims[-1].dim_value)


# ---- graphs -------------------------------------------------------------------------------------------------


def _vision(proto, dim: int):
    """The vision graph with its rows flattened: pixels [1, 3, S, S] -> image_features [n, D] (onnxruntime-genai
    runs it once per tile, writing each tile's rows after the previous ones)."""
    from onnx import helper, numpy_helper

    g = proto.graph
    rows, dtype = f"{_FLAT}/rows", g.output[0].type.tensor_type.elem_type
    _rename(g, g.output[0].name, rows)
    g.initializer.append(numpy_helper.from_array(np.array([-1, dim], np.int64), f"{_FLAT}/shape"))
    g.node.append(helper.make_node("Reshape", [rows, f"{_FLAT}/shape"], ["image_features"], name=f"{_FLAT}/reshape"))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("image_features", dtype, ["image_tokens", dim]))
    return _model(proto, g)


def _rename(g, old: str, new: str) -> None:
    """Rename the value `old` (a node output) to `new` wherever the graph uses it."""
    for node in g.node:
        node.output[:] = [new if x == old else x for x in node.output]
        node.input[:] = [new if x == old else x for x in node.input]
    for vi in g.value_info:
        if vi.name == old:
            vi.name = new


def _embedding(proto, m: Manifest, dim: int):
    """The embed graph (input_ids -> inputs_embeds) with image_features [K, D] spliced into the K image-token
    positions, in order (K = 0 after the prompt: nothing is replaced)."""
    from onnx import helper, numpy_helper

    g = proto.graph
    out, text, dtype = g.output[0].name, f"{_SPLICE}/text_embeds", g.output[0].type.tensor_type.elem_type
    _rename(g, out, text)
    p = _SPLICE
    g.initializer.extend([numpy_helper.from_array(np.array(m.image_token_id, np.int64), f"{p}/image_token_id"),
                          numpy_helper.from_array(np.array([-1, dim], np.int64), f"{p}/flat")])
    g.input.append(helper.make_tensor_value_info("image_features", dtype, ["image_tokens", dim]))
    g.node.extend([
        helper.make_node("Equal", [g.input[0].name, f"{p}/image_token_id"], [f"{p}/is_image"]),
        helper.make_node("NonZero", [f"{p}/is_image"], [f"{p}/where"]),  # [2, K]: (batch, position) pairs
        helper.make_node("Transpose", [f"{p}/where"], [f"{p}/index"], perm=[1, 0]),
        helper.make_node("Reshape", ["image_features", f"{p}/flat"], [f"{p}/rows"]),
        helper.make_node("ScatterND", [text, f"{p}/index", f"{p}/rows"], [out]),
    ])
    return _model(proto, g)


def _model(like, graph):
    from onnx import helper

    model = helper.make_model(graph, opset_imports=list(like.opset_import), producer_name="edgevlm")
    model.ir_version = like.ir_version
    model.functions.extend(like.functions)
    return model


# ---- configuration ------------------------------------------------------------------------------------------


def genai_config(m: Manifest, decoder, dim: int, ids: dict[str, int], pixel_name: str = "pixel_values") -> dict:
    """genai_config.json: the three graphs, their tensor names and the decoder's dimensions. `ids`: special
    token -> id; `pixel_name`: the vision graph's input."""
    kv = m.components["decoder"].kv
    gqa = [n for n in decoder.graph.node if n.op_type == "GroupQueryAttention"]
    heads = next((a.i for a in gqa[0].attribute if a.name == "num_heads"), None) if gqa else None
    vocab = _last_dim(next(o for o in decoder.graph.output if o.name == "logits"))
    eos = list(m.generation.eos_token_ids)
    bos, pad = (ids.get(m.special_tokens.get(k, ""), eos[0]) for k in ("bos_token", "pad_token"))
    decoder_io = {
        "inputs": {"inputs_embeds": "inputs_embeds", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": _per_layer(kv.past, "key"), "past_value_names": _per_layer(kv.past, "value")},
        "outputs": {"logits": "logits", "present_key_names": _per_layer(kv.present, "key"),
                    "present_value_names": _per_layer(kv.present, "value")}}
    return {
        "model": {
            "type": PIPELINE, "context_length": m.generation.context_length, "vocab_size": vocab,
            "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "image_token_id": m.image_token_id,
            "decoder": {"filename": "decoder.onnx", "session_options": {"log_id": "edgevlm", "provider_options": []},
                        "hidden_size": dim, "head_size": kv.head_dim, "num_key_value_heads": kv.heads,
                        "num_attention_heads": int(heads or dim // kv.head_dim),
                        "num_hidden_layers": m.components["decoder"].num_layers, **decoder_io},
            "embedding": {"filename": "embedding.onnx",
                          "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                          "outputs": {"inputs_embeds": "inputs_embeds"}},
            "vision": {"filename": "vision.onnx", "patch_size": tile_patch(m) or 1, "spatial_merge_size": 1,
                       "inputs": {"pixel_values": pixel_name, "image_sizes": "image_sizes"},
                       "outputs": {"image_features": "image_features"}},
        },
        # a GroupQueryAttention decoder extends its KV cache in place (one buffer of max_length positions)
        "search": {"do_sample": False, "num_beams": 1, "top_k": 1, "max_length": m.generation.context_length,
                   "past_present_share_buffer": bool(gqa)},
    }


def _per_layer(pattern: str, part: str) -> str:
    """The manifest's "past_key_values.%d.%s" -> onnxruntime-genai's "past_key_values.%d.key"."""
    name = pattern.replace("%d", "\x00") % part
    if name.replace("\x00", "0") != pattern % (0, part):
        raise ExportError(f"KV name pattern {pattern!r} is not of the form '...%d...%s...'")
    return name.replace("\x00", "%d")


def export_ort_genai(hf_dir: str | os.PathLike | None, out: str | os.PathLike, *,
                     base_bundle: str | os.PathLike | None = None, overwrite: bool = False, **export_kw) -> dict:
    """`edgevlm export --format ort-genai`: convert `base_bundle` (any ONNX bundle, e.g. a quantized one), or
    first export `hf_dir` to an ONNX bundle (with its parity check) in a scratch directory."""
    if base_bundle is not None:
        return convert(base_bundle, out, overwrite=overwrite)
    from .exporter import export  # torch is imported only here

    check_target(out, overwrite, marker=CONFIG)
    with scratch_dir(out) as work:
        export(hf_dir, work / "bundle", **export_kw)
        return convert(work / "bundle", out, overwrite=overwrite)

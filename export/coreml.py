"""CoreML export with coremltools: the vision encoder as a fixed-shape fp16 ML program (the form the Neural
Engine takes) and the language model as a stateful fp16 ML program whose KV cache lives in CoreML state.

    export_coreml(hf_dir, out)                     # ONNX bundle first (vision reference + embed graph)
    export_coreml(hf_dir, out, quant="int8")       # + linear weight quantization (int8 / int4 per block)
    export_coreml(hf_dir, out, quant="palette4")   # + k-means palettization (4 or 6 bits)

Conversion and compression run on Linux; prediction needs macOS. What is checked here: the decoder wrapper
against the HF model in PyTorch (logits, with the cache filled over two calls), then the converted programs
read back from their spec (`describe`): inputs, outputs, states, shapes, op precision, op counts.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgevlm.atomic import atomic_dir, check_target, scratch_dir, write_atomic
from edgevlm.bundle import MANIFEST, open_bundle, sha256_file
from edgevlm.errors import ExportError
from edgevlm.manifest import Component, FileRef, Manifest, Quant

QUANTS = ("none", "int8", "int4", "palette4", "palette6")
MAX_CONTEXT = 2048  # the state holds this many positions (the manifest's context_length becomes at most this)


class StatefulDecoder(nn.Module):
    """A LLaMA-style decoder (Qwen2, Llama) over the HF modules, with the KV cache in registered buffers that
    CoreML turns into state.

    inputs_embeds [1, S, D], position_ids [1, S] int32, causal_mask [1, 1, S, P+S] (0 / -inf)
    -> logits of the last position [1, 1, V]; k_cache/v_cache [L, 1, kv_heads, C, head_dim] updated at P..P+S.
    """

    def __init__(self, body, lm_head, cfg, context: int, cache_dtype=torch.float16):
        super().__init__()
        self.body, self.lm_head = body, lm_head
        self.n_head = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads or self.n_head
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_head
        params = getattr(cfg, "rope_parameters", None) or {}
        theta = float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        inv = 1.0 / theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)
        shape = (cfg.num_hidden_layers, 1, self.n_kv, context, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=cache_dtype))  # CoreML state is fp16
        self.register_buffer("v_cache", torch.zeros(shape, dtype=cache_dtype))

    @staticmethod
    def _rotate(x, cos, sin):  # HF's rotate_half convention
        a, b = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-b, a), dim=-1) * sin

    def forward(self, inputs_embeds, position_ids, causal_mask):
        s = inputs_embeds.shape[1]
        end = causal_mask.shape[-1]
        past = end - s
        freqs = position_ids.float()[..., None] * self.inv_freq  # [1, S, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [1, 1, S, hd]
        cos, sin = emb.cos(), emb.sin()
        h = inputs_embeds
        for i, layer in enumerate(self.body.layers):
            att = layer.self_attn
            x = layer.input_layernorm(h)
            q = att.q_proj(x).view(1, s, self.n_head, self.head_dim).transpose(1, 2)
            k = att.k_proj(x).view(1, s, self.n_kv, self.head_dim).transpose(1, 2)
            v = att.v_proj(x).view(1, s, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            self.k_cache[i:i + 1, :, :, past:end] = k.to(self.k_cache.dtype)[None]
            self.v_cache[i:i + 1, :, :, past:end] = v.to(self.v_cache.dtype)[None]
            keys = self.k_cache[i, :, :, :end].to(q.dtype)
            vals = self.v_cache[i, :, :, :end].to(q.dtype)
            rep = self.n_head // self.n_kv
            if rep > 1:
                keys, vals = keys.repeat_interleave(rep, dim=1), vals.repeat_interleave(rep, dim=1)
            w = torch.softmax(q @ keys.transpose(-1, -2) / self.head_dim ** 0.5 + causal_mask, dim=-1)
            h = h + att.o_proj((w @ vals).transpose(1, 2).reshape(1, s, self.n_head * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.body.norm(h[:, -1:]))


def causal_mask(past: int, s: int) -> np.ndarray:  # -> [1, 1, S, P+S]
    m = np.triu(np.full((s, past + s), -np.inf, np.float32), k=past + 1)
    return m[None, None]


@torch.no_grad()
def check_wrapper(dec: StatefulDecoder, model, ids: torch.Tensor, embed_tokens, split: int) -> float:
    """Max |logit diff| of the wrapper (cache filled in two calls) vs the HF model on the same ids."""
    ref = model.model.language_model(input_ids=ids).last_hidden_state
    ref = model.lm_head(ref[:, -1:])[0, -1]
    x = embed_tokens(ids)
    n = ids.shape[1]
    dec.k_cache.zero_(), dec.v_cache.zero_()
    for a, b in ((0, split), (split, n)):
        out = dec(x[:, a:b], torch.arange(a, b, dtype=torch.int32)[None], torch.from_numpy(causal_mask(a, b - a)))
    return float((out[0, -1].float() - ref).abs().max())


def _compress(mlmodel, quant: str):
    import coremltools.optimize.coreml as cto

    if quant == "none":
        return mlmodel
    if quant.startswith("palette"):
        cfg = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(nbits=int(quant[-1]), mode="kmeans",
                                                                           weight_threshold=1024))
        return cto.palettize_weights(mlmodel, cfg)
    if quant == "int8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", weight_threshold=1024)
    else:  # int4, per block of 32 input channels (iOS 18 / macOS 15)
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                         block_size=32, weight_threshold=1024)
    return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op))


def convert_vision(adapter, model, pixel_shape, quant: str = "none"):
    import coremltools as ct

    from .graphs import VisionGraph

    x = torch.zeros(pixel_shape, dtype=torch.float32)
    with torch.no_grad():
        traced = torch.jit.trace(VisionGraph(adapter, model).eval(), (x,))
    ml = ct.convert(traced, inputs=[ct.TensorType(name="pixel_values", shape=tuple(pixel_shape), dtype=np.float32)],
                    outputs=[ct.TensorType(name="image_embeds", dtype=np.float32)], convert_to="mlprogram",
                    compute_precision=ct.precision.FLOAT16, minimum_deployment_target=ct.target.iOS18,
                    skip_model_load=True)
    return _compress(ml, quant)


def convert_decoder(dec: StatefulDecoder, hidden: int, context: int, quant: str = "none"):
    import coremltools as ct

    s, p = 3, 2
    args = (torch.zeros(1, s, hidden), torch.arange(p, p + s, dtype=torch.int32)[None],
            torch.from_numpy(causal_mask(p, s)))
    with torch.no_grad():
        traced = torch.jit.trace(dec.eval(), args)
    seq, end = ct.RangeDim(1, context, default=1), ct.RangeDim(1, context, default=1)
    ml = ct.convert(
        traced,
        inputs=[ct.TensorType(name="inputs_embeds", shape=(1, seq, hidden), dtype=np.float16),
                ct.TensorType(name="position_ids", shape=(1, seq), dtype=np.int32),
                ct.TensorType(name="causal_mask", shape=(1, 1, seq, end), dtype=np.float16)],
        outputs=[ct.TensorType(name="logits", dtype=np.float16)],
        states=[ct.StateType(wrapped_type=ct.TensorType(shape=tuple(dec.k_cache.shape), dtype=np.float16), name="k_cache"),
                ct.StateType(wrapped_type=ct.TensorType(shape=tuple(dec.v_cache.shape), dtype=np.float16), name="v_cache")],
        convert_to="mlprogram", compute_precision=ct.precision.FLOAT16, minimum_deployment_target=ct.target.iOS18,
        skip_model_load=True)
    return _compress(ml, quant)


def describe(package: str | os.PathLike) -> dict:
    """What a saved .mlpackage declares, read back from its spec: inputs/outputs/states with shapes and
    types, the op counts of the main function, and how many op outputs are fp16."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(package))

    def feature(f):
        t = f.type.stateType.arrayType if f.type.WhichOneof("Type") == "stateType" else f.type.multiArrayType
        ranges = [(int(r.lowerBound), int(r.upperBound)) for r in t.shapeRange.sizeRanges]
        dtype = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(t.dataType)
        return {"shape": [int(d) for d in t.shape], "ranges": ranges, "dtype": dtype}

    ops: dict[str, int] = {}
    dtypes: dict[str, int] = {}

    def walk(block):
        for op in block.operations:
            ops[op.type] = ops.get(op.type, 0) + 1
            for o in op.outputs:
                if o.type.WhichOneof("type") == "tensorType":
                    d = ct.proto.MIL_pb2.DataType.Name(o.type.tensorType.dataType)
                    dtypes[d] = dtypes.get(d, 0) + 1
            for b in op.blocks:
                walk(b)

    main = spec.mlProgram.functions["main"]
    walk(main.block_specializations[main.opset])
    return {
        "spec_version": int(spec.specificationVersion), "opset": main.opset,
        "inputs": {f.name: feature(f) for f in spec.description.input},
        "outputs": {f.name: feature(f) for f in spec.description.output},
        "states": {f.name: feature(f) for f in spec.description.state},
        "ops": dict(sorted(ops.items())), "op_output_dtypes": dtypes,
    }


def _package_component(out: Path, name: str, **kw) -> Component:
    """An .mlpackage as a bundle component: the spec is the file, the manifest and weights its data files."""
    pkg = out / f"{name}.mlpackage"
    files = sorted(str(p.relative_to(out)) for p in pkg.rglob("*") if p.is_file())
    spec = next(f for f in files if f.endswith(".mlmodel"))
    data = tuple(FileRef(f, sha256_file(out / f)) for f in files if f != spec)
    return Component(backend="coreml", file=spec, sha256=sha256_file(out / spec), data_files=data, **kw)


def export_coreml(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, quant: str = "none",
                  base_bundle: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = True,
                  context: int = MAX_CONTEXT, max_wrapper_diff: float = 1e-3) -> Manifest:
    """Export a checkpoint to a bundle whose vision and decoder are CoreML ML programs (embed stays ONNX).
    The bundle runs on macOS; the manifest's source.parity.coreml records what was verified here."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from .adapters import adapter_for
    from .exporter import export

    if quant not in QUANTS:
        raise ExportError(f"unknown CoreML compression {quant!r} (choose from {', '.join(QUANTS)})")
    hf_dir, out = Path(hf_dir), Path(out_dir)
    check_target(out, overwrite)
    with scratch_dir(out) as work, atomic_dir(out, overwrite) as tmp:
        if base_bundle is None:
            base_bundle = work / "onnx"
            export(hf_dir, base_bundle, progress=progress)
        base = open_bundle(base_bundle).manifest
        if base.fusion != "splice":
            raise ExportError("CoreML export covers splice bundles (FastVLM, LLaVA); pre-fusion is not supported yet")
        config = AutoConfig.from_pretrained(hf_dir)
        adapter = adapter_for(config.model_type)
        model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32).eval()
        text_cfg = adapter.text_config(model)
        body, embed_tokens, lm_head = adapter.language_parts(model)
        ctx = min(context, base.generation.context_length)
        ids = torch.arange(3, 3 + 12)[None] % text_cfg.vocab_size
        check = StatefulDecoder(body, lm_head, text_cfg, ctx, cache_dtype=torch.float32).eval()
        wrapper_diff = check_wrapper(check, model, ids, embed_tokens, split=7)
        if wrapper_diff > max_wrapper_diff:
            raise ExportError(f"the stateful decoder wrapper differs from the HF model: {wrapper_diff:.3g}")
        dec = StatefulDecoder(body, lm_head, text_cfg, ctx).eval()

        pixel_shape = tuple(base.components["vision"].inputs["pixel_values"])
        convert_vision(adapter, model, pixel_shape, quant).save(str(tmp / "vision.mlpackage"))
        convert_decoder(dec, text_cfg.hidden_size, ctx, quant).save(str(tmp / "decoder.mlpackage"))
        for c in [base.components["embed"]]:
            for f in [c.file] + [r.file for r in c.data_files]:
                shutil.copy2(Path(base_bundle) / f, tmp / f)
        shutil.copy2(Path(base_bundle) / base.tokenizer.file, tmp / base.tokenizer.file)
        vis, dsc = describe(tmp / "vision.mlpackage"), describe(tmp / "decoder.mlpackage")
        bdec = base.components["decoder"]
        qd = None if quant == "none" else {"coreml": quant}
        comps = {
            "vision": _package_component(tmp, "vision", precision="fp16", quant=qd,
                                         inputs=base.components["vision"].inputs,
                                         outputs=base.components["vision"].outputs),
            "embed": base.components["embed"],
            "decoder": _package_component(
                tmp, "decoder", precision="fp16", quant=qd, num_layers=bdec.num_layers, kv=bdec.kv,
                inputs={"inputs_embeds": [1, "seq", int(text_cfg.hidden_size)], "position_ids": [1, "seq"],
                        "causal_mask": [1, 1, "seq", "past+seq"]},
                outputs={"logits": [1, 1, int(text_cfg.vocab_size)]}),
        }
        parity = {**base.source.parity, "coreml": {
            "decoder_wrapper_max_abs_logit_diff": wrapper_diff, "prediction": "not run (CoreML predicts on macOS only)",
            "vision_ops": sum(vis["ops"].values()), "decoder_ops": sum(dsc["ops"].values()),
            "decoder_states": sorted(dsc["states"])}}
        manifest = dataclasses.replace(
            base, components=comps, quant=Quant(scheme="coreml-" + ("fp16" if quant == "none" else quant), details=qd),
            generation=dataclasses.replace(base.generation, context_length=ctx),
            source=dataclasses.replace(base.source, parity=parity))
        write_atomic(tmp / MANIFEST, manifest.to_json())
    return manifest

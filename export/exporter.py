"""HF checkpoint directory -> bundle directory, written atomically, with a parity check after every export."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from edgevlm import __version__
from edgevlm.atomic import atomic_dir, check_target, write_atomic
from edgevlm.bundle import MANIFEST, sha256_file
from edgevlm.errors import EdgeVLMError, ExportError
from edgevlm.image import preprocess
from edgevlm.manifest import Component, FileRef, Generation, KVSpec, Manifest, Source, StaticShape

from . import gqa, graphs, parity
from .adapters import adapter_for
from .hub import resolve
from .llava_mini import MiniVLM, check_parity, export_extra

log = logging.getLogger("edgevlm.export")

STAGES = ["load checkpoint", "vision graph", "embed graph", "decoder graph", "tokenizer + manifest", "parity"]


@dataclasses.dataclass(frozen=True)
class StaticOptions:
    """`export --static`: fixed shapes in every graph; the decoder gets a KV cache of `kv_capacity` slots and a
    prefill graph taking `prefill_chunk` positions per call (plus a one-token graph for decoding)."""

    kv_capacity: int = 512
    prefill_chunk: int = 64


def _component(out: Path, files: list[str], fixed: bool = False, **kw) -> Component:
    data = tuple(FileRef(f, sha256_file(out / f)) for f in files[1:])
    if fixed:  # a static bundle: the shapes the graph file really declares, which must all be fixed
        ins, outs = graphs.graph_shapes(out / files[0])
        for name, dims in {**ins, **outs}.items():
            if not all(isinstance(d, int) and d > 0 for d in dims):
                raise ExportError(f"{files[0]}: {name} has dynamic dims {dims}; a static bundle allows none")
        kw.update(inputs=ins, outputs=outs)
    return Component(backend="onnx", file=files[0], sha256=sha256_file(out / files[0]), data_files=data, **kw)


def _static_decoder(body, head, text_config, tmp: Path, opts: StaticOptions) -> dict[str, tuple[list[str], StaticShape]]:
    """The one-token decode graph and the chunked prefill graph, over the same fixed-capacity cache."""
    out = {}
    for name, chunk in (("decoder", 1), ("prefill", opts.prefill_chunk)):
        files = graphs.export_static_decoder(body, head, text_config, tmp / f"{name}.onnx",
                                             capacity=opts.kv_capacity, chunk=chunk)
        out[name] = (files, StaticShape(chunk=chunk, kv_capacity=opts.kv_capacity))
    return out


def _eos_ids(model, text_config) -> tuple[int, ...]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = text_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return tuple(int(e) for e in eos)


def export(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, max_logit_diff: float = 1e-3,
           parity_tokens: int = 16, overwrite: bool = False, progress: bool = True,
           static: StaticOptions | None = None, decoder: str = "auto") -> Manifest:
    """Export a transformers VLM checkpoint to an ONNX bundle; returns the manifest written.

    With `static`, every graph has fixed shapes (NPU-ready; see StaticOptions). `decoder`: "gqa" writes the
    language model on ONNX Runtime's fused kernels (export/gqa.py; an error if the model is not Llama/Qwen2-like),
    "torch" exports it with torch.onnx, "auto" (default) takes gqa where it applies (not with `static`). The
    bundle appears at out_dir only once it is complete and its parity check has passed; a failure leaves nothing
    behind.
    """
    out = Path(out_dir)
    check_target(out, overwrite)
    bar = tqdm(total=len(STAGES), desc="export", unit="stage", disable=not progress, file=sys.stderr)
    where = {"stage": STAGES[0], "model_type": None, "src": str(hf_dir)}

    def step(i: int):
        where["stage"] = STAGES[i]
        bar.set_postfix_str(STAGES[i])
        bar.update(1 if i else 0)

    try:
        step(0)
        src = _prepare(hf_dir, where, static, decoder)
        with atomic_dir(out, overwrite) as tmp:
            parts = _graphs(src, tmp, decoder, step)
            step(4)
            manifest = _manifest(src, parts, tmp, where)
            (tmp / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
            step(5)
            manifest = _parity(src, tmp, manifest, parity_tokens, max_logit_diff)
            write_atomic(tmp / MANIFEST, manifest.to_json())
            bar.update()
    except ExportError as e:  # say which model type it concerns
        if where["model_type"] and where["model_type"] not in str(e):
            raise ExportError(f"model_type {where['model_type']!r}: {e}") from None
        raise
    except EdgeVLMError:
        raise
    except Exception as e:  # an odd config, processor or model: one line naming what, never a traceback
        raise ExportError(unexpected(where, e)) from e
    finally:
        bar.close()
    return manifest


def _prepare(hf_dir, where: dict, static: StaticOptions | None, decoder: str) -> SimpleNamespace:
    """The checkpoint loaded and what the export needs of it before any graph: processor, preprocess, the
    probe image and its pixel shape, the (checked) static options."""
    hf_dir, adapter, mini, processor, pre, model = _load(hf_dir, where)
    text_config = adapter.text_config(model)
    probe = parity.probe_image()
    if static and decoder == "gqa":
        raise ExportError("--decoder gqa applies to dynamic bundles only (static ones have their own decoder graphs)")
    if static:
        static = dataclasses.replace(static, kv_capacity=min(static.kv_capacity,
                                                             int(text_config.max_position_embeddings)))
        if static.prefill_chunk < 1 or static.kv_capacity < 2:
            raise ExportError(f"static shapes need --prefill-chunk >= 1 and --kv-capacity >= 2, got {static}")
    return SimpleNamespace(hf_dir=hf_dir, adapter=adapter, mini=mini, processor=processor, pre=pre, model=model,
                           text_config=text_config, probe=probe, pixel_shape=preprocess(np.asarray(probe), pre).shape,
                           static=static)


def _graphs(src: SimpleNamespace, tmp: Path, decoder: str, step) -> SimpleNamespace:
    """vision.onnx, embed.onnx and the decoder graph(s) written into tmp; what the manifest needs of them."""
    adapter, model, static = src.adapter, src.model, src.static
    step(1)
    vision_files = graphs.export_vision(adapter, model, src.pixel_shape, tmp / "vision.onnx")
    with torch.no_grad():
        vis_out = adapter.image_features(model, torch.zeros(src.pixel_shape))
    vis_out = vis_out if isinstance(vis_out, tuple) else (vis_out,)
    n_img, dim = vis_out[0].shape[1:]
    layout = None if src.mini else adapter.image_layout(model, src.processor, int(n_img))
    step(2)
    body, embed_tokens, lm_head = adapter.language_parts(model)
    embed_files = graphs.export_embed(embed_tokens, tmp / "embed.onnx", static and static.prefill_chunk)
    step(3)
    if static:
        decoders = _static_decoder(body, graphs.LastLogits(lm_head), src.text_config, tmp, static)
    else:
        files = None
        if decoder in ("auto", "gqa"):
            why = gqa.supported(body, src.text_config)
            if why and decoder == "gqa":
                raise ExportError(f"--decoder gqa: {why}")
            files = None if why else gqa.export_decoder(body, lm_head, src.text_config, tmp / "decoder.onnx")
        if files is None:
            files = graphs.export_decoder(body, graphs.LastLogits(lm_head), src.text_config, tmp / "decoder.onnx")
        decoders = {"decoder": (files, None)}
    return SimpleNamespace(vision_files=vision_files, embed_files=embed_files, decoders=decoders, n_img=int(n_img),
                           dim=int(dim), layout=layout, use_gqa=decoder != "torch",
                           vision_outputs={name: list(t.shape) for name, t in zip(adapter.vision_outputs, vis_out)})


def _manifest(src: SimpleNamespace, parts: SimpleNamespace, tmp: Path, where: dict) -> Manifest:
    """The bundle's manifest (the tokenizer written beside it); its parity figures come after the check."""
    static, processor, text_config = src.static, src.processor, src.text_config
    tok = processor.tokenizer
    (tmp / "tokenizer.json").write_text(tok.backend_tokenizer.to_str(), encoding="utf-8")
    image_token = processor.image_token
    image_token_id = int(tok.convert_tokens_to_ids(image_token))
    counted = int((parity.hf_inputs(processor, src.probe, "hi")["input_ids"] == image_token_id).sum())
    n_tokens = 1 if src.mini else parts.n_img
    if counted != n_tokens and not (parts.layout is not None and parts.layout.tiling != "none"):
        raise ExportError(f"processor expands the image to {counted} tokens; the model takes {n_tokens}")
    if static and static.kv_capacity <= n_tokens + 1:  # (tiled: the count depends on the image; parity checks it)
        raise ExportError(f"--kv-capacity {static.kv_capacity} cannot hold the image's {n_tokens} tokens and a prompt")
    extra = {}
    if src.mini:
        for name, (files, kw) in export_extra(src.mini, parts.n_img, tmp, static, use_gqa=parts.use_gqa).items():
            kv = kw.pop("kv", None)
            extra[name] = _component(tmp, files, bool(static), kv=KVSpec(**kv) if kv else None, **kw)
    heads, head_dim = graphs.kv_dims(text_config)
    kv = KVSpec(past=graphs.PAST, present=graphs.PRESENT, heads=heads, head_dim=head_dim)
    io = {} if static else _dynamic_io(src.pixel_shape, parts, kv, int(text_config.vocab_size))
    components = {
        "vision": _component(tmp, parts.vision_files, bool(static), **io.get("vision", {})),
        "embed": _component(tmp, parts.embed_files, bool(static),
                            static=StaticShape(chunk=static.prefill_chunk) if static else None, **io.get("embed", {})),
        **{name: _component(tmp, files, bool(static), num_layers=text_config.num_hidden_layers, kv=kv, static=shape,
                            **io.get(name, {})) for name, (files, shape) in parts.decoders.items()},
        **extra}
    return Manifest(
        format_version=1, family=src.adapter.family, components=components,
        fusion="prefusion" if src.mini else "splice", image_layout=parts.layout, preprocess=src.pre,
        video=None if src.mini else src.adapter.video_layout(src.model, processor),
        tokenizer=FileRef("tokenizer.json", sha256_file(tmp / "tokenizer.json")), chat_template=processor.chat_template,
        special_tokens={k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)},
        image_token=image_token, image_token_id=image_token_id, image_tokens=n_tokens,
        generation=Generation(eos_token_ids=_eos_ids(src.model, text_config),
                              context_length=static.kv_capacity if static else int(text_config.max_position_embeddings)),
        source=Source(checkpoint=src.hf_dir.name if Path(where["src"]).is_dir() else where["src"],
                      exporter_version=__version__))


def _dynamic_io(pixel_shape, parts: SimpleNamespace, kv: KVSpec, vocab: int) -> dict:
    """The declared inputs / outputs of a dynamic bundle's graphs (a static bundle's are read from its files)."""
    return {"vision": {"inputs": {"pixel_values": list(pixel_shape)}, "outputs": parts.vision_outputs},
            "embed": {"inputs": {"input_ids": [1, "seq"]}, "outputs": {"inputs_embeds": [1, "seq", parts.dim]}},
            "decoder": {"inputs": {"inputs_embeds": [1, "seq", parts.dim], "attention_mask": [1, "past+seq"],
                                   "position_ids": [1, "seq"], graphs.PAST % (0, "key"): [1, kv.heads, "past", kv.head_dim]},
                        "outputs": {"logits": [1, 1, vocab]}}}


def _parity(src: SimpleNamespace, tmp: Path, manifest: Manifest, tokens: int, max_logit_diff: float) -> Manifest:
    """The written bundle against PyTorch: prompt ids, logits, greedy tokens; the figures into the manifest."""
    if src.mini:
        figures = check_parity(src.mini, src.processor, tmp, max_new_tokens=tokens)
    else:
        figures = parity.check(src.model, src.processor, src.adapter, tmp, max_new_tokens=tokens)
    log.info("parity: %s", {k: v for k, v in figures.items() if not isinstance(v, list)})
    if not figures["prompt_ids_match"]:
        raise ExportError("the runtime's prompt tokens differ from the processor's: template or tokenizer mismatch")
    if figures["max_abs_logit_diff"] > max_logit_diff:
        raise ExportError(f"parity failed: max |logit diff| {figures['max_abs_logit_diff']:.3g} > {max_logit_diff}")
    kept = {k: v for k, v in figures.items() if k not in ("greedy_reference", "greedy_runtime")}
    return dataclasses.replace(manifest, source=dataclasses.replace(manifest.source, parity=kept))


def _load(src, where: dict):
    """Checkpoint -> (directory, adapter, LLaVA-Mini or None, processor, preprocess config, model in eval mode);
    everything that can refuse the checkpoint cheaply runs before the model is loaded."""
    hf_dir = resolve(src)
    try:
        model_type = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))["model_type"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{hf_dir} is not a transformers checkpoint: {e}") from None
    where["model_type"] = model_type
    adapter = adapter_for(model_type)
    _check_tokenizer_files(hf_dir)
    mini = MiniVLM.load(hf_dir) if MiniVLM.is_mini(hf_dir) else None  # LLaVA-Mini on top of the family
    processor = adapter.load_processor(hf_dir)
    adapter.check_processor(processor, model_type)
    processor.chat_template = chat_template(processor, model_type)
    processor.chat_template = adapter.template_for_video(processor)
    pre = adapter.preprocess(processor)
    model = mini.base if mini else adapter.load_model(hf_dir)
    return hf_dir, adapter, mini, processor, pre, model.eval()


def _check_tokenizer_files(hf_dir: Path) -> None:
    import importlib.util

    if (hf_dir / "tokenizer.model").is_file() and not (hf_dir / "tokenizer.json").is_file() \
            and importlib.util.find_spec("sentencepiece") is None:
        raise ExportError("the tokenizer is only a SentencePiece tokenizer.model (no tokenizer.json): pip install "
                          "sentencepiece (in the export extra) so that transformers can convert it")


def chat_template(processor, model_type: str) -> str:
    """The processor's chat template, else the tokenizer's (tokenizer_config.json); it must take a message with an
    image item and place the image marker once (a text-only template cannot)."""
    from edgevlm.template import render

    found = processor.chat_template or getattr(processor.tokenizer, "chat_template", None)
    if isinstance(found, dict):  # named templates: the default one
        found = found.get("default")
    if not isinstance(found, str) or not found:
        raise ExportError(f"model_type {model_type!r}: the checkpoint has no chat template (no chat_template.json / "
                          ".jinja, none in tokenizer_config.json): add the processor's chat template file")
    marker = getattr(processor, "image_token", None) or "<image>"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    tok = processor.tokenizer
    try:
        text = render(found, msgs, bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
    except EdgeVLMError as e:
        raise ExportError(f"model_type {model_type!r}: its chat template cannot render a message with an image "
                          f"({e}); add the processor's chat template (chat_template.json) that takes image items") \
            from None
    if text.count(marker) != 1:
        raise ExportError(f"model_type {model_type!r}: its chat template places {text.count(marker)} image markers "
                          f"({marker}) for one image; add the processor's chat template that takes image items")
    return found


def unexpected(where: dict, e: Exception) -> str:
    """One line for an exception no check foresaw: the model type, the stage, and what failed."""
    what = " ".join(str(e).split())[:300]
    if isinstance(e, KeyError):
        what = f"a field it expects is missing: {what}"
    kind = f"model_type {where['model_type']!r}" if where["model_type"] else where["src"]
    return (f"{kind}: {where['stage']} failed ({type(e).__name__}: {what}); this checkpoint uses something the "
            f"exporter does not support yet (the README lists the verified checkpoints)")


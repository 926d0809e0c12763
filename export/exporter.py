"""HF checkpoint directory -> bundle directory, written atomically, with a parity check after every export."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edgevlm import __version__
from edgevlm.atomic import atomic_dir, check_target, write_atomic
from edgevlm.bundle import MANIFEST, sha256_file
from edgevlm.errors import ExportError
from edgevlm.image import preprocess
from edgevlm.manifest import Component, FileRef, Generation, KVSpec, Manifest, Source

from . import graphs, parity
from .adapters import adapter_for
from .llava_mini import MiniVLM, check_parity, export_extra

log = logging.getLogger("edgevlm.export")

STAGES = ["load checkpoint", "vision graph", "embed graph", "decoder graph", "tokenizer + manifest", "parity"]


def _component(out: Path, files: list[str], **kw) -> Component:
    data = tuple(FileRef(f, sha256_file(out / f)) for f in files[1:])
    return Component(backend="onnx", file=files[0], sha256=sha256_file(out / files[0]), data_files=data, **kw)


def _eos_ids(model, text_config) -> tuple[int, ...]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = text_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return tuple(int(e) for e in eos)


def export(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, max_logit_diff: float = 1e-3,
           parity_tokens: int = 16, overwrite: bool = False, progress: bool = True) -> Manifest:
    """Export a transformers VLM checkpoint to an ONNX bundle; returns the manifest written.

    The bundle appears at out_dir only once it is complete and its parity check has passed; a failure
    leaves nothing behind.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    hf_dir, out = Path(hf_dir), Path(out_dir)
    check_target(out, overwrite)
    bar = tqdm(total=len(STAGES), desc="export", unit="stage", disable=not progress, file=sys.stderr)

    def step(name):
        bar.set_postfix_str(name)

    try:
        step(STAGES[0])
        try:
            config = AutoConfig.from_pretrained(hf_dir)
        except (OSError, ValueError) as e:
            raise ExportError(f"{hf_dir} is not a transformers checkpoint: {e}") from None
        adapter = adapter_for(config.model_type)
        mini = MiniVLM.load(hf_dir) if MiniVLM.is_mini(hf_dir) else None  # LLaVA-Mini on top of the family
        model = mini.base if mini else AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32)
        model.eval()
        processor = AutoProcessor.from_pretrained(hf_dir)
        text_config = adapter.text_config(model)
        pre = adapter.preprocess(processor)
        probe = parity.probe_image()
        pixel_shape = preprocess(np.asarray(probe), pre).shape
        bar.update()

        with atomic_dir(out, overwrite) as tmp:
            step(STAGES[1])
            vision_files = graphs.export_vision(adapter, model, pixel_shape, tmp / "vision.onnx")
            with torch.no_grad():
                n_img, dim = adapter.image_features(model, torch.zeros(pixel_shape)).shape[1:]
            bar.update()
            step(STAGES[2])
            body, embed_tokens, lm_head = adapter.language_parts(model)
            embed_files = graphs.export_embed(embed_tokens, tmp / "embed.onnx")
            bar.update()
            step(STAGES[3])
            decoder_files = graphs.export_decoder(body, graphs.LastLogits(lm_head), text_config, tmp / "decoder.onnx")
            bar.update()

            step(STAGES[4])
            tok = processor.tokenizer
            (tmp / "tokenizer.json").write_text(tok.backend_tokenizer.to_str(), encoding="utf-8")
            image_token = processor.image_token
            image_token_id = int(tok.convert_tokens_to_ids(image_token))
            counted = int((parity.hf_inputs(processor, probe, "hi")["input_ids"] == image_token_id).sum())
            n_tokens = 1 if mini else int(n_img)
            if counted != n_tokens:
                raise ExportError(f"processor expands the image to {counted} tokens; the model takes {n_tokens}")
            extra = {}
            if mini:
                for name, (files, kw) in export_extra(mini, int(n_img), tmp).items():
                    kv = kw.pop("kv", None)
                    extra[name] = _component(tmp, files, kv=KVSpec(**kv) if kv else None, **kw)
            heads, head_dim = graphs.kv_dims(text_config)
            n_layers = text_config.num_hidden_layers
            kv_shape = [1, heads, "past", head_dim]
            manifest = Manifest(
                format_version=1,
                family=adapter.family,
                components={
                    "vision": _component(tmp, vision_files, inputs={"pixel_values": list(pixel_shape)},
                                         outputs={"image_embeds": [1, int(n_img), int(dim)]}),
                    "embed": _component(tmp, embed_files, inputs={"input_ids": [1, "seq"]},
                                        outputs={"inputs_embeds": [1, "seq", int(dim)]}),
                    "decoder": _component(
                        tmp, decoder_files, num_layers=n_layers,
                        kv=KVSpec(past=graphs.PAST, present=graphs.PRESENT, heads=heads, head_dim=head_dim),
                        inputs={"inputs_embeds": [1, "seq", int(dim)], "attention_mask": [1, "past+seq"],
                                "position_ids": [1, "seq"], **{graphs.PAST % (0, "key"): kv_shape}},
                        outputs={"logits": [1, 1, int(text_config.vocab_size)]}),
                    **extra,
                },
                fusion="prefusion" if mini else "splice",
                preprocess=pre,
                tokenizer=FileRef("tokenizer.json", sha256_file(tmp / "tokenizer.json")),
                chat_template=processor.chat_template,
                special_tokens={k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)},
                image_token=image_token,
                image_token_id=image_token_id,
                image_tokens=n_tokens,
                generation=Generation(eos_token_ids=_eos_ids(model, text_config),
                                      context_length=int(text_config.max_position_embeddings)),
                source=Source(checkpoint=hf_dir.name, exporter_version=__version__),
            )
            (tmp / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
            bar.update()

            step(STAGES[5])
            if mini:
                figures = check_parity(mini, processor, tmp, max_new_tokens=parity_tokens)
            else:
                figures = parity.check(model, processor, adapter, tmp, max_new_tokens=parity_tokens)
            log.info("parity: %s", {k: v for k, v in figures.items() if not isinstance(v, list)})
            if not figures["prompt_ids_match"]:
                raise ExportError("the runtime's prompt tokens differ from the processor's: template or tokenizer mismatch")
            if figures["max_abs_logit_diff"] > max_logit_diff:
                raise ExportError(f"parity failed: max |logit diff| {figures['max_abs_logit_diff']:.3g} > {max_logit_diff}")
            parity_figures = {k: v for k, v in figures.items() if k not in ("greedy_reference", "greedy_runtime")}
            manifest = dataclasses.replace(manifest, source=dataclasses.replace(manifest.source, parity=parity_figures))
            write_atomic(tmp / MANIFEST, manifest.to_json())
            bar.update()
    finally:
        bar.close()
    return manifest


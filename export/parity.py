"""Parity of an exported bundle with the PyTorch model it came from: per-graph max |diff| and greedy tokens."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from PIL import Image, ImageDraw

import edgevlm
from edgevlm import pipeline, tiling
from edgevlm.decoders import Prompt
from edgevlm.image import load_image, preprocess

PROMPT = "What is in the image?"


def probe_image(width: int = 203, height: int = 157, seed: int = 0) -> Image.Image:
    """A fixed, non-square picture with shapes in several colours (exercises resize and crop)."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = int(rng.integers(0, width - 30)), int(rng.integers(0, height - 30))
        s = int(rng.integers(12, 40))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        [d.ellipse, d.rectangle][int(rng.integers(0, 2))]((x, y, x + s, y + s), fill=colour)
    return img


def hf_inputs(processor, image: Image.Image, prompt: str):
    msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


@torch.no_grad()
def reference_generate(model, inputs, max_new_tokens: int) -> tuple[list[int], np.ndarray]:
    """transformers' greedy tokens, and the logits [V] of its first step (one pass over the image, not two)."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), out.logits[0][0].float().numpy()


def first_logits(vlm, x: np.ndarray) -> np.ndarray:
    """Logits [V] of the language model on prompt embeds x [S, D] from an empty cache."""
    n = len(x)
    prompt = Prompt(np.zeros(n, np.int64), [None] * n, lambda ids, keys, start: x[start:], lambda keys: x[:0])
    vlm.decoder.reset()  # a decoder keeping its own cache (static KV): nothing reused, nothing left behind
    logits = vlm.decoder.prefill(vlm.decoder.new_state(), prompt, 0)
    vlm.decoder.reset()
    return logits


@torch.no_grad()
def check(model, processor, adapter, bundle_dir, max_new_tokens: int = 16, image=None, prompt: str = PROMPT) -> dict:
    """Run the bundle and the PyTorch model side by side; return the figures for source.parity."""
    image = image or probe_image()
    vlm = edgevlm.load(bundle_dir)
    inputs = hf_inputs(processor, image, prompt)
    ids = inputs["input_ids"][0].numpy()

    m, lay = vlm.manifest, vlm.manifest.image_layout
    rgb = load_image(image)
    tiles = tiling.make_tiles(rgb, m.preprocess, lay) if lay and lay.tiling != "none" else None
    pixels = tiles.pixels if tiles else preprocess(rgb, m.preprocess)
    hf_pixels = adapter.hf_pixels(inputs).numpy()
    pixel_diff = float(np.abs(pixels - hf_pixels).max()) if pixels.shape == hf_pixels.shape else float("inf")
    _, state, _, _ = vlm.image_state(image)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    our_ids = vlm.prompt_ids(msgs, [state])
    ids_match = bool(our_ids.shape == ids.shape and (our_ids == ids).all())

    # the vision graph (and tile assembly) on the processor's own pixels, against the PyTorch model
    ref_img = adapter.reference_rows(model, inputs).numpy()
    if pixel_diff == 0.0:  # the same pixels: the runtime's own encoding of them is the one to compare
        our_img = state["rows"]
    else:
        if tiles:
            tiles = dataclasses.replace(tiles, pixels=hf_pixels)
        our_img = vlm._encode(hf_pixels, {}, tiles)["rows"]
    vision_diff = float(np.abs(ref_img - our_img).max()) if ref_img.shape == our_img.shape else float("inf")
    _, embed_tokens, _ = adapter.language_parts(model)
    embed_diff = float(np.abs(embed_tokens(inputs["input_ids"])[0].numpy() - pipeline.embed(vlm.embedder, ids)).max())

    ref_tokens, ref_logits = reference_generate(model, inputs, max_new_tokens)
    rows = np.nonzero(ids == vlm.manifest.image_token_id)[0]
    logit_diff = float("inf")
    if len(rows) == len(our_img):
        x = pipeline.splice(pipeline.embed(vlm.embedder, ids), rows, our_img)
        logits = first_logits(vlm, x)
        logit_diff = float(np.abs(logits - ref_logits).max())

    our_tokens = [r.token for r in vlm.stream(image, prompt, max_tokens=max_new_tokens)]
    return {
        "max_abs_pixel_diff": pixel_diff,
        "prompt_ids_match": ids_match,
        "max_abs_vision_diff": vision_diff,
        "max_abs_embed_diff": embed_diff,
        "max_abs_logit_diff": logit_diff,
        "greedy_tokens": len(ref_tokens),
        "greedy_match": our_tokens == ref_tokens,
        "greedy_reference": ref_tokens,
        "greedy_runtime": our_tokens,
    }

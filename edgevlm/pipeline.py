"""The pipeline stages, each a function of arrays (batch size 1 throughout).

    pixels --encode--> image embeds       ids --embed--> text embeds
    splice(text embeds, image embeds) --prefill--> logits, kv --decode_one--> logits, kv
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .backends.onnx import OnnxGraph
from .manifest import KVSpec

KV = list[tuple[np.ndarray, np.ndarray]]  # per layer (key, value), each [1, kv_heads, past, head_dim]


def encode(vision: OnnxGraph, pixels: np.ndarray) -> np.ndarray:  # [1, 3, H, W] -> [N, D]
    feeds = {vision.input_names[0]: pixels}
    return vision.run(feeds)[vision.output_names[0]][0]


def embed(embedder: OnnxGraph, ids: np.ndarray) -> np.ndarray:  # ids: [S] int64 -> [S, D]
    return embedder.run({embedder.input_names[0]: ids[None].astype(np.int64)})[embedder.output_names[0]][0]


def splice(text: np.ndarray, image_rows: np.ndarray, image_embeds: np.ndarray) -> np.ndarray:
    """Put image embeds [K, D] into the rows of text embeds [S, D] where the image placeholders are."""
    out = text.copy()
    out[image_rows] = image_embeds.astype(text.dtype, copy=False)
    return out


def empty_kv(spec: KVSpec, num_layers: int, dtype=np.float32) -> KV:
    z = np.zeros((1, spec.heads, 0, spec.head_dim), dtype)
    return [(z, z) for _ in range(num_layers)]


def kv_ok(kv, spec, length: int | None) -> bool:
    """Each (k, v): float32 [1, heads, length, head_dim] (any length when None, but equal across layers)."""
    n = kv[0][0].shape[2] if length is None and kv[0][0].ndim == 4 else length
    want = (1, spec.heads, n, spec.head_dim)
    return all(a is not None and a.dtype == np.float32 and a.shape == want for pair in kv for a in pair)


def trim_kv(kv: KV, length: int) -> KV:
    return [(k[:, :, :length], v[:, :, :length]) for k, v in kv]


def run(graph: OnnxGraph, spec: KVSpec, embeds: np.ndarray, kv: KV) -> tuple[dict[str, np.ndarray], KV]:
    """Run a decoder-with-KV graph on embeds [S, D] after the `past` positions held in kv."""
    past = kv[0][0].shape[2]
    s = embeds.shape[0]
    feeds = {
        "inputs_embeds": embeds[None],
        "attention_mask": np.ones((1, past + s), np.int64),
        "position_ids": np.arange(past, past + s, dtype=np.int64)[None],
    }
    for i, (k, v) in enumerate(kv):
        feeds[spec.past % (i, "key")] = k
        feeds[spec.past % (i, "value")] = v
    out = graph.run(feeds)
    return out, [(out[spec.present % (i, "key")], out[spec.present % (i, "value")]) for i in range(len(kv))]


def forward(decoder: OnnxGraph, spec: KVSpec, embeds: np.ndarray, kv: KV) -> tuple[np.ndarray, KV]:
    """The language model on embeds [S, D] -> (logits of the last position [V], kv)."""
    out, kv = run(decoder, spec, embeds, kv)
    return out["logits"][0, -1], kv


def compress(compressor: OnnxGraph, image_embeds: np.ndarray) -> np.ndarray:  # [N, D] -> [1, D]
    return compressor.run({compressor.input_names[0]: image_embeds[None]})[compressor.output_names[0]][0]


def prefuse(prefusion: OnnxGraph, spec: KVSpec, text: np.ndarray, image_kv: KV) -> np.ndarray:
    """Pre-fusion: text embeds [S, D] attend (causally) after the image's cached prefix -> fused [S, D]."""
    out, _ = run(prefusion, spec, text, image_kv)
    return out["fused"][0]


def common_prefix(a: Sequence, b: Sequence) -> int:
    """How many leading positions two cache-key lists share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

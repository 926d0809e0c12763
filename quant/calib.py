"""Calibration data and measuring a bundle with some of its graphs swapped, all in memory.

Calibration prompts are procedural shapes scenes and questions (offline, seeded): any VLM bundle can take
them. Feeds are recorded from the fp32 runtime itself, so every graph (vision, decoder with KV, LLaVA-Mini's
compressor and pre-fusion) is calibrated on exactly what it sees at run time.
"""

from __future__ import annotations

import copy
import time
from typing import Iterator

import numpy as np

from edgevlm.backends.onnx import OnnxGraph
from edgevlm.data import shapes
from edgevlm.model import VLM

ALIASES = {"vision": "vision", "embed": "embedder", "decoder": "decoder", "compressor": "compressor",
           "prefusion": "prefusion"}
CALIB_SEED = 7_000_001  # held out from training (seeds below 1,000,000) and from the eval seeds


def examples(seed: int, n: int, start: int = 0) -> list[tuple]:
    """n (image, question, answer) triples of the shapes eval split."""
    return [(ex.image, ex.question, ex.answer) for ex in shapes.examples(seed, n, split="eval", start=start)]


def record_feeds(vlm: VLM, prompts: list[tuple], decode_tokens: int = 2) -> dict[str, list[dict]]:
    """Run the fp32 runtime on the prompts; every graph's feeds, per component name."""
    feeds: dict[str, list[dict]] = {name: [] for name in vlm.graphs}
    originals = {name: g.run for name, g in vlm.graphs.items()}

    def recorder(name):
        def run(f):
            feeds[name].append({k: np.array(v, copy=True) for k, v in f.items()})
            return originals[name](f)
        return run

    inplace, vlm.kv_inplace = vlm.kv_inplace, False  # the decoder's feeds as plain arrays, through run()
    try:
        for name, g in vlm.graphs.items():
            g.run = recorder(name)  # an instance attribute on our own object, removed below
        for image, question, *_ in prompts:
            vlm.caches.clear()
            vlm.generate(image, question, max_tokens=1 + decode_tokens)
    finally:
        vlm.kv_inplace = inplace
        for g in vlm.graphs.values():
            g.__dict__.pop("run", None)
    return feeds


def swap(vlm: VLM, graphs: dict[str, bytes]) -> VLM:
    """A VLM sharing the tokenizer and manifest of `vlm`, with the named graphs replaced (cold image cache)."""
    out = copy.copy(vlm)
    out.graphs = dict(vlm.graphs)
    for name, model in graphs.items():
        g = OnnxGraph(name, model, threads=1)
        out.graphs[name] = g
        if name in ALIASES:
            setattr(out, ALIASES[name], g)
    if vlm.manifest.is_static:  # its own cache and wrappers around the new graphs
        from edgevlm.backends.static_kv import bind

        bind(out)
    out.caches = out.new_caches()  # the swapped graphs must not see the original's cached arrays
    return out


def first_logits(vlm: VLM, image, question: str) -> np.ndarray:
    """Logits [V] of the first answer token (prefill's last position)."""
    return vlm.prompt_logits(image, question)


def kl(ref: np.ndarray, got: np.ndarray) -> float:
    """KL(softmax(ref) || softmax(got)) in nats, per row averaged."""
    def logp(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    a, b = logp(ref.astype(np.float64)), logp(got.astype(np.float64))
    return float((np.exp(a) * (a - b)).sum(-1).mean())


def answers(vlm: VLM, prompts: list[tuple], max_tokens: int = 24) -> list[str]:
    return [vlm.generate(image, question, max_tokens=max_tokens) for image, question, *_ in prompts]


def cold_ttft(vlm: VLM, prompts: list[tuple], repeats: int = 1) -> float:
    """Median seconds to the first token for images the runtime has not seen (image cache cold)."""
    image, question, *_ = prompts[0]
    next(iter(vlm.stream(image, question, max_tokens=1)))  # warm up: new sessions allocate on their first run
    times = []
    for _ in range(repeats):
        for image, question, *_ in prompts:
            vlm.caches.clear()
            t = time.perf_counter()
            next(iter(vlm.stream(image, question, max_tokens=1)))
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def feed_iter(feeds: list[dict]) -> Iterator[dict]:
    return iter(feeds)

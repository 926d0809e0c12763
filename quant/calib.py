"""Calibration data and measuring a bundle with some of its graphs swapped, all in memory.

Calibration prompts are procedural shapes scenes and questions (offline, seeded): any VLM bundle can take
them. Feeds are recorded from the fp32 runtime itself, so every graph (vision, decoder with KV, LLaVA-Mini's
compressor and pre-fusion) is calibrated on exactly what it sees at run time.
"""

from __future__ import annotations

import time

import numpy as np

from edgevlm.data import shapes
from edgevlm.model import VLM

CALIB_SEED = 7_000_001  # held out from training (seeds below 1,000,000) and from the eval seeds


def examples(seed: int, n: int, start: int = 0) -> list[tuple]:
    """n (image, question, answer) triples of the shapes eval split."""
    return [(ex.image, ex.question, ex.answer) for ex in shapes.examples(seed, n, split="eval", start=start)]


def record_feeds(vlm: VLM, prompts: list[tuple], decode_tokens: int = 2) -> dict[str, list[dict]]:
    """Run the fp32 runtime on the prompts; every graph's feeds, per component name."""
    with vlm.recording() as feeds:
        for image, question, *_ in prompts:
            vlm.caches.clear()
            vlm.generate(image, question, max_tokens=1 + decode_tokens)
    return feeds


def swap(vlm: VLM, graphs: dict[str, bytes]) -> VLM:
    """A VLM sharing the tokenizer and manifest of `vlm`, with the named graphs replaced (cold caches)."""
    return vlm.with_graphs(graphs, threads=1)


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

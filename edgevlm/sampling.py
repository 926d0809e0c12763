"""Samplers are closures over a seeded numpy Generator: no global random state."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from .errors import ArgumentError

Sampler = Callable[[np.ndarray, Sequence[int]], int]  # (logits [vocab], tokens so far) -> next token


def make_sampler(
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
) -> Sampler:
    """Greedy when temperature == 0; otherwise temperature, top-k, top-p (nucleus) sampling.

    repetition_penalty follows the CTRL/transformers rule: logits of tokens already generated are divided
    by the penalty when positive and multiplied by it when negative.
    """
    real = (int, float, np.integer, np.floating)
    if not all(isinstance(x, real) and not isinstance(x, bool) and math.isfinite(x)
               for x in (temperature, top_k, top_p, repetition_penalty)) or int(top_k) != top_k:
        raise ArgumentError("temperature, top_p and repetition_penalty must be finite numbers, top_k an integer")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or repetition_penalty <= 0:
        raise ArgumentError("need temperature >= 0, top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0")
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
        raise ArgumentError(f"seed must be a non-negative integer or None, got {seed!r}")
    top_k = int(top_k)
    rng = np.random.default_rng(seed)

    def penalise(logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        if repetition_penalty == 1.0 or not len(history):
            return logits
        logits = logits.astype(np.float32, copy=True)
        ids = np.unique(np.asarray(history, dtype=np.int64))
        sel = logits[ids]
        logits[ids] = np.where(sel > 0, sel / repetition_penalty, sel * repetition_penalty)
        return logits

    def sample(logits: np.ndarray, history: Sequence[int] = ()) -> int:  # logits: [vocab]
        logits = penalise(logits, history)
        if temperature == 0:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / temperature
        if top_k and top_k < x.size:
            kth = np.partition(x, -top_k)[-top_k]
            x = np.where(x < kth, -np.inf, x)
        p = np.exp(x - x.max())
        p /= p.sum()
        if top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, top_p) + 1)]
            mask = np.zeros_like(p)
            mask[keep] = p[keep]
            p = mask / mask.sum()
        return int(rng.choice(p.size, p=p))

    return sample

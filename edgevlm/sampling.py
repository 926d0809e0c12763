"""Samplers are closures over a seeded numpy Generator: no global random state."""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np

from .errors import ArgumentError, BackendError

Sampler = Callable[[np.ndarray, Sequence[int]], int]  # (logits [vocab], tokens so far) -> next token


def make_sampler(
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    logit_bias: Mapping[int, float] | None = None,
) -> Sampler:
    """Greedy when temperature == 0; otherwise temperature, top-k, top-p (nucleus) sampling.

    repetition_penalty follows the CTRL/transformers rule: logits of tokens already generated are divided
    by the penalty when positive and multiplied by it when negative. logit_bias (OpenAI's): token id ->
    a number in [-100, 100] added to that token's logit before anything else (-100 bans it in practice).
    """
    real = (int, float, np.integer, np.floating)
    try:
        ok = all(isinstance(x, real) and not isinstance(x, bool) and math.isfinite(x)
                 for x in (temperature, top_p, repetition_penalty))
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok or not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool):
        raise ArgumentError("temperature, top_p and repetition_penalty must be finite numbers, top_k an integer")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or repetition_penalty <= 0:
        raise ArgumentError("need temperature >= 0, top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0")
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
        raise ArgumentError(f"seed must be a non-negative integer or None, got {seed!r}")
    top_k = min(int(top_k), 1 << 31)  # beyond any vocabulary: no top-k cut
    rng = np.random.default_rng(seed)
    bias_ids, bias = _bias_arrays(logit_bias)

    def penalise(logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        if repetition_penalty == 1.0 or not len(history):
            return logits
        logits = logits.astype(np.float32, copy=True)
        ids = np.unique(np.asarray(history, dtype=np.int64))
        sel = logits[ids]
        logits[ids] = np.where(sel > 0, sel / repetition_penalty, sel * repetition_penalty)
        return logits

    def sample(logits: np.ndarray, history: Sequence[int] = ()) -> int:  # logits: [vocab]
        if bias_ids.size:
            if bias_ids[-1] >= logits.size:
                raise ArgumentError(f"logit_bias names token {int(bias_ids[-1])}; the vocabulary has {logits.size}")
            logits = logits.astype(np.float32, copy=True)
            logits[bias_ids] += bias
        logits = penalise(logits, history)
        if temperature == 0:
            best = int(np.argmax(logits))  # a NaN anywhere, or +inf, would be picked: no sound choice then
            if not math.isfinite(float(logits[best])):
                raise BackendError(f"the model produced a non-finite logit ({float(logits[best])}) for token {best}")
            return best
        top = float(logits.max())
        if not math.isfinite(top):  # NaN, +inf, or every token banned (-inf)
            raise BackendError(f"the model produced non-finite logits (max {top}): cannot sample")
        # shifted first: every value <= 0, so a tiny temperature gives -inf (probability 0), never inf - inf
        with np.errstate(over="ignore", divide="ignore"):  # a tiny temperature: -inf, probability 0
            x = (logits.astype(np.float64) - top) / temperature
        if top_k and top_k < x.size:
            kth = np.partition(x, -top_k)[-top_k]
            x = np.where(x < kth, -np.inf, x)
        p = np.exp(x)  # the kept maximum is 0: exp(0) = 1, so the sum is at least 1
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


def _bias_arrays(logit_bias: Mapping[int, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """Validated logit_bias -> (sorted token ids, their biases)."""
    if not logit_bias:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    if not isinstance(logit_bias, Mapping):
        raise ArgumentError("logit_bias must map token ids to numbers")
    items = sorted(logit_bias.items())
    for tok, b in items:
        if not isinstance(tok, (int, np.integer)) or isinstance(tok, bool) or not 0 <= tok < 1 << 31:
            raise ArgumentError(f"logit_bias keys must be token ids (0 .. 2**31-1), got {tok!r:.40}")
        if not isinstance(b, (int, float, np.integer, np.floating)) or isinstance(b, bool) or not -100 <= b <= 100:
            raise ArgumentError(f"logit_bias values must be numbers in [-100, 100], got {b!r}")
    return np.array([t for t, _ in items], np.int64), np.array([b for _, b in items], np.float32)

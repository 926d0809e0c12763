"""Choosing the next token: logits processors change logits, a sampler picks one. Closures over a seeded numpy
Generator: no global random state.

    processors = make_logits_processors(repetition_penalty=1.1, logit_bias={2: -100})
    sample = make_sampler(temperature=0.7, top_p=0.9, seed=1)
    for p in processors: logits = p(logits, history)
    token = sample(logits)

Structured output adds a processor (a mask of the tokens its grammar allows); samplers never change.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np

from .errors import ArgumentError, BackendError

Sampler = Callable[[np.ndarray], int]  # logits [vocab] -> next token
Processor = Callable[[np.ndarray, Sequence[int]], np.ndarray]  # (logits [vocab], tokens so far) -> logits
MAX_TOKEN_ID = (1 << 31) - 1
MAX_BIAS = 100  # logit_bias values lie in [-MAX_BIAS, MAX_BIAS] (OpenAI's range)


def _finite_numbers(*xs) -> bool:
    try:
        return all(isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
                   and math.isfinite(x) for x in xs)
    except OverflowError:  # an int too large for a float
        return False


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> Sampler:
    """Greedy when temperature == 0; otherwise temperature, top-k, top-p (nucleus) sampling."""
    if not _finite_numbers(temperature, top_p) or not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool):
        raise ArgumentError("temperature and top_p must be finite numbers, top_k an integer")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ArgumentError("need temperature >= 0, top_k >= 0, 0 < top_p <= 1")
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
        raise ArgumentError(f"seed must be a non-negative integer or None, got {seed!r:.40}")
    top_k = min(int(top_k), 1 << 31)  # beyond any vocabulary: no top-k cut
    rng = np.random.default_rng(seed)

    def greedy(logits: np.ndarray) -> int:  # logits: [vocab]
        best = int(np.argmax(logits))  # a NaN anywhere, or +inf, would be picked: no sound choice then
        if not math.isfinite(float(logits[best])):
            raise BackendError(f"the model produced a non-finite logit ({float(logits[best])}) for token {best}")
        return best

    def sample(logits: np.ndarray) -> int:
        top = float(logits.max())
        if not math.isfinite(top):  # NaN, +inf, or every token banned (-inf)
            raise BackendError(f"the model produced non-finite logits (max {top}): cannot sample")
        with np.errstate(over="ignore", divide="ignore"):  # shifted first: a tiny temperature gives -inf, not nan
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

    return greedy if temperature == 0 else sample


def make_logits_processors(repetition_penalty: float = 1.0, logit_bias: Mapping[int, float] | None = None,
                           vocab: int | None = None) -> list[Processor]:
    """logit_bias (OpenAI's): token id -> a number in [-100, 100] added to that token's logit (-100 bans it in
    practice), first. repetition_penalty (the CTRL/transformers rule): logits of tokens already generated are
    divided by the penalty when positive, multiplied by it when negative. vocab: refuse ids beyond it."""
    if not _finite_numbers(repetition_penalty) or repetition_penalty <= 0:
        raise ArgumentError("repetition_penalty must be a finite number > 0")
    out: list[Processor] = []
    ids, bias = _bias_arrays(logit_bias)
    if ids.size:
        if vocab is not None and ids[-1] >= vocab:
            raise ArgumentError(f"logit_bias names token {int(ids[-1])}; the vocabulary has {vocab}")

        def add_bias(logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
            if ids[-1] >= logits.size:
                raise ArgumentError(f"logit_bias names token {int(ids[-1])}; the vocabulary has {logits.size}")
            logits = logits.astype(np.float32, copy=True)
            logits[ids] += bias
            return logits

        out.append(add_bias)
    if repetition_penalty != 1.0:
        def penalise(logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
            if not len(history):
                return logits
            logits = logits.astype(np.float32, copy=True)
            seen = np.unique(np.asarray(history, dtype=np.int64))
            sel = logits[seen]
            logits[seen] = np.where(sel > 0, sel / repetition_penalty, sel * repetition_penalty)
            return logits

        out.append(penalise)
    return out


def _bias_arrays(logit_bias: Mapping[int, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """Validated logit_bias -> (sorted token ids, their biases)."""
    if not logit_bias:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    if not isinstance(logit_bias, Mapping):
        raise ArgumentError("logit_bias must map token ids to numbers")
    items = sorted(logit_bias.items(), key=lambda kv: kv[0] if isinstance(kv[0], (int, np.integer)) else -1)
    for tok, b in items:
        if not isinstance(tok, (int, np.integer)) or isinstance(tok, bool) or not 0 <= tok <= MAX_TOKEN_ID:
            raise ArgumentError(f"logit_bias keys must be token ids (0 .. 2**31-1), got {tok!r:.40}")
        if not _finite_numbers(b) or not -MAX_BIAS <= b <= MAX_BIAS:
            raise ArgumentError(f"logit_bias values must be numbers in [-{MAX_BIAS}, {MAX_BIAS}], got {b!r:.40}")
    return np.array([t for t, _ in items], np.int64), np.array([b for _, b in items], np.float32)

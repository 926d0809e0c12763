"""Accuracy of a bundle on a procedural dataset: exact match after normalisation, overall and per type."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

from .data import shapes

DATASETS = {"shapes": shapes}


def evaluate(vlm, dataset: str = "shapes", seed: int = shapes.TEST_SEED, n: int = 500,
             progress: Callable[[int], None] | None = None, max_tokens: int = 24, start: int = 0,
             max_image_tokens: int | None = None) -> dict:
    """Greedy answers to held-out questions start .. start+n-1 (split "eval" of the seed) -> accuracy figures."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r} (known: {', '.join(DATASETS)})")
    data = DATASETS[dataset]
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for ex in data.examples(seed, n, split="eval", start=start):
        got = vlm.generate(ex.image, ex.question, max_tokens=max_tokens, max_image_tokens=max_image_tokens)
        total[ex.qtype] += 1
        right[ex.qtype] += data.normalize_answer(got) == data.normalize_answer(ex.answer)
        if progress:
            progress(1)
    per_type = {t: right[t] / total[t] for t in sorted(total)}
    return {"accuracy": sum(right.values()) / max(1, n), "per_type": per_type, "n": n,
            "max_image_tokens": max_image_tokens,
            "bundle": str(vlm.bundle.root)}

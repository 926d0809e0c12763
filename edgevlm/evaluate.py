"""Accuracy of a bundle on a procedural dataset: exact match after normalisation, overall and per type.

Datasets: "shapes" (one question about a shapes scene, per question type), "chats" (three questions about one
scene in one chat, previous answers in context; per turn), "outworld" (a picture from outside the shapes world
and any question, answered right only by the demo's one sentence; per kind of picture).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable

from .data import chats, outworld, shapes

DATASETS = {"shapes": shapes, "outworld": outworld, "chats": chats}
TEST_SEEDS = {"shapes": shapes.TEST_SEED, "outworld": outworld.TEST_SEED, "chats": chats.TEST_SEED}


def evaluate(vlm, dataset: str = "shapes", seed: int = shapes.TEST_SEED, n: int = 500,
             progress: Callable[[int], None] | None = None, max_tokens: int | None = None, start: int = 0,
             max_image_tokens: int | None = None) -> dict:
    """Greedy answers to held-out questions start .. start+n-1 (split "eval" of the seed) -> accuracy figures.
    For "chats", n chats of three questions: accuracy over all answers, per_type per turn ("turn1", ...).
    max_tokens: an answer's cap (default: 24, and 64 for "outworld", whose one right answer is a sentence)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r} (known: {', '.join(DATASETS)})")
    if max_tokens is None:
        max_tokens = 64 if dataset == "outworld" else 24
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for qtype, got, want in _answers(vlm, dataset, seed, n, start, max_tokens, max_image_tokens, progress):
        total[qtype] += 1
        right[qtype] += shapes.normalize_answer(got) == shapes.normalize_answer(want)
    per_type = {t: right[t] / total[t] for t in sorted(total)}
    return {"accuracy": sum(right.values()) / max(1, sum(total.values())), "per_type": per_type, "n": n,
            "max_image_tokens": max_image_tokens, "bundle": str(vlm.bundle.root)}


def _answers(vlm, dataset, seed, n, start, max_tokens, max_image_tokens, progress):
    """(type, answer given, right answer) per question."""
    for i in range(start, start + n):
        if dataset == "chats":
            chat = chats.shapes_chat(seed, i, 3)
            c = vlm.chat()
            for k, t in enumerate(chat.turns):
                got = c.send(t.question, image=chat.image if k == 0 else None, max_tokens=max_tokens,
                             max_image_tokens=max_image_tokens)
                yield f"turn{k + 1}", got, t.answer
        else:
            ex = DATASETS[dataset].make_example(seed, i, "eval")
            yield ex.qtype, vlm.generate(ex.image, ex.question, max_tokens=max_tokens,
                                         max_image_tokens=max_image_tokens), ex.answer
        if progress:
            progress(1)


def degenerate(text: str, finished: bool) -> bool:
    """An answer that ran to the token limit without ending, or that repeats itself: a piece of 1-12 characters
    four or more times in a row ("6666", "red red red red")."""
    return not finished or re.search(r"(.{1,12}?)\1{3,}", text, re.DOTALL) is not None

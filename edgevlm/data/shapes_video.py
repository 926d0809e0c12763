"""Procedural "shapes videos": the shapes world (edgevlm/data/shapes.py) changing over 2..8 frames, with questions
that need more than one frame.

    from edgevlm.data.shapes_video import make_video_example
    ex = make_video_example(seed=0, index=3, split="eval", frames=6)  # ex.frames, ex.question, ex.answer, ex.qtype

Two stories: objects appear one after another (each in its own frame; frames between keep the scene), or one
object moves across the picture while the others stay. Questions: which object appeared last / first, how many
objects there are at the end, which object moved, and which way. Answers are short and exact ("red star", "3",
"left"). Like the still set, every example is a pure function of (seed, index, split, frames).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image

from .shapes import GRID, JITTER, SPLITS, Obj, Scene, _combo_weights, _COMBOS, _weighted_index, render

VIDEO_QTYPES = ("appeared_last", "appeared_first", "count_end", "moved", "direction")
MIN_FRAMES, MAX_FRAMES = 2, 8
MAX_APPEARING = 5  # objects of an "appear" story (at most one new object per frame)
QUESTIONS = {
    "appeared_last": "Which shape appeared last?",
    "appeared_first": "Which shape appeared first?",
    "count_end": "How many shapes are there at the end?",
    "moved": "Which shape moved?",
    "direction": "Which way did the {} move?",
}


@dataclass(frozen=True)
class VideoExample:
    frames: tuple[Image.Image, ...]
    question: str
    answer: str
    qtype: str
    scenes: tuple[Scene, ...]


def _objects(rng: np.random.Generator, n: int, split: str) -> list[Obj]:
    """n objects of distinct (colour, shape) in distinct cells (the still set's weights and jitter)."""
    weights = _combo_weights(split)
    picks: list[int] = []
    while len(picks) < n:
        i = int(_weighted_index(rng, weights))
        if i not in picks:
            picks.append(i)
    cells = rng.permutation(GRID * GRID)[:n]
    jitter = rng.uniform(-JITTER, JITTER, (n, 2))
    sizes = ["large" if b else "small" for b in rng.random(n) < 0.5]
    return [Obj(_COMBOS[p][1], _COMBOS[p][0], sizes[i], (int(c) % GRID + 0.5) / GRID + float(jitter[i, 0]),
                (int(c) // GRID + 0.5) / GRID + float(jitter[i, 1])) for i, (p, c) in enumerate(zip(picks, cells))]


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    base = int(rng.integers(205, 236))
    return tuple(int(base + j) for j in rng.integers(-6, 7, 3))


def appear_story(rng: np.random.Generator, frames: int, split: str) -> tuple[list[Scene], dict]:
    """One object in the first frame; each later object appears in a frame of its own (in order)."""
    n = int(rng.integers(2, min(frames, MAX_APPEARING) + 1))
    objs, bg = _objects(rng, n, split), _background(rng)
    at = [0] + sorted(rng.choice(np.arange(1, frames), n - 1, replace=False).tolist())
    scenes = [Scene(tuple(o for o, t in zip(objs, at) if t <= f), bg) for f in range(frames)]
    name = lambda o: f"{o.color} {o.shape}"  # noqa: E731
    return scenes, {"appeared_last": name(objs[-1]), "appeared_first": name(objs[0]), "count_end": str(n)}


def move_story(rng: np.random.Generator, frames: int, split: str) -> tuple[list[Scene], dict]:
    """One object moves two or three cells along its row or column, evenly over the frames; the others stay
    off its path."""
    n = int(rng.integers(1, 4))
    for _ in range(100):
        objs = _objects(rng, n, split)
        mover, axis = objs[0], int(rng.integers(0, 2))  # 0: along the row (x), 1: along the column (y)
        col, row = min(int(mover.cx * GRID), GRID - 1), min(int(mover.cy * GRID), GRID - 1)
        at = col if axis == 0 else row
        ends = [c for c in range(GRID) if abs(c - at) >= 2]
        if not ends:
            continue
        end = int(rng.choice(ends))
        lane = {(row, c) if axis == 0 else (c, col) for c in range(min(at, end), max(at, end) + 1)}
        if any((min(int(o.cy * GRID), GRID - 1), min(int(o.cx * GRID), GRID - 1)) in lane for o in objs[1:]):
            continue
        break
    else:
        raise RuntimeError("no free lane for a moving object")
    bg, step = _background(rng), (end - at) / GRID
    scenes = []
    for f in range(frames):
        k = f / (frames - 1)
        moved = Obj(mover.shape, mover.color, mover.size, mover.cx + (k * step if axis == 0 else 0.0),
                    mover.cy + (k * step if axis == 1 else 0.0))
        scenes.append(Scene((moved, *objs[1:]), bg))
    way = ("right" if end > at else "left") if axis == 0 else ("down" if end > at else "up")
    return scenes, {"moved": f"{mover.color} {mover.shape}", "direction": way, "count_end": str(n),
                    "_mover": f"{mover.color} {mover.shape}"}


def _rng(seed: int, index: int, split: str, frames: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return np.random.default_rng([seed, index, SPLITS[split], 7919, frames])


def make_video_example(seed: int, index: int, split: str = "eval", frames: int | None = None,
                       size: int = 128) -> VideoExample:
    """One video and a question about it; frames: 2..8 (None: drawn from the same generator)."""
    rng = _rng(seed, index, split, frames or 0)
    frames = frames or int(rng.integers(MIN_FRAMES, MAX_FRAMES + 1))
    if not MIN_FRAMES <= frames <= MAX_FRAMES:
        raise ValueError(f"frames must be in {MIN_FRAMES}..{MAX_FRAMES}, got {frames}")
    qtype = VIDEO_QTYPES[int(rng.integers(0, len(VIDEO_QTYPES)))]
    story = move_story if qtype in ("moved", "direction") or (qtype == "count_end" and rng.random() < 0.3) \
        else appear_story
    scenes, answers = story(rng, frames, split)
    question = QUESTIONS[qtype].format(answers.get("_mover", ""))
    return VideoExample(tuple(render(s, size) for s in scenes), question, answers[qtype], qtype, tuple(scenes))


def video_examples(seed: int, n: int, split: str = "eval", frames: int | None = None, start: int = 0,
                   size: int = 128) -> Iterator[VideoExample]:
    for i in range(start, start + n):
        yield make_video_example(seed, i, split, frames, size)


__all__ = ["VideoExample", "VIDEO_QTYPES", "make_video_example", "video_examples"]

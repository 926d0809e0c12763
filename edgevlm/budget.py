"""Image-token budget: fewer image rows before the language model, without training.

The rows of one tile form a grid (the manifest's `image_layout.grid`; a plain sequence without one).
They are put in Z order (Morton: nearby cells stay nearby) and cut into `k` runs of nearly equal length,
so every part of the picture keeps a representative ("Feather the Throttle": pruning that ranks tokens
globally drops whole regions, often the top of the image). Per run:

- "stratified": keep the row with the largest L2 norm — the saliency proxy FasterVLM/HiRED-style
  pruning uses when the tower's [CLS] attention is not at hand (our vision graphs emit features only);
- "hybrid" (default): a coverage floor plus saliency — k // 2 runs keep their strongest row, the other slots go to
  the strongest rows left anywhere;
- "merge": the run's mean (AIM-style merging of neighbours, here of spatial neighbours);
- "topk": no runs — the k largest norms anywhere (a global ranking, for comparison);
- "first": the first k rows in raster order (plain truncation, for comparison).

Kept rows stay in raster order; the LLM sees them at consecutive positions.
"""

from __future__ import annotations

import numpy as np

from .errors import ArgumentError

METHODS = ("stratified", "hybrid", "merge", "topk", "first")


def _interleave(v: np.ndarray) -> np.ndarray:
    out = np.zeros_like(v)
    for b in range(16):
        out |= ((v >> b) & 1) << (2 * b)
    return out


def z_order(grid: tuple[int, int] | None, n: int) -> np.ndarray:
    """Row indices [n] in Z order over an (h, w) raster grid (identity without a grid)."""
    if grid is None or grid[0] * grid[1] != n:
        return np.arange(n)
    r, c = np.divmod(np.arange(n, dtype=np.int64), grid[1])
    return np.argsort(_interleave(r) << 1 | _interleave(c), kind="stable")


def reduce(rows: np.ndarray, k: int, grid: tuple[int, int] | None = None, method: str = "hybrid") -> np.ndarray:
    """rows [n, D] -> [min(k, n), D]."""
    n = rows.shape[0]
    if method not in METHODS:
        raise ArgumentError(f"unknown token budget method {method!r}: one of {', '.join(METHODS)}")
    if k < 1:
        raise ArgumentError("max_image_tokens must be at least 1")
    if k >= n:
        return rows
    norms = np.linalg.norm(rows.astype(np.float32), axis=-1)
    if method == "first":
        return rows[:k]
    if method == "topk":
        return rows[np.sort(np.argsort(-norms, kind="stable")[:k])]
    order = z_order(grid, n)
    if method == "hybrid":
        floor = [run[np.argmax(norms[run])] for run in np.array_split(order, max(1, k // 2))]
        rest = [i for i in np.argsort(-norms, kind="stable") if i not in set(floor)][:k - len(floor)]
        return rows[np.sort(np.asarray(floor + rest))]
    runs = np.array_split(order, k)
    if method == "merge":
        runs = sorted(runs, key=lambda run: int(run.min()))  # raster order of the groups
        return np.stack([rows[run].mean(axis=0) for run in runs]).astype(rows.dtype)
    keep = np.sort([run[np.argmax(norms[run])] for run in runs])
    return rows[keep]

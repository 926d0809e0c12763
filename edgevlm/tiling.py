"""Tiled images: one picture -> several vision-graph inputs -> the rows the language model sees.

Two layouts, both described by the manifest's `image_layout` (never by a family name):

- "split" (Idefics3 / SmolVLM): resize the longest edge, round both sides up to whole tiles, cut the
  tiles row by row and add the whole image resized to one tile; each tile's rows go to the LLM in that
  order, with marker tokens between them written by the layout's prompt template.
- "anyres" (LLaVA-NeXT / OneVision): pick the best grid resolution, letterbox into it, cut tiles; the
  whole image resized to one tile comes first. Tile features are stitched back into one feature map,
  the letterbox rows/columns dropped, shrunk when too large, and a row-end embedding closes each row.

Every resize is the processor's own uint8 kernel (edgevlm.image.resize), so pixels match bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .manifest import ImageLayout, Preprocess
from .image import normalize, resize
from . import template

MAX_SIDE = 4096  # Idefics3 caps a resized side at this


@dataclass(frozen=True)
class Tiles:
    pixels: np.ndarray  # [T, 3, S, S] float32, in the order the LLM sees them
    rows: int  # the tile grid; (0, 0) when the image is a single tile
    cols: int
    size: tuple[int, int]  # the image's (height, width) as loaded


def _cut(img: np.ndarray, s: int) -> list[np.ndarray]:
    return [img[r:r + s, c:c + s] for r in range(0, img.shape[0], s) for c in range(0, img.shape[1], s)]


def longest_edge_size(h: int, w: int, edge: int) -> tuple[int, int]:
    # Idefics3: the longest side becomes `edge` (up or down), the other follows, rounded up to even
    aspect = w / h
    if w >= h:
        w, h = edge, int(edge / aspect)
        h += h % 2
    else:
        h, w = edge, int(edge * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    aspect = w / h
    if w >= h and w > MAX_SIDE:
        w, h = MAX_SIDE, int(MAX_SIDE / aspect)
    elif h > w and h > MAX_SIDE:
        h, w = MAX_SIDE, int(MAX_SIDE * aspect)
    return max(h, 1), max(w, 1)


def _whole_tiles_size(h: int, w: int, s: int) -> tuple[int, int]:
    aspect = w / h
    if w >= h:
        w = math.ceil(w / s) * s
        h = math.ceil(int(w / aspect) / s) * s
    else:
        h = math.ceil(h / s) * s
        w = math.ceil(int(h * aspect) / s) * s
    return h, w


def split_tiles(rgb: np.ndarray, pre: Preprocess, lay: ImageLayout) -> Tiles:
    s, kern = lay.tile_size, pre.resize_kernel
    img = resize(rgb, *longest_edge_size(*rgb.shape[:2], lay.longest_edge), pre.resample, kern)
    img = resize(img, *_whole_tiles_size(*img.shape[:2], s), pre.resample, kern)
    h, w = img.shape[:2]
    if h <= s and w <= s:
        return Tiles(normalize(img, pre)[None], 0, 0, rgb.shape[:2])
    whole = resize(img, s, s, pre.resample, kern)
    tiles = _cut(img, s)
    tiles = [whole] + tiles if lay.global_tile == "first" else tiles + [whole]
    return Tiles(np.stack([normalize(t, pre) for t in tiles]), h // s, w // s, rgb.shape[:2])


def best_resolution(h: int, w: int, pinpoints) -> tuple[int, int]:
    """LLaVA-NeXT's choice: the most effective pixels, then the least waste."""
    best, most, waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        wasted = ph * pw - effective
        if effective > most or (effective == most and wasted < waste):
            best, most, waste = (ph, pw), effective, wasted
    return best


def anyres_tiles(rgb: np.ndarray, pre: Preprocess, lay: ImageLayout) -> Tiles:
    s, kern = lay.tile_size, pre.resize_kernel
    h, w = rgb.shape[:2]
    th, tw = best_resolution(h, w, lay.pinpoints)
    if tw / w < th / h:
        nh, nw = min(math.ceil(h * tw / w), th), tw
    else:
        nh, nw = th, min(math.ceil(w * th / h), tw)
    canvas = np.zeros((th, tw, 3), np.uint8)  # letterbox in black, centred (extra pixel right/bottom)
    top, left = (th - nh) // 2, (tw - nw) // 2
    canvas[top:top + nh, left:left + nw] = resize(rgb, nh, nw, pre.resample, kern)
    whole = resize(rgb, s, s, pre.resample, kern)
    tiles = _cut(canvas, s)
    tiles = [whole] + tiles if lay.global_tile == "first" else tiles + [whole]
    return Tiles(np.stack([normalize(t, pre) for t in tiles]), th // s, tw // s, (h, w))


def make_tiles(rgb: np.ndarray, pre: Preprocess, lay: ImageLayout) -> Tiles:
    return split_tiles(rgb, pre, lay) if lay.tiling == "split" else anyres_tiles(rgb, pre, lay)


def _unpad(fmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:  # [H, W, D] -> the part over the picture
    oh, ow = size
    ch, cw = fmap.shape[:2]
    if ow / oh > cw / ch:
        pad = (ch - int(round(oh * (cw / ow), 7))) // 2
        return fmap[pad:ch - pad]
    pad = (cw - int(round(ow * (ch / oh), 7))) // 2
    return fmap[:, pad:cw - pad]


def bilinear(fmap: np.ndarray, oh: int, ow: int) -> np.ndarray:
    # [H, W, D] -> [oh, ow, D]: torch's interpolate(mode="bilinear", align_corners=False), no antialias
    def axis(n_in, n_out):
        x = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(x).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (x - i0).astype(np.float32)

    y0, y1, fy = axis(fmap.shape[0], oh)
    x0, x1, fx = axis(fmap.shape[1], ow)
    top = fmap[y0][:, x0] * (1 - fx)[None, :, None] + fmap[y0][:, x1] * fx[None, :, None]
    bot = fmap[y1][:, x0] * (1 - fx)[None, :, None] + fmap[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bot * fy[:, None, None]


def assemble(feats: np.ndarray, tiles: Tiles, lay: ImageLayout, row_end: np.ndarray | None) -> np.ndarray:
    """Tile features [T, n, D] -> the image's rows for the LLM [N, D]."""
    if lay.tiling != "anyres":
        return feats.reshape(-1, feats.shape[-1])
    whole, grid = (feats[0], feats[1:]) if lay.global_tile == "first" else (feats[-1], feats[:-1])
    gh, gw = lay.grid
    d = feats.shape[-1]
    fmap = grid.reshape(tiles.rows, tiles.cols, gh, gw, d).transpose(0, 2, 1, 3, 4).reshape(
        tiles.rows * gh, tiles.cols * gw, d)
    if lay.unpad:
        fmap = _unpad(fmap, tiles.size)
    if lay.max_tiles_area:
        ratio = math.sqrt(fmap.shape[0] * fmap.shape[1] / (lay.max_tiles_area * gh * gh))
        if ratio > 1.1:
            fmap = bilinear(fmap, int(fmap.shape[0] // ratio), int(fmap.shape[1] // ratio))
    if lay.row_end:
        fmap = np.concatenate([fmap, np.broadcast_to(row_end, (fmap.shape[0], 1, d))], axis=1)
    return np.concatenate([whole, fmap.reshape(-1, d)]).astype(feats.dtype, copy=False)


def placeholder(lay: ImageLayout, image_token: str, rows: int, cols: int, tile_tokens: int, tokens: int) -> str:
    """One image's placeholder text, as the checkpoint's processor writes it."""
    return template.render(lay.prompt, [], add_generation_prompt=False, image=image_token, rows=rows, cols=cols,
                           tile_tokens=tile_tokens, tokens=tokens)

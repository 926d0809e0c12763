"""The image side of a VLM: an image becomes its cached state (embeds for the placeholders, LLaVA-Mini's token and
pre-fusion prefix KV), optionally cut to a token budget, and the placeholder text of its prompt rows.

A mixin of `edgevlm.model.VLM`, which provides the attributes used here: manifest, vision (and, for pre-fusion
bundles, compressor, prefusion, prefusion_kv, prefusion_layers), caches, budget_method, _pre_key, _row_shape.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np

from . import budget, limits, pipeline, tiling
from .errors import BackendError
from .image import input_digest, load_image, preprocess


class ImageSide:
    """Image -> state (cached by content), budgets, placeholders, and the check of states read from disk."""

    def image_state(self, image, max_image_tokens: int | None = None) -> tuple[str, dict, str, dict[str, float]]:
        """-> (cache key, image state, where it was cached: "ram", "disk" or "" (computed now), stage seconds).
        The state is all that depends only on the image: {"rows": embeds for the placeholders [N, D],
        "kv": the pre-fusion KV of the image prefix (pre-fusion bundles) or None, and for tiled images
        "layout": [tile rows, tile cols, rows per tile]}. With a token budget (max_image_tokens, else the
        bundle's), the reduced rows are an image of their own for the caches."""
        m = self.manifest
        t = time.perf_counter()
        raw = input_digest(image)  # the same input bytes always preprocess to the same pixels: skip that
        key = self.caches.aliases.get(raw) if raw else None
        stages = {"preprocess": time.perf_counter() - t}
        t = time.perf_counter()
        state, where = self.caches.get_image(key) if key else (None, "")
        stages["cache"] = time.perf_counter() - t
        if state is None:
            t = time.perf_counter()
            rgb = load_image(image, limits=self.limits, check=self._check_work)
            lay = m.image_layout
            tiles = tiling.make_tiles(rgb, m.preprocess, lay) if lay and lay.tiling != "none" else None
            # the resize takes a second thread unless the caller asked for one (threads=1)
            pixels = tiles.pixels if tiles else preprocess(rgb, m.preprocess, 1 if self.threads == 1 else 2)
            h = hashlib.sha256(memoryview(np.ascontiguousarray(pixels)).cast("B"))  # the content address
            h.update(self._pre_key.encode())  # (the same digest as of the concatenated bytes, without copies)
            key = h.hexdigest()
            stages["preprocess"] += time.perf_counter() - t
            if raw:
                self.caches.aliases.put(raw, key)
            t = time.perf_counter()
            state, where = self.caches.get_image(key)
            stages["cache"] += time.perf_counter() - t
            if state is None:
                state = self._encode(pixels, stages, tiles)
                self.caches.put_image(key, state)
        limit = m.generation.max_image_tokens if max_image_tokens is None else int(max_image_tokens)
        if limit is None or m.fusion != "splice" or limit >= state["rows"].shape[0]:
            if limit is not None and limit < 1:
                budget.reduce(state["rows"], limit)  # the same error as a real reduction
            return key, state, where, stages
        small = hashlib.sha256(f"{key}:{limit}:{self.budget_method}".encode()).hexdigest()
        reduced, _ = self.caches.get_image(small)
        if reduced is None:
            reduced = self._reduce_image(state, limit)
            self.caches.put_image(small, reduced)
        return small, reduced, where, stages

    def _check_work(self, w: int, h: int) -> None:  # an image's header size, before it is decoded
        m = self.manifest
        limits.check_image_work(w, h, m.preprocess, m.image_layout, self.limits)

    def _encode(self, pixels: np.ndarray, stages: dict[str, float], tiles=None) -> dict:
        t = time.perf_counter()
        feats, row_end = [], None
        for tile in pixels:  # [3, S, S]: the vision graph (+ projector) takes one tile at a time
            out = self.vision.run({self.vision.input_names[0]: tile[None]})
            feats.append(out[self.vision.output_names[0]][0])
            row_end = out.get("row_end")
        feats = np.stack(feats)  # [T, n, D]
        embeds = tiling.assemble(feats, tiles, self.manifest.image_layout, row_end) if tiles else feats[0]
        stages["encode"] = time.perf_counter() - t
        state = {"rows": embeds, "kv": None}
        if tiles is not None and self.manifest.image_layout.tiling == "split":
            state["layout"] = np.asarray([tiles.rows, tiles.cols, feats.shape[1]], np.int64)
        if self.manifest.fusion == "prefusion":
            t = time.perf_counter()
            state["rows"] = pipeline.compress(self.compressor, embeds)
            stages["compress"] = time.perf_counter() - t
            t = time.perf_counter()  # the image prefix of the pre-fusion layers: later prompts attend to it
            empty = pipeline.empty_kv(self.prefusion_kv, self.prefusion_layers)
            state["kv"] = pipeline.run(self.prefusion, self.prefusion_kv, embeds, empty)[1]
            stages["prefusion"] = time.perf_counter() - t
        if tiles is None and state["rows"].shape[0] != self.manifest.image_tokens:
            raise BackendError(f"the image gave {state['rows'].shape[0]} rows, manifest says {self.manifest.image_tokens}")
        self._row_shape = state["rows"].shape
        return state

    def _reduce_image(self, state: dict, limit: int) -> dict:
        """The image's rows cut to at most `limit` (edgevlm.budget), spread over the picture."""
        lay = self.manifest.image_layout
        grid = lay.grid if lay else None
        rows = state["rows"]
        if "layout" in state:  # split tiles: every tile keeps the same share, marker tokens stay
            r, c, n = (int(x) for x in state["layout"])
            tiles = rows.reshape(-1, n, rows.shape[-1])
            per = max(1, limit // len(tiles))
            kept = [budget.reduce(f, per, grid, self.budget_method) for f in tiles]
            return {"rows": np.concatenate(kept), "kv": None,
                    "layout": np.asarray([r, c, kept[0].shape[0]], np.int64)}
        tiled = lay is not None and lay.tiling != "none"  # a stitched anyres map: the rows as a sequence
        return {"rows": budget.reduce(rows, limit, None if tiled else grid, self.budget_method), "kv": None}

    def _placeholder(self, state: dict) -> str:
        """The image's placeholder text in the prompt (marker tokens and all, for tiled layouts)."""
        m, n = self.manifest, state["rows"].shape[0]
        if m.image_layout is None:
            return m.image_token * n
        rows, cols, per = (int(x) for x in state["layout"]) if "layout" in state else (0, 0, n)
        return tiling.placeholder(m.image_layout, m.image_token, rows, cols, per, n)

    def _blank_pixels(self) -> np.ndarray:  # [1, 3, H, W] zeros of the tower's input size
        m = self.manifest
        shape = list(m.components["vision"].inputs.get("pixel_values") or [])
        if len(shape) != 4 or not all(isinstance(d, int) for d in shape):  # dynamic: the preprocess's size
            h, w = m.preprocess.crop or m.preprocess.size or (m.preprocess.shortest_edge,) * 2
            shape = [1, 3, h, w]
        return np.zeros(shape, np.float32)

    def _image_fits(self, state: dict) -> bool:  # arrays read from the disk cache
        m = self.manifest
        rows = state["rows"]
        if self._row_shape is None:  # loaded without warm-up, nothing encoded yet: learn the shape once
            self._encode(self._blank_pixels(), {})
        if rows.ndim != 2 or rows.shape[1] != self._row_shape[1] or rows.dtype != np.float32:
            return False
        if not 1 <= rows.shape[0] <= limits.max_rows(m):  # a budget may have cut them, nothing adds any
            return False
        split = m.image_layout is not None and m.image_layout.tiling == "split"
        if split != ("layout" in state):
            return False
        if split:  # [tile rows, tile cols, rows per tile] must account for every row
            lay = state["layout"]
            if lay.shape != (3,) or lay.dtype != np.int64:
                return False
            r, c, per = (int(x) for x in lay)
            if min(r, c) < 0 or per < 1 or (r * c + (1 if r * c else 0)) * per != rows.shape[0] \
                    or r * c + 1 > limits.max_tiles(m):
                return False
        if m.fusion == "prefusion":
            kv = state.get("kv")
            return kv is not None and len(kv) == self.prefusion_layers and pipeline.kv_ok(kv, self.prefusion_kv, None)
        return state.get("kv") is None

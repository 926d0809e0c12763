"""The image side of a VLM: an image becomes its cached state (embeds for the placeholders, LLaVA-Mini's token and
pre-fusion prefix KV), optionally cut to a token budget, and the placeholder text of its prompt rows.

A mixin of `edgevlm.model.VLM`, which provides the attributes used here: manifest, vision (and, for pre-fusion
bundles, compressor, prefusion, prefusion_kv, prefusion_layers), caches, budget_method, _pre_key, _row_shape.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import numpy as np

from . import budget, limits, pipeline, tiling
from .errors import BackendError
from .image import input_digest, load_image, preprocess, resize


class ImageSide:
    """Image -> state (cached by content), budgets, placeholders, and the check of states read from disk."""

    def image_state(self, image, max_image_tokens: int | None = None, multi: bool = False,
                    spend=None) -> tuple[str, dict, str, dict[str, float]]:
        """-> (cache key, image state, where it was cached: "ram", "disk" or "" (computed now), stage seconds).
        The state is all that depends only on the image: {"rows": embeds for the placeholders [N, D],
        "kv": the pre-fusion KV of the image prefix (pre-fusion bundles) or None, and for tiled images
        "layout": [tile rows, tile cols, rows per tile]}. With a token budget (max_image_tokens, else the
        bundle's), the reduced rows are an image of their own for the caches. multi: the image is one of several
        in its prompt (a layout with ImageLayout.multi takes it differently); spend(w, h): told its size before
        it is decoded (a request's pixel budget)."""
        m = self.manifest
        lay = m.image_layout
        one_tile = multi and lay is not None and lay.multi == "one_tile"
        t = time.perf_counter()
        raw = input_digest(image)  # the same input bytes always preprocess to the same pixels: skip that
        raw = raw and raw + (" one_tile" if one_tile else "")
        key = self.caches.aliases.get(raw) if raw else None
        stages = {"preprocess": time.perf_counter() - t}
        t = time.perf_counter()
        state, where = self.caches.get_image(key) if key else (None, "")
        stages["cache"] = time.perf_counter() - t
        if state is None:
            t = time.perf_counter()
            rgb = load_image(image, limits=self.limits, check=self._checker(spend))
            tiles = None
            if one_tile:  # the whole image padded to a square, one tile; its rows and the row end
                square = dataclasses.replace(m.preprocess, pad_to_square=lay.multi_pad)
                pixels = preprocess(rgb, square, self._resize_threads)
            elif lay and lay.tiling != "none":
                tiles = tiling.make_tiles(rgb, m.preprocess, lay)
                pixels = tiles.pixels
            else:
                pixels = preprocess(rgb, m.preprocess, self._resize_threads)
            key = self._content_key(pixels, " one_tile" if one_tile else "")
            stages["preprocess"] += time.perf_counter() - t
            if raw:
                self.caches.aliases.put(raw, key)
            t = time.perf_counter()
            state, where = self.caches.get_image(key)
            stages["cache"] += time.perf_counter() - t
            if state is None:
                state = self._encode(pixels, stages, tiles, row_end=one_tile and lay.row_end)
                self.caches.put_image(key, state)
        return self._budgeted(key, state, where, stages, max_image_tokens)

    def _budgeted(self, key: str, state: dict, where: str, stages: dict, max_image_tokens: int | None):
        m = self.manifest
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

    def frame_state(self, frame, spend=None) -> tuple[str, dict, str, dict[str, float]]:
        """A video frame under the manifest's video layout -> (cache key, state, where cached, stage seconds); the
        state: {"rows": the frame's rows [n, D] (pooled when the layout says so), "kv": None, "row_end": [D] or
        [0]}. Cached by content like an image."""
        v = self.manifest.video
        t = time.perf_counter()
        rgb = load_image(frame, limits=self.limits, check=spend)
        if v.longest_edge:  # (SmolVLM: the longest edge first, then the tile: the frame's aspect is not kept)
            rgb = resize(rgb, *tiling.longest_edge_size(*rgb.shape[:2], v.longest_edge), v.preprocess.resample,
                         v.preprocess.resize_kernel)
        pixels = preprocess(rgb, v.preprocess, self._resize_threads)
        key = self._content_key(pixels, " video")
        stages = {"preprocess": time.perf_counter() - t}
        state, where = self.caches.get_image(key)
        if state is None:
            t = time.perf_counter()
            out = self.vision.run({self.vision.input_names[0]: pixels})
            rows, row_end = out[self.vision.output_names[0]][0], out.get("row_end")
            if v.pool is not None:
                gh, gw = self.manifest.image_layout.grid
                rows = tiling.bilinear(rows.reshape(gh, gw, -1), *v.pool).reshape(-1, rows.shape[-1])
            state = {"rows": np.ascontiguousarray(rows, np.float32), "kv": None,
                     "row_end": np.zeros(0, np.float32) if row_end is None else row_end.reshape(-1)}
            stages["encode"] = time.perf_counter() - t
            self.caches.put_image(key, state)
        return key, state, where, stages

    @property
    def _resize_threads(self) -> int:  # the resize takes a second thread unless the caller asked for one
        return 1 if self.threads == 1 else 2

    def _content_key(self, pixels: np.ndarray, mode: str = "") -> str:
        h = hashlib.sha256(memoryview(np.ascontiguousarray(pixels)).cast("B"))  # the content address
        h.update((self._pre_key + mode).encode())  # (the same digest as of the concatenated bytes, without copies)
        return h.hexdigest()

    def _checker(self, spend):
        if spend is None:
            return self._check_work
        return lambda w, h: (spend(w, h), self._check_work(w, h))

    def _check_work(self, w: int, h: int) -> None:  # an image's header size, before it is decoded
        m = self.manifest
        limits.check_image_work(w, h, m.preprocess, m.image_layout, self.limits)

    def _encode(self, pixels: np.ndarray, stages: dict[str, float], tiles=None, row_end: bool = False) -> dict:
        t = time.perf_counter()
        feats, ends = [], None
        for tile in pixels:  # [3, S, S]: the vision graph (+ projector) takes one tile at a time
            out = self.vision.run({self.vision.input_names[0]: tile[None]})
            feats.append(out[self.vision.output_names[0]][0])
            ends = out.get("row_end")
        feats = np.stack(feats)  # [T, n, D]
        embeds = tiling.assemble(feats, tiles, self.manifest.image_layout, ends) if tiles else feats[0]
        if row_end:  # one tile of several images (LLaVA-OneVision): the row end once, after its rows
            embeds = np.concatenate([embeds, ends.reshape(1, -1).astype(embeds.dtype)])
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
        if tiles is None and state["rows"].shape[0] != self.manifest.image_tokens + row_end:
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
        if "row_end" in state:  # a video frame (edgevlm.media): its rows and the vision graph's row end
            end = state["row_end"]
            return (end.ndim == 1 and end.dtype == np.float32 and end.size in (0, rows.shape[1])
                    and state.get("kv") is None)
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

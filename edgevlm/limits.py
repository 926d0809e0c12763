"""Every cap on untrusted input, in one place: `edgevlm.load(bundle, limits=Limits(...))` changes them.

A bundle, an image, a chat template, a tokenizer or a cache entry may come from anyone. Each cap below is
checked before the work it bounds starts (an image's size from its header, a manifest's tiles and KV memory
at load), so a hostile input costs an error, not the machine. The defaults sit far above anything a real
model or photo needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import BundleError, ImageError


@dataclass(frozen=True)
class Limits:
    # images (edgevlm/image.py), checked from the header before decoding
    image_bytes: int = 64 << 20  # encoded file size
    image_pixels: int = 40_000_000  # decoded pixels (RGB: 120 MB)
    image_side_ratio: int = 200  # a 1 x 100000 strip is not a picture
    jpeg_scans: int = 100  # progressive JPEG passes (cameras write ~10; each pass re-walks the whole image)
    work_pixels: int = 64_000_000  # pixels of any image the preprocessing makes (pad-to-square, resize, canvas)
    # one request (a chat turn): its images and video frames together
    images: int = 16  # images in one message (a video counts as one)
    request_pixels: int = 200_000_000  # decoded pixels of all its images and frames (RGB: 600 MB)
    # video (edgevlm/video.py), checked from the container before frames are decoded
    video_bytes: int = 512 << 20  # encoded file size
    video_frames: int = 64  # frames kept (sampled) per request
    video_decoded_frames: int = 20_000  # frames decoded to reach the kept ones (11 minutes at 30 fps)
    # bundles (checked at load)
    tiles: int = 64  # vision-graph runs per image (Idefics3 at 2048 px: 17; OneVision anyres_max_9: 37)
    pinpoints: int = 1024  # anyres candidate resolutions
    kv_position_bytes: int = 32 << 20  # KV cache bytes per position (a 7B model in fp32: 1 MB)
    kv_bytes: int = 16 << 30  # KV cache at the longest context used: the context is cut to fit
    # chat templates (edgevlm/template.py)
    template_seconds: float = 2.0  # one render (real templates take well under a millisecond)
    template_output: int = 1 << 20  # characters one render may produce
    template_value: int = 1 << 20  # length of a string or list a template may build
    template_loop_items: int = 1 << 20  # range() items per render
    # text
    prompt_chars: int = 1 << 22  # characters of one message: tokenizing 4 M characters is the limit of sense


DEFAULT = Limits()


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def max_tiles(m) -> int:
    """The most vision-graph inputs one image can become under the bundle's layout."""
    lay = m.image_layout
    if lay is None or lay.tiling == "none":
        return 1
    s = lay.tile_size
    if lay.tiling == "split":
        from .tiling import MAX_SIDE

        side = _ceil(min(lay.longest_edge, MAX_SIDE), s)
        return side * side + 1  # the tiles of the longest edge squared (a square image), + the whole image
    return max(_ceil(ph, s) * _ceil(pw, s) for ph, pw in lay.pinpoints) + 1


def max_rows(m) -> int:
    """The most prompt rows one image can take (before any token budget)."""
    lay = m.image_layout
    if lay is None or lay.tiling == "none":
        return m.image_tokens
    per = lay.grid[0] * lay.grid[1] if lay.grid else m.image_tokens
    rows = max_tiles(m) * per
    if lay.tiling == "anyres":  # + a row-end embedding per feature row of the stitched map
        rows += max(_ceil(ph, lay.tile_size) for ph, _ in lay.pinpoints) * (lay.grid[0] if lay.grid else per)
    return rows


def kv_position_bytes(m) -> int:
    """fp32 bytes one position of the decoder's KV cache takes (keys and values of every layer)."""
    total = 0
    for name in ("decoder", "prefusion"):
        comp = m.components.get(name)
        if comp is not None and comp.kv is not None and comp.num_layers:
            total += comp.num_layers * 2 * comp.kv.heads * comp.kv.head_dim * 4
    return total


def check_bundle(m, limits: Limits = DEFAULT) -> None:
    """Numbers that are each in range but absurd together: tiles, canvases, KV memory."""
    lay = m.image_layout
    if lay is not None and lay.tiling != "none":
        if lay.tiling == "anyres" and len(lay.pinpoints) > limits.pinpoints:
            raise BundleError(f"manifest: {len(lay.pinpoints)} anyres pinpoints; the limit is {limits.pinpoints}")
        from .tiling import MAX_SIDE

        if lay.tile_size > MAX_SIDE:
            raise BundleError(f"manifest: image_layout.tile_size {lay.tile_size} is over {MAX_SIDE} pixels")
        if lay.tiling == "split":  # the image is resized up to whole tiles first: that canvas is bounded too
            side = _ceil(min(lay.longest_edge, MAX_SIDE), lay.tile_size) * lay.tile_size
            if side * side > limits.work_pixels:
                raise BundleError(f"manifest: split tiling makes images of up to {side}x{side} pixels; the limit "
                                  f"is {limits.work_pixels}")
        tiles = max_tiles(m)
        if tiles > limits.tiles:
            raise BundleError(f"manifest: image_layout lets one image become {tiles} tiles; the limit is "
                              f"{limits.tiles} (edgevlm.Limits.tiles)")
        if lay.tiling == "anyres":
            canvas = max(ph * pw for ph, pw in lay.pinpoints)
            if canvas > limits.work_pixels:
                raise BundleError(f"manifest: an anyres pinpoint of {canvas} pixels; the limit is {limits.work_pixels}")
    per = kv_position_bytes(m)
    if per > limits.kv_position_bytes:
        raise BundleError(f"manifest: one position of the KV cache would take {per} bytes; the limit is "
                          f"{limits.kv_position_bytes} (edgevlm.Limits.kv_position_bytes)")


def context_for_memory(m, context: int, limits: Limits = DEFAULT) -> int:
    """The context the KV memory cap allows (the declared one unless it would exceed limits.kv_bytes)."""
    per = kv_position_bytes(m)
    return context if not per else max(1, min(context, limits.kv_bytes // per))


def check_image_work(w: int, h: int, pre, lay, limits: Limits = DEFAULT) -> None:
    """Refuse, from an image's header size, preprocessing that would build an image over limits.work_pixels:
    LLaVA-1.5's pad-to-square of a 20000 x 100 strip is 400 M pixels; a shortest-edge resize of a 200:1 strip
    to 4096 px is 3 G."""
    if lay is not None and lay.tiling != "none":
        return  # split resizes to at most MAX_SIDE squared, anyres to a pinpoint: both bounded at load
    size = f"{w}x{h}"
    if pre.pad_to_square is not None:
        w = h = max(w, h)
    work = w * h
    if pre.size is not None:
        work = max(work, pre.size[0] * pre.size[1])
    elif pre.shortest_edge:
        short, long = min(w, h), max(w, h)
        work = max(work, pre.shortest_edge * math.ceil(pre.shortest_edge * long / short))
    if work > limits.work_pixels:
        raise ImageError(f"image is {size}: preparing it for this model would make a {work}-pixel image; the "
                         f"limit is {limits.work_pixels} (crop it closer to the model's aspect ratio)")

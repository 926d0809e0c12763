"""Image input: open safely, then preprocess to pixel_values exactly as the family's HF processor does.

Opening accepts only known formats, reads the pixel count from the header before decoding, honours
EXIF orientation and converts every mode to RGB (transparency composited on white, as HF does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import stat
import threading
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError
from .limits import DEFAULT, Limits
from .manifest import Preprocess

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
OPENED_FORMATS = ACCEPTED_FORMATS + ("MPO",)  # Pillow names a multi-picture JPEG (phone cameras) "MPO"
MAX_PIXELS = DEFAULT.image_pixels  # (the defaults of edgevlm.limits.Limits)
MAX_BYTES = DEFAULT.image_bytes
MAX_SIDE_RATIO = DEFAULT.image_side_ratio
_CHUNK = 1 << 20  # pixels per step when widening high-bit-depth samples (bounds the int64 temporaries)

SizeCheck = Callable[[int, int], None]  # (width, height) from the header -> raise ImageError to refuse


def load_image(image, max_pixels: int | None = None, *, limits: Limits = DEFAULT,
               check: SizeCheck | None = None) -> np.ndarray:
    """Path, bytes, PIL image or HxWx3 uint8 array -> HxWx3 uint8 RGB array. Sizes are checked from the
    header before anything is decoded: limits.image_* and, with `check`, what the caller will make of it."""
    if max_pixels is not None:
        limits = dataclasses.replace(limits, image_pixels=max_pixels)
    if isinstance(image, np.ndarray):
        return _from_array(image, limits, check)
    if isinstance(image, Image.Image):  # may be lazily opened: its decoding is guarded like our own
        if image.format is not None and image.format not in OPENED_FORMATS:  # (None: made in memory)
            raise ImageError(f"image format {image.format} is not accepted ({', '.join(ACCEPTED_FORMATS)})")
        return _guarded(lambda: _to_rgb(image, limits, check))
    if isinstance(image, (str, os.PathLike)):
        data = _read_file(image, limits.image_bytes)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    else:
        raise ImageError(f"unsupported image type {type(image).__name__}: pass a path, bytes, a PIL image or an array")
    if not data:
        raise ImageError("image is empty (0 bytes)")
    if len(data) > limits.image_bytes:
        raise ImageError(f"image is {len(data)} bytes; the limit is {limits.image_bytes}")
    if data[:2] == b"\xff\xd8" and (scans := data.count(b"\xff\xda")) > limits.jpeg_scans:
        # each scan of a progressive JPEG re-decodes the whole image; 0xFFDA (start of scan) cannot occur inside
        # entropy-coded data (a 0xFF there is followed by 0x00 or a restart marker), so this counts the scans
        raise ImageError(f"JPEG has {scans} scans; the limit is {limits.jpeg_scans} (re-encode it)")
    return _guarded(lambda: _open(data, limits, check))


def _open(data: bytes, limits: Limits, check: SizeCheck | None) -> np.ndarray:
    im = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    if im.format not in OPENED_FORMATS:  # a plugin may hand back a subclass of another format
        raise ImageError(f"image format {im.format} is not accepted ({', '.join(ACCEPTED_FORMATS)})")
    return _to_rgb(im, limits, check)


def _guarded(decode) -> np.ndarray:
    """Run a decoding step; every way Pillow can fail on bad input becomes an ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return decode()
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(f"not an image of an accepted format ({', '.join(ACCEPTED_FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image too large to decode safely: {e}") from None
    except MemoryError:
        raise ImageError("image needs more memory to decode than is available") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise ImageError(f"image is truncated or corrupt: {e}") from None
    except Exception as e:  # Pillow's decoders are not typed: any other failure on these bytes is still bad input
        raise ImageError(f"image is corrupt ({type(e).__name__}: {e})") from None


def _read_file(image: str | os.PathLike, limit: int = MAX_BYTES) -> bytes:
    """A regular file's bytes, at most limit + 1 of them; ImageError otherwise."""
    path = Path(image)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a directory, a FIFO, /dev/zero: nothing to read, or no end
            raise ImageError(f"image {str(image)!r} is not a regular file")
        if st.st_size > limit:
            raise ImageError(f"image file {path.name!r} is {st.st_size} bytes; the limit is {limit}")
        with open(path, "rb") as f:
            return f.read(limit + 1)  # the size may have changed since stat
    except OSError as e:
        raise ImageError(f"cannot read image {str(image)!r}: {e.strerror or e}") from None
    except ValueError as e:  # e.g. a NUL byte in the path
        raise ImageError(f"cannot read image {str(image)!r}: {e}") from None


def input_digest(image) -> str | None:
    """sha256 of an image input as given (file bytes, bytes, array, or a PIL image's pixels with everything
    that changes how it decodes), or None when it cannot be told cheaply (then the pixels decide)."""
    h = hashlib.sha256()
    if isinstance(image, np.ndarray):
        if image.size > 4 * MAX_PIXELS:  # (load_image refuses it before copying anything)
            return None
        h.update(f"array {image.dtype.str} {image.shape}".encode())
        h.update(np.ascontiguousarray(image).tobytes())
    elif isinstance(image, Image.Image):
        if getattr(image, "is_animated", False) or image.size[0] * image.size[1] > MAX_PIXELS:
            return None  # (over the cap: load_image refuses it before anything is decoded)
        try:
            orientation = image.getexif().get(0x0112) if hasattr(image, "getexif") else None
            h.update(repr(("pil", image.mode, image.size, orientation, image.info.get("transparency"),
                           image.getpalette())).encode())
            h.update(image.tobytes())
        except Exception:  # a lazily opened file that does not decode: load_image says what is wrong
            return None
    elif isinstance(image, (bytes, bytearray, memoryview)):
        h.update(b"bytes ")
        h.update(image)
    elif isinstance(image, (str, os.PathLike)):
        try:
            data = _read_file(image)
        except ImageError:
            return None  # load_image says what is wrong
        h.update(b"bytes ")
        h.update(data)
    else:
        return None
    return h.hexdigest()


def _check_size(w: int, h: int, limits: Limits, check: SizeCheck | None) -> None:
    if w <= 0 or h <= 0:
        raise ImageError(f"image has no pixels ({w}x{h})")
    if w * h > limits.image_pixels:
        raise ImageError(f"image is {w}x{h} = {w * h} pixels; the limit is {limits.image_pixels} (downscale it first)")
    if max(w, h) > limits.image_side_ratio * min(w, h):
        raise ImageError(f"image is {w}x{h}: aspect ratio beyond {limits.image_side_ratio}:1 is not accepted")
    if check is not None:
        check(w, h)


def _to_rgb(im: Image.Image, limits: Limits, check: SizeCheck | None = None) -> np.ndarray:
    _check_size(*im.size, limits, check)  # from the header: nothing decoded yet
    if im.tell() != 0:
        im.seek(0)  # animated: the first frame (never n_frames: that walks every frame of the file)
    im.load()
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im).reshape(-1)
        peak = 65535 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        gray = np.empty(arr.shape, np.uint8)
        for i in range(0, arr.size, _CHUNK):
            gray[i : i + _CHUNK] = np.clip(arr[i : i + _CHUNK].astype(np.int64) * 255 // peak, 0, 255)
        return np.repeat(gray.reshape(im.size[1], im.size[0], 1), 3, axis=2)
    has_alpha = "A" in im.getbands() or im.info.get("transparency") is not None
    if has_alpha:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _from_array(a: np.ndarray, limits: Limits, check: SizeCheck | None) -> np.ndarray:
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise ImageError(f"array images must be HxW or HxWx{{1,3,4}} uint8, got {a.dtype} {a.shape}")
    _check_size(a.shape[1], a.shape[0], limits, check)
    if a.ndim == 2 or a.shape[2] == 1:
        return np.repeat(a.reshape(a.shape[0], a.shape[1], 1), 3, axis=2)
    if a.shape[2] == 4:
        return _to_rgb(Image.fromarray(a, "RGBA"), limits)
    return np.ascontiguousarray(a)


# ---- preprocessing --------------------------------------------------------------------------------


def preprocess(rgb: np.ndarray, cfg: Preprocess, threads: int = 2) -> np.ndarray:
    """HxWx3 uint8 -> pixel_values [1, 3, H', W'] float32. `threads`: the resize's (1 or 2; same result)."""
    img = rgb
    if cfg.pad_to_square is not None:
        img = _pad_to_square(img, cfg.pad_to_square)
    h, w = img.shape[:2]
    if cfg.size is not None:
        oh, ow = cfg.size
    else:
        oh, ow = _shortest_edge_size(h, w, cfg.shortest_edge)
    window = None
    if cfg.crop is not None and cfg.crop[0] <= oh and cfg.crop[1] <= ow:
        # resize only the rows and columns the center crop keeps (each is computed alone)
        window = (*_crop_origin(oh, ow, *cfg.crop), *cfg.crop)
    img = resize(img, oh, ow, cfg.resample, cfg.resize_kernel, threads, window)
    if cfg.crop is not None and window is None:
        img = _center_crop(img, *cfg.crop)
    return normalize(img, cfg)[None]


def normalize(img: np.ndarray, cfg: Preprocess) -> np.ndarray:
    """HxWx3 uint8 -> [3, H, W] float32: HF's fused rescale+normalize, (pixel - mean) / std per channel in
    float32. A uint8 pixel has 256 values, so it is a table per channel, read straight into the planar layout
    (the same floats; half the time of the float arithmetic and transpose at 1024 px)."""
    mean = np.asarray(cfg.mean, np.float32) * np.float32(1.0 / cfg.rescale)
    std = np.asarray(cfg.std, np.float32) * np.float32(1.0 / cfg.rescale)
    table = (np.arange(256, dtype=np.float32)[None, :] - mean[:, None]) / std[:, None]
    out = np.empty((3,) + img.shape[:2], np.float32)
    for c in range(3):
        np.take(table[c], img[..., c], out=out[c])
    return out


def _shortest_edge_size(h: int, w: int, edge: int) -> tuple[int, int]:
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = edge, int(edge * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _pad_to_square(img: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
    h, w = img.shape[:2]
    if h == w:
        return img
    m = max(h, w)
    out = np.empty((m, m, 3), np.uint8)
    out[:] = np.asarray(fill, np.uint8)
    top, left = (m - h) // 2, (m - w) // 2
    out[top : top + h, left : left + w] = img
    return out


def _center_crop(img: np.ndarray, ch: int, cw: int) -> np.ndarray:
    h, w = img.shape[:2]
    if ch > h or cw > w:  # pad with zeros first, as torchvision's center_crop does
        top, left = max(ch - h, 0) // 2, max(cw - w, 0) // 2
        out = np.zeros((max(h, ch), max(w, cw), 3), np.uint8)
        out[top : top + h, left : left + w] = img
        img, (h, w) = out, out.shape[:2]
    top, left = _crop_origin(h, w, ch, cw)
    return img[top : top + ch, left : left + cw]


def _crop_origin(h: int, w: int, ch: int, cw: int) -> tuple[int, int]:
    """Top-left corner of a centered ch x cw crop of an h x w image (torchvision's rounding)."""
    return int((h - ch) / 2.0), int((w - cw) / 2.0)


# Separable antialiased resampling on uint8 as torchvision's uint8 kernel computes it: weights in double,
# normalised, then fixed point with the most bits an int16 holds; horizontal pass first. The "pil" kernel is
# Pillow's own resize (what the HF processors' PIL backend calls): Pillow picks the order of the two passes
# itself, so only Pillow reproduces Pillow.


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    return np.where(
        x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0)
    )


def _bilinear(x: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - np.abs(x), 0.0, None)


def _lanczos(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < 3, np.sinc(x) * np.sinc(x / 3), 0.0)


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0), "lanczos": (_lanczos, 3.0)}


def _weights(in_size: int, out_size: int, resample: str):
    # -> (start [out], fixed-point weights [out, k], precision bits)
    filt, support = _FILTERS[resample]
    scale = in_size / out_size
    fscale = max(scale, 1.0)
    support *= fscale
    centers = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    k = int((xmax - xmin).max())
    j = np.arange(k)[None, :]
    valid = j < (xmax - xmin)[:, None]
    w = filt((j + xmin[:, None] - centers[:, None] + 0.5) / fscale) * valid
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total != 0, w / np.where(total == 0, 1, total), 0.0)
    bits = 0
    while bits < 22 and int(0.5 + w.max() * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    wi = np.where(w < 0, -0.5 + w * (1 << bits), 0.5 + w * (1 << bits)).astype(np.int64)
    return xmin, wi, bits


def _resample_axis(img: np.ndarray, out_size: int, axis: int, resample: str, threads: int = 2,
                   keep: tuple[int, int] | None = None) -> np.ndarray:
    """Resample one axis to out_size; keep=(a, b): compute only output positions a..b-1 (each output position
    depends on its own weights alone, so this is the same as slicing the full result)."""
    in_size = img.shape[axis]
    lo, hi = keep or (0, out_size)
    if resample == "nearest":
        idx = np.floor(np.arange(out_size) * (in_size / out_size)).astype(np.int64)[lo:hi]
        return np.take(img, np.minimum(idx, in_size - 1), axis=axis)
    xmin, wi, bits = _weights(in_size, out_size, resample)
    xmin, wi, out_size = xmin[lo:hi], wi[lo:hi], hi - lo
    # The resampled axis leads and the rest is one contiguous row, so each tap gathers whole rows. int32 is
    # enough: the int16 weights sum to 2**bits (bits <= 15) and the filters' lobes keep |acc| far below 2**31.
    src = np.ascontiguousarray(np.moveaxis(img, axis, 0))
    rows = src.reshape(in_size, -1)
    out = np.empty((out_size, rows.shape[1]), np.uint8)
    w32 = wi.astype(np.int32)
    # Blocks of output rows whose int32 accumulators stay in the core's cache (the whole image's did not:
    # 4 passes over 17 MB a tap at 1024 px), shared between two threads (numpy drops the GIL in its loops).
    step = max(1, (1 << 18) // max(rows.shape[1], 1))
    blocks = [(a, min(a + step, out_size)) for a in range(0, out_size, step)]

    def work(part):
        for a, b in part:
            acc = np.full((b - a, rows.shape[1]), 1 << (bits - 1), np.int32)
            tap = np.empty_like(acc)
            for j in range(wi.shape[1]):
                np.multiply(rows[np.minimum(xmin[a:b] + j, in_size - 1)], w32[a:b, j:j + 1], out=tap)
                acc += tap
            np.right_shift(acc, bits, out=acc)
            np.clip(acc, 0, 255, out=acc)
            out[a:b] = acc

    if threads > 1 and len(blocks) > 1 and out.size >= 1 << 20:
        failed: list[BaseException] = []

        def other_half():
            try:
                work(blocks[1::2])
            except BaseException as e:  # (MemoryError, ...) raised where the caller sees it, not lost in a thread
                failed.append(e)

        helper = threading.Thread(target=other_half, daemon=True)
        helper.start()
        try:
            work(blocks[::2])
        finally:
            helper.join()
        if failed:
            raise failed[0]
    else:
        work(blocks)
    return np.moveaxis(out.reshape((out_size,) + src.shape[1:]), 0, axis)


def resize(img: np.ndarray, oh: int, ow: int, resample: str = "bicubic", kernel: str = "torchvision",
           threads: int = 2, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """HxWx3 uint8 -> ohxowx3 uint8, bit-exact with the named kernel: "torchvision" (its antialiased uint8
    resize: horizontal pass first, then vertical) or "pil" (Pillow's Image.resize). window=(top, left, height,
    width): only that part of the resized image, computed without the rest (torchvision kernel)."""
    h, w = img.shape[:2]
    top, left, wh, ww = window or (0, 0, oh, ow)
    if (h, w) == (oh, ow):
        return img[top:top + wh, left:left + ww]
    if kernel == "pil":
        return np.asarray(Image.fromarray(img).resize((ow, oh), _PIL_FILTERS[resample]))[top:top + wh, left:left + ww]
    if w != ow:
        img = _resample_axis(img, ow, 1, resample, threads, (left, left + ww))
    else:
        img = img[:, left:left + ww]
    if h != oh:
        img = _resample_axis(img, oh, 0, resample, threads, (top, top + wh))
    else:
        img = img[top:top + wh]
    return np.ascontiguousarray(img)


_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}

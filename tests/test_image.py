"""Image input: bad files are ImageErrors; every mode becomes RGB; EXIF orientation is honoured."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from edgevlm.errors import ImageError
from edgevlm.image import load_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _picture(mode="RGB", size=(40, 30)):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("data,match", [
    (b"", "empty"),
    (b"hello, not an image at all", "not an image"),
    (_encode(_picture(), "JPEG")[:200], "truncated or corrupt"),
    (_encode(_picture(), "PNG")[:100], "truncated or corrupt"),
    (_encode(_picture(), "TIFF"), "not an image of an accepted format"),
])
def test_bad_bytes_raise_image_error(data, match):
    with pytest.raises(ImageError, match=match):
        load_image(data)


def test_missing_file_and_wrong_type(tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="unsupported image type"):
        load_image(3.14)
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))


def _png_header_only(w: int, h: int) -> bytes:
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_pixel_cap_is_checked_before_decoding():
    # 65535 x 65535 declared in under 100 bytes: refused from the header, nothing decoded
    data = _png_header_only(65535, 65535)
    assert len(data) < 100
    with pytest.raises(ImageError, match="limit"):
        load_image(data)
    with pytest.raises(ImageError, match="aspect ratio"):
        load_image(_png_header_only(100000, 1))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb(mode):
    img = _picture("RGB").convert(mode) if mode != "I;16" else Image.fromarray(
        np.full((30, 40), 40000, np.uint16))
    fmt = {"CMYK": "JPEG", "I;16": "PNG"}.get(mode, "PNG")
    out = load_image(_encode(img, fmt))
    assert out.dtype == np.uint8 and out.shape == (30, 40, 3)
    if mode == "I;16":
        assert abs(int(out[0, 0, 0]) - 40000 * 255 // 65535) <= 1


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert (load_image(rgba) == 255).all()
    p = Image.new("P", (8, 8), 0)
    p.putpalette([10, 20, 30] * 256)
    p.info["transparency"] = 0
    assert (load_image(_encode(p, "PNG")) == 255).all()


def test_exif_orientation_is_honoured():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = load_image(_encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.shape == (40, 20, 3)  # portrait after rotation
    assert out[2, 10, 0] > 200 and out[-3, 10, 2] > 200  # the red strip is now at the top


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = load_image(buf.getvalue())
    assert out[0, 0, 0] > 200 and out[0, 0, 1] < 50


def test_paths_arrays_and_pil_agree(tmp_path):
    img = _picture()
    (tmp_path / "x.png").write_bytes(_encode(img, "PNG"))
    a = load_image(tmp_path / "x.png")
    assert (a == load_image(str(tmp_path / "x.png"))).all()
    assert (a == load_image(img)).all() and (a == load_image(np.asarray(img))).all()

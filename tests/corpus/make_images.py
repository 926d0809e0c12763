"""Build the hostile-image corpus: `python tests/corpus/make_images.py [OUT_DIR]` (default: tests/corpus/images).

Every file is made here from code, deterministically; expected.json says what edgevlm must do with each:
{"ok": [H, W]} (decoded to that RGB shape) or {"error": "words the ImageError message contains"}.
The same builders feed tests/test_hostile_images.py and benchmarks/fuzz_images.py (mutation seeds).
"""

from __future__ import annotations

import io
import json
import random
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).parent


def picture(size=(64, 48), seed=0) -> Image.Image:
    """A small structured RGB picture (shapes on a background), so codecs have real content to encode."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(img)
    w, h = size
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        box = (x0, y0, x0 + int(rng.integers(4, w // 2)), y0 + int(rng.integers(4, h // 2)))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(w: int, h: int, idat_bytes: int = 4096) -> bytes:
    """A well-formed PNG header declaring w x h RGB, followed by a few KB of compressed zero rows."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\0" * (idat_bytes * 200), 9)[:idat_bytes]
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def jpeg_declaring(w: int, h: int) -> bytes:
    """A real JPEG whose SOF0 frame header is rewritten to declare w x h."""
    data = bytearray(encode(picture((16, 16)), "JPEG"))
    i = data.index(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def gif_declaring(w: int, h: int) -> bytes:
    data = bytearray(encode(picture((16, 16)).convert("P"), "GIF"))
    data[6:10] = struct.pack("<HH", w, h)  # logical screen
    i = data.index(b"\x2c")  # first image descriptor
    data[i + 5 : i + 9] = struct.pack("<HH", w, h)
    return bytes(data)


def bmp_declaring(w: int, h: int) -> bytes:
    data = bytearray(encode(picture((16, 16)), "BMP"))
    data[18:26] = struct.pack("<ii", w, h)
    return bytes(data)


def animated_gif(frames: int) -> bytes:
    """An 8x8 GIF of `frames` 1x1-pixel frames, 23 bytes each: decoding must not walk them all."""
    head = b"GIF89a" + struct.pack("<HHBBB", 8, 8, 0xF1, 0, 0) + bytes([255, 0, 0, 0, 0, 255, 255, 255, 255, 0, 0, 0])
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    frame = (b"\x21\xf9\x04\x00\x0a\x00\x00\x00"  # graphic control: 0.1 s
             + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0)  # a 1x1 frame at (0, 0)
             + b"\x02\x02\x4c\x01\x00")  # LZW, code size 2: clear, colour 1, end
    return head + loop + frame * frames + b"\x3b"


def png_text_bomb() -> bytes:
    """A small valid PNG with a zTXt chunk that inflates to 64 MB."""
    png = encode(picture(), "PNG")
    ztxt = _chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"A" * (64 << 20), 9))
    return png[:33] + ztxt + png[33:]


def exif_jpeg(orientation: int) -> bytes:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95)


def fits() -> bytes:
    cards = ["SIMPLE  =                    T", "BITPIX  =                    8", "NAXIS   =                    2",
             "NAXIS1  =                   16", "NAXIS2  =                   16", "END"]
    header = "".join(c.ljust(80) for c in cards).ljust(2880).encode("ascii")
    return header + bytes(16 * 16).ljust(2880, b"\0")


def psd() -> bytes:
    # signature, version 1, 6 reserved, 3 channels, 16 x 16, 8 bits, RGB; empty sections; raw image data
    head = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 16, 16, 8, 3)
    return head + struct.pack(">I", 0) * 3 + struct.pack(">H", 0) + bytes(3 * 16 * 16)


def cases() -> dict[str, tuple[bytes, dict]]:
    """name -> (file bytes, expectation)."""
    pic = picture()
    gray16 = Image.fromarray(np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16))
    pal = pic.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    jpeg, png = encode(pic, "JPEG", quality=90), encode(pic, "PNG")
    ok = {"ok": [48, 64]}
    c = {
        "empty.png": (b"", {"error": "empty"}),
        "text.jpg": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", {"error": "not an image"}),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], {"error": "truncated"}),
        "truncated.png": (png[: len(png) // 2], {"error": "truncated"}),
        "header-only.png": (png[:33], {"error": "not an image"}),
        "bomb-65535x65535.png": (png_declaring(65535, 65535), {"error": "limit"}),
        "bomb-65500x65500.jpg": (jpeg_declaring(65500, 65500), {"error": "limit"}),
        "bomb-65535x65535.gif": (gif_declaring(65535, 65535), {"error": "limit"}),
        "bomb-60000x60000.bmp": (bmp_declaring(60000, 60000), {"error": "limit"}),
        "strip-1x100000.png": (encode(Image.new("RGB", (1, 100000), (9, 9, 9)), "PNG"), {"error": "aspect ratio"}),
        "strip-100000x1.png": (encode(Image.new("RGB", (100000, 1), (9, 9, 9)), "PNG"), {"error": "aspect ratio"}),
        "zero-width.png": (png_declaring(0, 16), {"error": "not an image"}),
        "animated-5000-frames.gif": (animated_gif(5000), {"ok": [8, 8]}),
        "text-bomb-ztxt.png": (png_text_bomb(), {"error": "too large"}),
        "cmyk.jpg": (encode(pic.convert("CMYK"), "JPEG"), ok),
        "gray16.png": (encode(gray16, "PNG"), ok),
        "rgb48.png": (_rgb48_png(pic), ok),
        "palette-transparency.png": (encode(pal, "PNG"), ok),
        "palette-transparency.gif": (encode(pal, "GIF", transparency=0), ok),
        "la.png": (encode(pic.convert("LA"), "PNG"), ok),
        "bilevel.bmp": (encode(pic.convert("1"), "BMP"), ok),
        "rgba.webp": (encode(pic.convert("RGBA"), "WEBP", lossless=True), ok),
        "lossy.webp": (encode(pic, "WEBP", quality=50), ok),
        "png-named.jpg": (png, ok),
        "exif-orientation-0.jpg": (exif_jpeg(0), {"ok": [20, 40]}),
        "exif-orientation-9.jpg": (exif_jpeg(9), {"ok": [20, 40]}),
        "tiff.tif": (encode(pic, "TIFF"), {"error": "not an image of an accepted format"}),
        "psd.psd": (psd(), {"error": "not an image of an accepted format"}),
        "fits.fits": (fits(), {"error": "not an image of an accepted format"}),
        "ico.ico": (encode(pic, "ICO"), {"error": "not an image of an accepted format"}),
        "pcx.pcx": (encode(pic, "PCX"), {"error": "not an image of an accepted format"}),
        "tga.tga": (encode(pic, "TGA"), {"error": "not an image of an accepted format"}),
        "ppm.ppm": (encode(pic, "PPM"), {"error": "not an image of an accepted format"}),
        "jpeg2000.jp2": (encode(pic, "JPEG2000"), {"error": "not an image of an accepted format"}),
        "avif.avif": (encode(pic, "AVIF"), {"error": "not an image of an accepted format"}),
        "eps.eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n(/etc/passwd) run\n",
                    {"error": "not an image of an accepted format"}),
        "svg.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16"/>',
                    {"error": "not an image of an accepted format"}),
        "pdf.pdf": (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", {"error": "not an image of an accepted format"}),
        "heic.heic": (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64), {"error": "not an image of an accepted format"}),
    }
    for o in range(1, 9):  # every EXIF orientation: 5-8 swap the sides
        c[f"exif-orientation-{o}.jpg"] = (exif_jpeg(o), {"ok": [40, 20] if o >= 5 else [20, 40]})
    return c


def _rgb48_png(pic: Image.Image) -> bytes:
    """16 bits per channel RGB (Pillow cannot write it): built chunk by chunk."""
    a = np.asarray(pic).astype(">u2") * 257
    raw = b"".join(b"\0" + row.tobytes() for row in a)
    ihdr = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def seeds() -> dict[str, bytes]:
    """Valid small images of every accepted format: the starting points of mutation fuzzing."""
    pic = picture((48, 40), seed=7)
    return {"jpeg": encode(pic, "JPEG", quality=85), "progressive.jpeg": encode(pic, "JPEG", progressive=True),
            "png": encode(pic, "PNG"), "palette.png": encode(pic.convert("P"), "PNG"),
            "webp": encode(pic, "WEBP", quality=80), "lossless.webp": encode(pic, "WEBP", lossless=True),
            "gif": encode(pic.convert("P"), "GIF"), "bmp": encode(pic, "BMP"), "exif.jpeg": exif_jpeg(6)}


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One seeded mutation of an image file: bit flips, interesting bytes, cuts, duplicated or inserted runs."""
    b = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4, 8])):
        op, i = rng.randrange(6), rng.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.choice([0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF])
        elif op == 2 and i + 4 <= len(b):  # a large big- or little-endian integer (sizes, lengths, offsets)
            b[i : i + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\xff\xff", b"\xff\xff\x00\x00"])
        elif op == 3:
            del b[i:]
            b.extend(bytes(1))
        elif op == 4:
            j = rng.randrange(i, min(len(b), i + 64) + 1)
            b[j:j] = b[i:j] * rng.randrange(1, 4)
        else:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    return bytes(b)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (data, expect) in sorted(cases().items()):
        (out / name).write_bytes(data)
        expected[name] = expect
    (out / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    total = sum(len(d) for d, _ in cases().values())
    print(f"wrote {len(expected)} files, {total} bytes, to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "images")

"""Inputs from outside the shapes world, and the one sentence the demo answers them with.

    from edgevlm.data import outworld
    img = outworld.make_image(seed=0, index=17)          # a PIL RGB picture that is not a shapes scene
    ex = outworld.make_example(seed, index)              # ex.image (None: text only), ex.question, ex.answer, ex.kind

The demo knows one world (edgevlm/data/shapes.py). Shown anything else — a photo, a screenshot, no picture at
all — it should say so instead of inventing an answer, so it is trained on these pictures with SENTENCE as the
answer to any question. Every picture is a pure function of (seed, index, split), like the shapes examples:
noise, gradients, fractal textures, landscape- and room-like compositions, soft natural-looking patches, 1/f
("pink") noise with natural images' spectrum, rendered text, blank pictures, regular patterns and collages of
these, at photo-like sizes and aspect ratios, some JPEG-compressed. Torch-free (numpy + Pillow).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from . import shapes

SENTENCE = "I can only answer questions about simple pictures of colored shapes."
KINDS = ("noise", "gradient", "texture", "landscape", "room", "patches", "pink", "text", "blank", "pattern", "collage")
SPLITS = {"train": 11, "eval": 12}  # mixed into the generator's seed; neither stream shares one with shapes'
VALIDATION_SEED = 1_000_003  # training draws seeds below 1e6 (shapes.TRAIN_SEEDS); held-out seeds lie above
TEST_SEED = 2_000_011

# Questions nobody asks the shapes world. Nouns in EVAL_NOUNS never occur in training questions.
GENERIC = ("What is in this image?", "What do you see?", "Describe this photo.", "What is this?", "Hello!", "Hi",
           "Who are you?", "What can you do?", "Read the text.", "What does the sign say?", "Where was this taken?",
           "What animal is this?", "Is this a cat or a dog?", "What is the weather like?", "Tell me a joke.",
           "What time of day is it?", "Is it day or night?", "What is happening here?", "Can you help me?",
           "What is written here?", "Summarize the picture.", "What colors do you see?", "Is this indoors?")
EVAL_GENERIC = ("What's in the picture?", "Explain this image.", "What am I looking at?", "Thanks!",
                "What is the main subject?", "Is this a photo?")
NOUNS = ("car", "tree", "dog", "cat", "person", "house", "sky", "flower", "bird", "table", "sign", "road", "boat",
         "chair", "book", "cloud", "bottle", "horse", "window", "door")
EVAL_NOUNS = ("bicycle", "lamp", "mountain", "cup", "shirt", "bus")
NOUN_FORMS = ("What color is the {}?", "How many {}s are there?", "Is there a {}?", "Where is the {}?",
              "What is the {} doing?", "Is the {} on the left or right side of the image?")
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "menu", "coffee", "open", "daily", "sale",
         "exit", "north", "station", "report", "total", "page", "hello", "world", "invoice", "chapter", "street",
         "2024", "42", "$9.99", "No.", "Room", "call", "data", "model", "photo", "summer", "river", "market")


@dataclass(frozen=True)
class Example:
    image: Image.Image | None  # None: a question with no picture
    question: str
    answer: str
    kind: str  # one of KINDS, or "none"

    @property
    def qtype(self) -> str:  # what accuracy is broken down by (edgevlm.evaluate)
        return self.kind


def _rng(seed: int, index: int, split: str, salt: int = 0) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), SPLITS[split], salt]))


# ---------------------------------------------------------------- building blocks (float images in 0..1)

def _color(rng, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    return rng.uniform(lo, hi, 3)


def _field(rng, h: int, w: int, cells: int, octaves: int = 1) -> np.ndarray:
    """Smooth value noise [h, w] in 0..1: random grids upsampled bicubically, octaves halving in amplitude."""
    out, amp, total = np.zeros((h, w), np.float32), 1.0, 0.0
    for o in range(octaves):
        n = max(2, cells * 2 ** o)
        grid = Image.fromarray(rng.random((n, max(2, n * w // h))).astype(np.float32), "F")
        out += amp * np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC))
        total += amp
        amp /= 2
    out /= total
    return (out - out.min()) / max(float(out.max() - out.min()), 1e-6)


def _palette(rng, t: np.ndarray, k: int | None = None) -> np.ndarray:
    """Map a field t [h, w] in 0..1 through k random colours -> [h, w, 3]."""
    k = k or int(rng.integers(2, 5))
    stops = np.sort(rng.random(k))
    stops[0], stops[-1] = 0.0, 1.0
    cols = rng.random((k, 3))
    return np.stack([np.interp(t, stops, cols[:, c]) for c in range(3)], -1).astype(np.float32)


def _grad(h: int, w: int, angle: float) -> np.ndarray:  # [h, w] in 0..1 along a direction
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = x * np.cos(angle) + y * np.sin(angle)
    return (t - t.min()) / max(float(t.max() - t.min()), 1e-6)


def _u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------- generators: (rng, h, w) -> [h, w, 3] uint8

def noise(rng, h, w):
    base = _color(rng)
    sigma = rng.uniform(0.05, 0.6)
    shape = (h, w, 3) if rng.random() < 0.6 else (h, w, 1)
    if rng.random() < 0.3:  # uniform, or salt and pepper
        x = rng.random(shape) if rng.random() < 0.5 else (rng.random(shape) < 0.5).astype(np.float32)
    else:
        x = base + sigma * rng.standard_normal(shape)
    if rng.random() < 0.3:  # coarse blocky noise
        k = int(rng.integers(2, 9))
        x = np.repeat(np.repeat(x[: h // k + 1, : w // k + 1], k, 0), k, 1)[:h, :w]
    return _u8(np.broadcast_to(x, (h, w, 3)))


def gradient(rng, h, w):
    if rng.random() < 0.3:  # radial
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        t = np.hypot(y - cy, x - cx)
        t = t / max(float(t.max()), 1e-6)
    else:
        t = _grad(h, w, rng.uniform(0, 2 * np.pi))
    return _u8(_palette(rng, t) + rng.uniform(0, 0.03) * rng.standard_normal((h, w, 1)))


def texture(rng, h, w):
    t = _field(rng, h, w, int(rng.integers(2, 12)), int(rng.integers(1, 6)))
    style = rng.random()
    if style < 0.25:  # marble
        t = 0.5 + 0.5 * np.sin(_grad(h, w, rng.uniform(0, np.pi)) * rng.uniform(5, 40) + t * rng.uniform(3, 12))
    elif style < 0.45:  # wood rings
        y, x = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
        t = (np.hypot(y - rng.uniform(-1, 2), x - rng.uniform(-1, 2)) * rng.uniform(10, 40) + 4 * t) % 1.0
    return _u8(_palette(rng, t) * rng.uniform(0.6, 1.1))


def landscape(rng, h, w):
    """Sky, one or two ridges of hills or mountains, ground; sometimes a sun and water."""
    y = np.arange(h, dtype=np.float32)[:, None] / h
    sky_top, sky_low = (_color(rng, 0.1, 0.6), _color(rng, 0.5, 1.0)) if rng.random() < 0.7 else \
        (np.array([0.2, 0.35, 0.8]) * rng.uniform(0.7, 1.1), np.array([0.7, 0.85, 1.0]))
    img = sky_top + (sky_low - sky_top) * y[..., None]
    img = np.broadcast_to(img, (h, w, 3)).copy()
    if rng.random() < 0.4:  # sun or moon
        yy, xx = np.mgrid[0:h, 0:w]
        r = rng.uniform(0.04, 0.12) * max(h, w)
        disc = np.hypot(yy - rng.uniform(0.1, 0.4) * h, xx - rng.uniform(0, w)) < r
        img[disc] = _color(rng, 0.8, 1.0)
    for layer in range(int(rng.integers(1, 4))):
        ridge = (rng.uniform(0.3, 0.75) + rng.uniform(0.05, 0.3) * (_field(rng, 2, w, int(rng.integers(2, 6)), 3)[0] - 0.5))
        tone = _color(rng, 0.05, 0.6) * (0.6 + 0.2 * layer)
        tex = _field(rng, h, w, int(rng.integers(4, 20)), 3)[..., None]
        below = y >= ridge[None, :]
        img[below] = (tone * (0.7 + 0.6 * tex))[below]
    if rng.random() < 0.3:  # water: the lower part mirrored and darkened
        cut = int(h * rng.uniform(0.65, 0.85))
        img[cut:] = img[cut - 1::-1][: h - cut] * rng.uniform(0.5, 0.8)
    img += rng.uniform(0, 0.04) * rng.standard_normal((h, w, 1))
    return _u8(img)


def room(rng, h, w):
    """Indoor- or city-like: walls in gradients, boxes (furniture, buildings, windows), soft shading."""
    img = _palette(rng, _grad(h, w, rng.uniform(0, np.pi)), 2) * rng.uniform(0.5, 1.0)
    im = Image.fromarray(_u8(img))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 25))):
        x0, y0 = rng.uniform(-0.1, 1.0) * w, rng.uniform(0.0, 1.0) * h
        x1, y1 = x0 + rng.uniform(0.05, 0.5) * w, y0 + rng.uniform(0.05, 0.8) * h
        col = tuple(int(c) for c in _u8(_color(rng, 0.05, 0.9)))
        draw.rectangle((x0, y0, x1, y1), fill=col)
        if rng.random() < 0.4:  # windows on it
            k = int(rng.integers(2, 6))
            wc = tuple(int(c) for c in _u8(_color(rng, 0.5, 1.0)))
            for i in range(k):
                for j in range(k):
                    a, b = x0 + (x1 - x0) * (i + 0.2) / k, y0 + (y1 - y0) * (j + 0.2) / k
                    draw.rectangle((a, b, a + (x1 - x0) * 0.5 / k, b + (y1 - y0) * 0.5 / k), fill=wc)
    im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0, 2.0)))
    shade = 0.75 + 0.5 * _field(rng, h, w, 2)[..., None]
    return _u8(np.asarray(im, np.float32) / 255 * shade + rng.uniform(0, 0.03) * rng.standard_normal((h, w, 1)))


def patches(rng, h, w):
    """Soft, overlapping blobs of muted colour on a texture: foliage, bokeh, a crowd out of focus."""
    base = _palette(rng, _field(rng, h, w, int(rng.integers(2, 8)), 3)) * rng.uniform(0.4, 1.0)
    im = Image.fromarray(_u8(base))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(5, 60))):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.02, 0.25) * max(h, w)
        ry = r * rng.uniform(0.4, 1.6)
        col = tuple(int(c) for c in _u8(_color(rng, 0.05, 0.95) * rng.uniform(0.5, 1.0)))
        draw.ellipse((cx - r, cy - ry, cx + r, cy + ry), fill=col)
    im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 6.0)))
    return _u8(np.asarray(im, np.float32) / 255 + rng.uniform(0, 0.05) * rng.standard_normal((h, w, 1)))


def pink(rng, h, w):
    """Noise with a 1/f^a amplitude spectrum (a ~ 1: natural images' statistics), channels correlated."""
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    f = np.hypot(fy, fx)
    f[0, 0] = 1.0
    amp = f ** -rng.uniform(0.8, 1.6)
    common = rng.standard_normal((h, w // 2 + 1)) + 1j * rng.standard_normal((h, w // 2 + 1))
    mix = rng.uniform(0.5, 1.0)
    out = []
    for _ in range(3):
        own = rng.standard_normal((h, w // 2 + 1)) + 1j * rng.standard_normal((h, w // 2 + 1))
        ch = np.fft.irfft2(amp * (mix * common + (1 - mix) * own), s=(h, w))
        out.append((ch - ch.mean()) / max(float(ch.std()), 1e-9))
    x = np.stack(out, -1) * rng.uniform(0.1, 0.25) + _color(rng, 0.2, 0.8)
    return _u8(x)


def _font(rng):
    return ImageFont.load_default(size=int(rng.integers(8, 40)))


def text(rng, h, w):
    """Lines of words: a page, a sign, a screenshot; light or dark, sometimes on a textured ground."""
    dark = rng.random() < 0.3
    ground = _color(rng, 0.0, 0.25) if dark else _color(rng, 0.75, 1.0)
    if rng.random() < 0.25:
        bg = _palette(rng, _field(rng, h, w, 3, 2))
    else:
        bg = np.broadcast_to(ground, (h, w, 3))
    im = Image.fromarray(_u8(bg))
    draw = ImageDraw.Draw(im)
    ink = tuple(int(c) for c in _u8(_color(rng, 0.75, 1.0) if dark else _color(rng, 0.0, 0.35)))
    font = _font(rng)
    y = rng.uniform(-0.05, 0.2) * h
    while y < h:
        words = " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), int(rng.integers(1, 9))))
        if rng.random() < 0.3:
            words = words.upper()
        draw.text((rng.uniform(-0.05, 0.2) * w, y), words, fill=ink, font=font)
        y += font.size * rng.uniform(1.1, 2.2)
        if rng.random() < 0.15:
            font = _font(rng)
    if rng.random() < 0.2:
        im = im.rotate(rng.uniform(-20, 20), resample=Image.Resampling.BICUBIC, fillcolor=tuple(int(c) for c in _u8(ground)))
    return np.asarray(im)


def blank(rng, h, w):
    r = rng.random()
    if r < 0.3:
        col = np.full(3, rng.uniform(0, 1))  # a grey, white or black
    elif r < 0.4:
        col = np.full(3, rng.uniform(0.78, 0.94))  # the shapes world's own background, with nothing on it
    else:
        col = _color(rng)
    return _u8(np.broadcast_to(col + rng.uniform(0, 0.01) * rng.standard_normal((h, w, 1)), (h, w, 3)))


def pattern(rng, h, w):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(3, 40)
    a = rng.uniform(0, np.pi)
    kind = int(rng.integers(5))
    if kind == 0:  # stripes
        t = (x * np.cos(a) + y * np.sin(a)) / period % 1.0 < 0.5
    elif kind == 1:  # checkerboard
        t = ((x // period) + (y // period)) % 2 == 0
    elif kind == 2:  # grid lines
        t = ((x % period) < period * 0.15) | ((y % period) < period * 0.15)
    elif kind == 3:  # concentric rings
        t = np.hypot(x - rng.uniform(0, w), y - rng.uniform(0, h)) / period % 1.0 < 0.5
    else:  # dots
        t = np.hypot((x % period) - period / 2, (y % period) - period / 2) < period * rng.uniform(0.15, 0.45)
    c0, c1 = _color(rng), _color(rng)
    return _u8(np.where(t[..., None], c0, c1))


def collage(rng, h, w):
    """Two other kinds side by side, one above the other, or blended."""
    kinds = [k for k in KINDS if k != "collage"]
    a, b = (GENERATORS[kinds[int(i)]](rng, h, w) for i in rng.integers(0, len(kinds), 2))
    r = rng.random()
    if r < 0.4:
        cut = int(w * rng.uniform(0.2, 0.8))
        return np.concatenate([a[:, :cut], b[:, cut:]], 1)
    if r < 0.8:
        cut = int(h * rng.uniform(0.2, 0.8))
        return np.concatenate([a[:cut], b[cut:]], 0)
    return ((a.astype(np.float32) + b) / 2).astype(np.uint8)


GENERATORS = {"noise": noise, "gradient": gradient, "texture": texture, "landscape": landscape, "room": room,
              "patches": patches, "pink": pink, "text": text, "blank": blank, "pattern": pattern, "collage": collage}


def _size(rng) -> tuple[int, int]:
    """Mostly the demo's own 128 x 128; otherwise a photo-like size and aspect (the runtime resizes and crops)."""
    if rng.random() < 0.5:
        return 128, 128
    h = int(rng.integers(64, 320))
    return h, int(np.clip(h * rng.uniform(0.5, 2.0), 48, 480))


def make_image(seed: int, index: int, split: str = "eval", kind: str | None = None) -> Image.Image:
    """Picture number index of the (seed, split) out-of-world stream (kind: that generator; default: drawn)."""
    rng = _rng(seed, index, split)
    drawn = KINDS[int(rng.integers(len(KINDS)))]
    kind = kind or drawn
    h, w = _size(rng)
    im = Image.fromarray(np.ascontiguousarray(GENERATORS[kind](rng, h, w)), "RGB")
    if rng.random() < 0.3:  # photos arrive as JPEG
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(rng.integers(30, 95)))
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return im


ODD_FORMS = ("as is", "tiny", "strip", "tower", "grey", "rgba", "palette", "large", "dark", "washed out")


def make_odd(seed: int, index: int) -> Image.Image:
    """An out-of-world picture in an odd form: 1-8 px, a long strip or tower (up to 150:1), greyscale, with alpha, a
    2-16 colour palette, photo-sized, nearly black or nearly white (the form cycles with index)."""
    rng = _rng(seed, index, "eval", salt=2)
    im = make_image(seed, index, "eval")
    form = ODD_FORMS[index % len(ODD_FORMS)]
    if form == "tiny":
        k = int(rng.integers(1, 9))
        return im.resize((k, k))
    if form in ("strip", "tower"):
        long = int(rng.integers(300, 1200))
        short = int(rng.integers(-(-long // 150), 40))  # the runtime refuses sides more than 200:1
        return im.resize((long, short) if form == "strip" else (short, long))
    if form == "grey":
        return im.convert("L")
    if form == "rgba":
        alpha = Image.fromarray(_u8(_field(rng, im.size[1], im.size[0], 3)), "L")
        return Image.merge("RGBA", (*im.split(), alpha))
    if form == "palette":
        return im.convert("P", palette=Image.Palette.ADAPTIVE, colors=int(rng.integers(2, 17)))
    if form == "large":
        return im.resize((int(rng.integers(800, 1600)), int(rng.integers(600, 1200))), Image.Resampling.BILINEAR)
    if form == "dark":
        return Image.fromarray((np.asarray(im) // int(rng.integers(8, 40))).astype(np.uint8))
    if form == "washed out":
        return Image.fromarray((255 - (255 - np.asarray(im)) // int(rng.integers(8, 40))).astype(np.uint8))
    return im


def question(rng: np.random.Generator, split: str = "train") -> str:
    """A question someone might ask about any picture: half in the shapes world's own words (about a random
    scene), half not (held-out splits add wordings and nouns training never uses)."""
    if rng.random() < 0.5:
        scene = shapes.sample_scene(rng, "eval")
        return shapes.question_text(shapes.scene_specs(scene, rng, 1, split="eval")[0])
    return generic_question(rng, split)


def generic_question(rng: np.random.Generator, split: str = "train") -> str:
    """A question outside the shapes world's wordings (none of its nouns is a shape or "object")."""
    generic, nouns = (GENERIC, NOUNS) if split == "train" else (GENERIC + EVAL_GENERIC, NOUNS + EVAL_NOUNS)
    if rng.random() < 0.5:
        return generic[int(rng.integers(len(generic)))]
    return NOUN_FORMS[int(rng.integers(len(NOUN_FORMS)))].format(nouns[int(rng.integers(len(nouns)))])


normalize_answer = shapes.normalize_answer


def make_example(seed: int, index: int, split: str = "eval", image: bool = True) -> Example:
    """An out-of-world picture (image=False: none) with a question; the answer is always SENTENCE."""
    q = question(_rng(seed, index, split, salt=1), split)
    if not image:
        return Example(None, q, SENTENCE, "none")
    kind = KINDS[int(_rng(seed, index, split).integers(len(KINDS)))]  # the draw make_image makes
    return Example(make_image(seed, index, split), q, SENTENCE, kind)


def examples(seed: int, n: int, split: str = "eval", start: int = 0, image: bool = True) -> Iterator[Example]:
    """Examples start .. start+n-1 of the (seed, split) stream."""
    for i in range(start, start + n):
        yield make_example(seed, i, split, image)

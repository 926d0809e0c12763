"""Deterministic procedural visual QA: coloured shapes on a plain background, short exact answers.

    from edgevlm.data.shapes import make_example, examples, normalize_answer
    ex = make_example(seed=0, index=17, split="train")   # ex.image, ex.question, ex.answer, ex.qtype

Every example is a pure function of (seed, index, split): the generator is seeded from those three
numbers only (numpy's PCG64 streams are fixed across platforms and versions), so the same triple gives
the same scene, question and pixels wherever it runs; the pixels also assume a Pillow whose polygon
rasteriser has not changed.

Split "train" makes a few (colour, shape) combinations ~10x rarer than the others; split "eval" is
uniform over combinations, so held-out accuracy measures whether the model composes colour and shape.
Geometry is in image fractions (0..1, y down), so a scene renders at any size.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
# Far apart in RGB and all far from the grey background, so colour is never a judgement call.
COLORS = {
    "red": (210, 25, 35), "green": (30, 160, 50), "blue": (30, 80, 225),
    "yellow": (240, 220, 20), "purple": (135, 40, 185), "orange": (250, 125, 0),
}
# Objects sit in the cells of a GRID x GRID layout, one per cell, centred up to JITTER off the cell centre.
# The layout matches the demo's 4 x 4 vision-token grid (128 px, stride 32), so each image token sees at most
# one object; positions still vary, and any two objects are a whole cell apart on an axis or on the same row
# or column, so "left of" and "above" never hinge on a pixel.
GRID = 4
JITTER = 0.015
SIZES = {"small": 0.055, "large": 0.1}  # bounding-circle radius as a fraction of the image side
QTYPES = ("color", "shape", "count", "exists", "position", "bigger", "describe")
SPLITS = {"train": 1, "eval": 2}  # the code mixed into the seed: splits never share a generator stream
RARE_COMBOS = frozenset({("purple", "star"), ("orange", "triangle"), ("green", "circle")})
RARE_WEIGHT = 0.1  # train frequency of a rare combination relative to a common one

TRAIN_SEEDS = range(0, 1_000_000)  # training draws its seeds from here; held-out seeds lie above it
VALIDATION_SEED = 1_000_001
TEST_SEED = 2_000_003

MAX_OBJECTS = 6
MIN_REL_OFFSET = 0.2  # "left of"/"above" is asked only when the centres differ this much on that axis
MIN_SIDE_OFFSET = 0.1  # "left side of the image" only when this far from the vertical midline
MIN_DESCRIBE_GAP = 0.1  # "left to right" order must be obvious for an exact-match description
MAX_TRIES = 200

_COMBOS = [(c, s) for c in COLORS for s in SHAPES]


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cx: float
    cy: float
    r: float = 0.0  # 0 means "the radius of this size class"

    def __post_init__(self):
        if self.shape not in SHAPES or self.color not in COLORS or self.size not in SIZES:
            raise ValueError(f"unknown object {self.size} {self.color} {self.shape}")
        if not self.r:
            object.__setattr__(self, "r", SIZES[self.size])


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: tuple[int, int, int] = (225, 225, 225)


@dataclass(frozen=True)
class Ref:
    """A noun phrase picking objects out by any of shape, colour and size ("the large red circle")."""
    shape: str | None = None
    color: str | None = None
    size: str | None = None

    def matches(self, o: Obj) -> bool:
        pairs = ((self.shape, o.shape), (self.color, o.color), (self.size, o.size))
        return all(want is None or want == have for want, have in pairs)

    def phrase(self) -> str:
        return " ".join(w for w in (self.size, self.color, self.shape or "object") if w)


@dataclass(frozen=True)
class Question:
    """What is asked, independent of wording. form: "x"/"y"/"side" for position, else ""."""
    qtype: str
    a: Ref = Ref()
    b: Ref | None = None
    form: str = ""


@dataclass(frozen=True)
class Example:
    image: Image.Image
    question: str
    answer: str
    qtype: str
    scene: Scene
    spec: Question


# ---------------------------------------------------------------- rendering

def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.7 * r  # corners at 0.99 r: inside the bounding circle, area close to the circle's
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # equilateral, point up, inscribed in the bounding circle
        return [(cx + r * math.sin(a), cy - r * math.cos(a)) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    # star: 5 points alternating with 5 inner corners; inner radius 0.45 r (fatter than a regular star's
    # 0.38 r) so the arms stay visible when a small star is only ~18 px across
    radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
    return [(cx + rr * math.sin(k * math.pi / 5), cy - rr * math.cos(k * math.pi / 5)) for k, rr in enumerate(radii)]


def render(scene: Scene, size: int = 128, supersample: int = 2) -> Image.Image:
    """Draw the scene as a size x size RGB image; supersample > 1 draws larger and downscales (antialiasing)."""
    s = size * max(1, supersample)
    img = Image.new("RGB", (s, s), tuple(scene.background))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r, fill = o.cx * s, o.cy * s, o.r * s, COLORS[o.color]
        if o.shape == "circle":
            k = 0.8 * r  # same area as the square, so shape is not a size cue
            draw.ellipse((cx - k, cy - k, cx + k, cy + k), fill=fill)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill)
    # reduce() averages each k x k block: exact box-filter supersampling, integer maths, and ~15x faster
    # than a LANCZOS resize (which would add ringing we do not want anyway).
    return img if s == size else img.reduce(s // size)


# ---------------------------------------------------------------- scenes

def _weighted_index(rng: np.random.Generator, weights: np.ndarray, k: int | None = None):
    # Indices drawn with the given (unnormalised) weights; searchsorted beats rng.choice(p=...) on speed.
    cum = np.cumsum(weights)
    idx = np.searchsorted(cum, rng.random(k) * cum[-1], side="right")
    return np.minimum(idx, len(weights) - 1)  # guards the float edge where the draw equals the total


def _combo_weights(split: str) -> np.ndarray:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return np.array([RARE_WEIGHT if split == "train" and c in RARE_COMBOS else 1.0 for c in _COMBOS])


def sample_scene(rng: np.random.Generator, split: str = "eval") -> Scene:
    """A random scene of 1..6 objects in distinct cells of the GRID x GRID layout, (colour, shape) drawn
    with the split's weights, each centre jittered a little inside its cell."""
    weights = _combo_weights(split)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    picks = _weighted_index(rng, weights, n)
    sizes = ["large" if b else "small" for b in rng.random(n) < 0.5]
    cells = rng.permutation(GRID * GRID)[:n]
    jitter = rng.uniform(-JITTER, JITTER, (n, 2))
    objs = tuple(Obj(_COMBOS[picks[i]][1], _COMBOS[picks[i]][0], sizes[i],
                     (int(cells[i]) % GRID + 0.5) / GRID + float(jitter[i, 0]),
                     (int(cells[i]) // GRID + 0.5) / GRID + float(jitter[i, 1])) for i in range(n))
    base = int(rng.integers(205, 236))
    bg = tuple(int(base + j) for j in rng.integers(-6, 7, 3))
    return Scene(objs, bg)


# ---------------------------------------------------------------- questions and answers

def find(scene: Scene, ref: Ref) -> Obj:
    """The one object of the scene that ref names; ValueError if it names none or several."""
    hits = [o for o in scene.objects if ref.matches(o)]
    if len(hits) != 1:
        raise ValueError(f"'the {ref.phrase()}' matches {len(hits)} objects, not exactly one")
    return hits[0]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def question_text(q: Question) -> str:
    """The English wording of a question."""
    a = q.a.phrase()
    if q.qtype == "color":
        return f"What color is the {a}?"
    if q.qtype == "shape":
        return f"What shape is the {a}?"
    if q.qtype == "count":
        what = f"{q.a.color} objects" if q.a.color else f"{q.a.shape}s" if q.a.shape else "objects"
        return f"How many {what} are there?"
    if q.qtype == "exists":
        return f"Is there {_article(q.a.color)} {q.a.color} {q.a.shape}?"
    if q.qtype == "position":
        if q.form == "side":
            return f"Is the {a} on the left or right side of the image?"
        return f"Is the {a} {'left or right of' if q.form == 'x' else 'above or below'} the {q.b.phrase()}?"
    if q.qtype == "bigger":
        return f"Which is bigger, the {a} or the {q.b.phrase()}?"
    if q.qtype == "describe":
        return "Describe the image."
    raise ValueError(f"unknown qtype {q.qtype!r}")


def answer(scene: Scene, q: Question) -> str:
    """The exact answer to q about scene; ValueError if q refers to an object ambiguously."""
    if q.qtype == "color":
        return find(scene, q.a).color
    if q.qtype == "shape":
        return find(scene, q.a).shape
    if q.qtype == "count":
        return str(sum(q.a.matches(o) for o in scene.objects))
    if q.qtype == "exists":
        return "yes" if any(q.a.matches(o) for o in scene.objects) else "no"
    if q.qtype == "position":
        a = find(scene, q.a)
        if q.form == "side":
            return "left" if a.cx < 0.5 else "right"
        b = find(scene, q.b)
        if q.form == "x":
            return "left" if a.cx < b.cx else "right"
        return "above" if a.cy < b.cy else "below"  # image y grows downwards
    if q.qtype == "bigger":
        a, b = find(scene, q.a), find(scene, q.b)
        if a.r == b.r:
            raise ValueError("bigger: the two objects are the same size")
        big = a if a.r > b.r else b
        return f"{big.color} {big.shape}"
    if q.qtype == "describe":
        return ", ".join(f"{o.size} {o.color} {o.shape}" for o in sorted(scene.objects, key=lambda o: o.cx))
    raise ValueError(f"unknown qtype {q.qtype!r}")


def scene_schema(max_objects: int = 3) -> dict:
    """A JSON Schema of a scene's description (structured output's demo): its objects left to right, each a size,
    a colour and a shape (the order of the words in a free-text description)."""
    obj = {"type": "object", "properties": {"size": {"enum": list(SIZES)}, "color": {"enum": list(COLORS)},
                                            "shape": {"enum": list(SHAPES)}},
           "required": ["size", "color", "shape"], "additionalProperties": False}
    return {"type": "object", "properties": {"objects": {"type": "array", "items": obj, "minItems": 1,
                                                         "maxItems": max_objects}},
            "required": ["objects"], "additionalProperties": False}


def scene_json(scene: Scene) -> dict:
    """The truth in scene_schema's form."""
    return {"objects": [{"size": o.size, "color": o.color, "shape": o.shape}
                        for o in sorted(scene.objects, key=lambda o: o.cx)]}


# Questions whose answer is the scene in scene_schema's form, compact (the form llguidance writes under
# that schema: no whitespace, properties in the schema's order). The first is the held-out wording.
JSON_QUESTIONS = ("Describe the image as JSON.", "List the objects as JSON.", "What is in the picture? Answer in JSON.")


def json_answer(scene: Scene) -> str:
    """scene_json(scene) as the demo writes it: compact JSON."""
    return json.dumps(scene_json(scene), separators=(",", ":"))


def _unique_ref(scene: Scene, o: Obj, keys: tuple[tuple[str, ...], ...]) -> Ref | None:
    # The first (shortest) phrase built from the given attribute sets that names only o.
    for attrs in keys:
        ref = Ref(**{k: getattr(o, k) for k in attrs})
        if sum(ref.matches(p) for p in scene.objects) == 1:
            return ref
    return None


_GENERAL = (("shape",), ("color", "shape"), ("size", "color", "shape"))


def _referable(scene: Scene, keys=_GENERAL) -> list[tuple[Obj, Ref]]:
    return [(o, ref) for o in scene.objects if (ref := _unique_ref(scene, o, keys)) is not None]


def _forms(scene: Scene, qtype: str, split: str, rng: np.random.Generator) -> list[list[Question]]:
    # Candidate questions grouped by form; a form is picked uniformly first so forms stay balanced.
    objs = scene.objects
    if qtype == "color":  # the phrase must not contain the colour it asks for
        return [[Question("color", r) for _, r in _referable(scene, (("shape",), ("size", "shape")))]]
    if qtype == "shape":
        return [[Question("shape", r) for _, r in _referable(scene, (("color",), ("size", "color")))]]
    if qtype == "count":  # absent colours and shapes are fair game: their answer is "0"
        return [[Question("count", Ref(color=c)) for c in COLORS],
                [Question("count", Ref(shape=s)) for s in SHAPES], [Question("count")]]
    if qtype == "exists":
        present = sorted({(o.color, o.shape) for o in objs})
        absent = [c for c in _COMBOS if c not in present]
        # "no" combos follow the split's weights, so rare combinations stay rare in the text too
        # and "rare combo -> no" is not a shortcut the training data teaches.
        weights = _combo_weights(split)[[_COMBOS.index(c) for c in absent]]
        no_color, no_shape = absent[int(_weighted_index(rng, weights))]
        return [[Question("exists", Ref(shape=s, color=c)) for c, s in present],  # form "yes"
                [Question("exists", Ref(shape=no_shape, color=no_color))]]        # form "no"
    if qtype == "position":
        refs = _referable(scene)
        pairs = [(a, b) for a in refs for b in refs if a[0] is not b[0]]
        far = MIN_REL_OFFSET
        return [[Question("position", ra, rb, "x") for (a, ra), (b, rb) in pairs if abs(a.cx - b.cx) >= far],
                [Question("position", ra, rb, "y") for (a, ra), (b, rb) in pairs if abs(a.cy - b.cy) >= far],
                [Question("position", r, form="side") for o, r in refs if abs(o.cx - 0.5) >= MIN_SIDE_OFFSET]]
    if qtype == "bigger":  # named by colour + shape only: a size word would give the answer away
        refs = _referable(scene, (("color", "shape"),))
        return [[Question("bigger", ra, rb) for a, ra in refs for b, rb in refs if a.size != b.size]]
    if qtype == "describe":
        xs = sorted(o.cx for o in objs)
        ok = len(objs) <= 3 and all(b - a >= MIN_DESCRIBE_GAP for a, b in zip(xs, xs[1:]))
        return [[Question("describe")] if ok else []]
    raise ValueError(f"unknown qtype {qtype!r}")


def _rng(seed: int, index: int, split: str) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), SPLITS[split]]))


def make_example(seed: int, index: int, split: str = "eval", size: int = 128) -> Example:
    """Example number index of the (seed, split) stream: a deterministic function of its arguments."""
    rng = _rng(seed, index, split)
    qtype = QTYPES[int(rng.integers(len(QTYPES)))]  # type first, scene second: types stay balanced
    for _ in range(MAX_TRIES):
        scene = sample_scene(rng, split)
        forms = [f for f in _forms(scene, qtype, split, rng) if f]
        if forms:
            form = forms[int(rng.integers(len(forms)))]
            q = form[int(rng.integers(len(form)))]
            return Example(render(scene, size), question_text(q), answer(scene, q), qtype, scene, q)
    raise RuntimeError(f"no {qtype} question after {MAX_TRIES} scenes (seed={seed}, index={index})")


def examples(seed: int, n: int, split: str = "eval", start: int = 0, size: int = 128) -> Iterator[Example]:
    """Examples start .. start+n-1 of the (seed, split) stream."""
    for i in range(start, start + n):
        yield make_example(seed, i, split, size)


def normalize_answer(s: str) -> str:
    """Canonical form for exact match: lowercase, trimmed, no trailing period, single spaces."""
    s = s.strip().lower()
    while s.endswith("."):
        s = s[:-1].rstrip()
    return " ".join(s.split())


def scene_specs(scene: Scene, rng: np.random.Generator, k: int, split: str = "train",
                qtypes: tuple[str, ...] = QTYPES, forms: tuple[str, ...] | None = None) -> list[Question]:
    """Up to k more questions about one scene, at most one per type of `qtypes`: training reuses one encoded
    image k times. `forms` keeps only position questions of those forms ("x", "y", "side")."""
    out = []
    for qtype in rng.permutation(qtypes):
        groups = [g for g in _forms(scene, str(qtype), split, rng)
                  if g and (forms is None or qtype != "position" or g[0].form in forms)]
        if groups:
            group = groups[int(rng.integers(len(groups)))]
            out.append(group[int(rng.integers(len(group)))])
        if len(out) == k:
            break
    return out


def scene_questions(scene: Scene, rng: np.random.Generator, k: int, split: str = "train",
                    qtypes: tuple[str, ...] = QTYPES, forms: tuple[str, ...] | None = None) -> list[tuple[str, str, str]]:
    """`scene_specs` worded and answered: (qtype, question, answer)."""
    return [(q.qtype, question_text(q), answer(scene, q)) for q in scene_specs(scene, rng, k, split, qtypes, forms)]

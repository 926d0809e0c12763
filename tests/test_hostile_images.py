"""The hostile-image corpus (tests/corpus/images, built by tests/corpus/make_images.py) and a sample of seeded
byte mutations: every image ends decoded or in an ImageError, through load_image and through generate."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

import edgevlm
from edgevlm.errors import ImageError
from edgevlm.image import load_image

CORPUS = Path(__file__).parent / "corpus" / "images"
EXPECTED = json.loads((CORPUS / "expected.json").read_text())
sys.path.insert(0, str(Path(__file__).parent / "corpus"))
import make_images  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="module")
def vlm():
    return edgevlm.load(threads=1)


def test_corpus_matches_its_script():
    assert set(EXPECTED) == set(make_images.cases()) == {p.name for p in CORPUS.iterdir()} - {"expected.json"}
    assert len(EXPECTED) >= 40


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_image(name, vlm):
    expect, path = EXPECTED[name], CORPUS / name
    if "ok" in expect:
        assert list(load_image(path).shape) == expect["ok"] + [3]
        # the path answers as its decoded pixels do (the file, not something else, reached the model)
        want = vlm.generate(load_image(path), "What color is the star?", max_tokens=2)
        assert vlm.generate(path, "What color is the star?", max_tokens=2) == want
        return
    with pytest.raises(ImageError, match=expect["error"]):
        load_image(path)
    with pytest.raises(ImageError, match=expect["error"]):
        vlm.generate(path, "What color is the star?", max_tokens=1)
    with pytest.raises(ImageError):
        vlm.generate(path.read_bytes(), "What color is the star?", max_tokens=1)


def test_exif_orientations_move_the_red_strip():
    # the red strip is on the left of the stored pixels; each orientation shows it on a known side
    side = {1: "left", 2: "right", 3: "right", 4: "left", 5: "top", 6: "top", 7: "bottom", 8: "bottom"}
    for o, where in side.items():
        a = load_image(CORPUS / f"exif-orientation-{o}.jpg").astype(int)
        edge = {"left": a[:, 2], "right": a[:, -3], "top": a[2], "bottom": a[-3]}[where]
        assert (edge[:, 0] > 200).all() and (edge[:, 2] < 60).all(), (o, where)


def test_mutated_images_sample():
    """CI's sample of benchmarks/fuzz_images.py (which runs >= 10,000): decoded or ImageError, nothing else."""
    rng, seeds = random.Random(20261122), make_images.seeds()
    outcomes = {"ok": 0, "error": 0}
    for k in range(400):
        name = sorted(seeds)[k % len(seeds)]
        data = make_images.mutate(seeds[name], rng)
        try:
            a = load_image(data)
            assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
            outcomes["ok"] += 1
        except ImageError:
            outcomes["error"] += 1
    print("mutations:", outcomes)
    assert outcomes["ok"] > 20 and outcomes["error"] > 20  # the mutations reach both outcomes


def test_odd_image_inputs_are_image_errors(vlm, tmp_path):
    import os

    from PIL import Image

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    lazy = Image.open(CORPUS / "truncated.jpg")  # opened by the caller, decoded by us
    for image in ["/dev/zero", fifo, tmp_path, "a\x00b.png", tmp_path / "missing.png", lazy, [1, 2, 3],
                  np.zeros((0, 5, 3), np.uint8), np.zeros((4, 4, 3), bool)]:
        with pytest.raises(ImageError):
            vlm.generate(image, "What color is the star?", max_tokens=1)


@pytest.mark.parametrize("kwargs", [
    {"max_tokens": "x"}, {"max_tokens": 0}, {"temperature": float("nan")}, {"temperature": "hot"},
    {"temperature": -1}, {"top_p": 0}, {"top_k": -1}, {"top_k": 1.5}, {"repetition_penalty": float("inf")},
    {"seed": "s", "temperature": 1.0}, {"seed": -1, "temperature": 1.0}, {"stop": 5}, {"stop": [b"x"]},
])
def test_bad_generation_arguments_are_argument_errors(vlm, kwargs):
    with pytest.raises(edgevlm.ArgumentError):
        vlm.generate(CORPUS / "cmyk.jpg", "What color is the star?", **{"max_tokens": 1, **kwargs})


def test_bad_load_arguments_are_edgevlm_errors():
    with pytest.raises(edgevlm.BundleError):
        edgevlm.load(5)
    with pytest.raises(edgevlm.ArgumentError):
        edgevlm.load(threads="two")

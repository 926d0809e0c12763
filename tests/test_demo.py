"""The embedded demo bundles: they load offline, answer the bundled examples, and hold their accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edgevlm
from edgevlm.apps import eval_cmd
from edgevlm.data import shapes

ASSETS = Path(edgevlm.__file__).parent / "assets"
STANDARD, MINI = ASSETS / "shapes-fastvlm", ASSETS / "shapes-fastvlm-mini"
EXAMPLES = sorted((ASSETS / "examples").glob("*.json"))


@pytest.fixture(scope="module")
def default():
    return edgevlm.load()


def test_default_is_the_standard_demo(default):
    assert default.bundle.root.resolve() == STANDARD.resolve()
    assert default.manifest.family == "fast_vlm" and default.manifest.fusion == "splice"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_bundled_examples_are_answered_correctly(default, path):
    spec = json.loads(path.read_text())
    png = path.with_suffix(".png")
    scene = shapes.Scene(tuple(shapes.Obj(**o) for o in spec["objects"]))
    drawn = np.asarray(shapes.render(scene), np.int16)
    assert np.abs(drawn - np.asarray(edgevlm.image.load_image(png), np.int16)).mean() < 2  # the JSON is the PNG
    for qa in spec["qa"]:
        got = default.generate(png, qa["question"], max_tokens=24)
        print(f"{qa['question']!r} -> {got!r} (expected {qa['answer']!r})")
        assert shapes.normalize_answer(got) == qa["answer"]


@pytest.mark.parametrize("bundle,floor", [(STANDARD, 0.9), (MINI, 0.87)], ids=["standard", "pre-fusion"])
def test_accuracy_on_unseen_questions(bundle, floor, capsys):
    # a seed the committed figures did not use; 140 questions keep it quick (benchmarks/ has the full runs)
    assert eval_cmd.main(["--bundle", str(bundle), "--seed", "31337", "--n", "140", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    print(bundle.name, result)
    assert set(result) == {"accuracy", "per_type", "n", "bundle"} and result["n"] == 140
    assert set(result["per_type"]) == set(shapes.QTYPES)
    assert result["accuracy"] >= floor


def test_mini_bundle_sees_one_image_token():
    vlm = edgevlm.load(MINI)
    r = list(vlm.stream(ASSETS / "examples" / "shapes-1.png", "How many objects are there?", max_tokens=4))[-1]
    std = list(edgevlm.load(STANDARD).stream(ASSETS / "examples" / "shapes-1.png", "How many objects are there?",
                                           max_tokens=4))[-1]
    assert vlm.manifest.image_tokens == 1 and std.prompt_tokens - r.prompt_tokens == 15

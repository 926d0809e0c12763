"""The embedded demo bundles: the default loads offline with no path, answers the README's example
question right, and both it and its LLaVA-Mini variant score on unseen questions what the README says.

The floors below sit a little under the committed models' level on this seed (standard 0.993, LLaVA-Mini 0.993,
greedy, n = 150) and at or above the demo issue's targets (0.95; the LLaVA-Mini within 0.03 of that)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edgevlm
from edgevlm.apps import cli
from edgevlm.data import shapes
from edgevlm.evaluate import evaluate
from edgevlm.image import load_image

ASSETS = Path(edgevlm.__file__).parent / "assets"


def test_default_is_the_standard_demo():
    vlm = edgevlm.load()
    assert vlm.bundle.root.resolve() == (ASSETS / "shapes-fastvlm").resolve()
    assert vlm.manifest.family == "fast_vlm" and vlm.manifest.fusion == "splice"
    assert vlm.manifest.source.parity["greedy_match"] and vlm.manifest.source.parity["max_abs_logit_diff"] < 1e-4


README_QUESTION = "What color is the star?"  # the main-job command of the README, on shapes-1.png


def test_readme_main_command_answers_right(capsys):
    assert cli.main(["chat", "--image", str(ASSETS / "examples" / "shapes-1.png"), "--prompt", README_QUESTION]) == 0
    spec = json.loads((ASSETS / "examples" / "shapes-1.json").read_text())
    [want] = [qa["answer"] for qa in spec["qa"] if qa["question"] == README_QUESTION]
    assert shapes.normalize_answer(capsys.readouterr().out) == want


def test_example_sidecars_describe_their_pictures():
    for path in sorted((ASSETS / "examples").glob("*.json")):
        spec = json.loads(path.read_text())
        scene = shapes.Scene(tuple(shapes.Obj(**o) for o in spec["objects"]), tuple(spec["background"]))
        drawn = np.asarray(shapes.render(scene), np.int16)
        assert np.abs(drawn - load_image(path.with_suffix(".png")).astype(np.int16)).mean() < 2


def test_sidecar_answers_are_the_generators():
    for path in sorted((ASSETS / "examples").glob("*.json")):
        spec = json.loads(path.read_text())
        scene = shapes.Scene(tuple(shapes.Obj(**o) for o in spec["objects"]), tuple(spec["background"]))
        for qa in spec["qa"]:  # an independent re-derivation: the question text is parsed back to a spec
            assert qa["answer"] == oracle_answer(scene, qa["question"]), qa


def oracle_answer(scene, question):
    from test_shapes_data import oracle

    return oracle(scene, question)[1]


@pytest.mark.parametrize("name, floor", [("shapes-fastvlm", 0.96), ("shapes-fastvlm-mini", 0.95)])
def test_demo_bundles_are_accurate_on_unseen_questions(name, floor):
    # a seed of its own (neither training, validation nor the committed test figures); greedy; exact match
    result = evaluate(edgevlm.load(ASSETS / name), "shapes", seed=31_337, n=150)
    print(name, result["accuracy"], result["per_type"])
    assert result["accuracy"] >= floor

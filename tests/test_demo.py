"""The embedded demo bundles: the default loads offline with no path and answers the README's example question
right; both it and its LLaVA-Mini variant answer later questions of a chat, say the one out-of-world sentence to
pictures that are not shapes scenes and to questions with no picture, never degenerate, and score on unseen
questions what the README says.

The floors below sit a little under the committed models' level on these seeds (greedy) and at or above the demo
issue's targets (first question 0.99 in benchmarks/demo_accuracy.py with n = 1000; here n = 150)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edgevlm
from edgevlm.apps import cli
from edgevlm.data import chats, outworld, shapes
from edgevlm.evaluate import degenerate, evaluate
from edgevlm.image import load_image

ASSETS = Path(edgevlm.__file__).parent / "assets"
BUNDLES = ["shapes-fastvlm", "shapes-fastvlm-mini"]
SENTENCE = shapes.normalize_answer(outworld.SENTENCE)


@pytest.fixture(scope="module", params=BUNDLES)
def vlm(request):
    return edgevlm.load(ASSETS / request.param)


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


def test_readme_command_without_a_picture_says_what_it_knows(capsys):
    assert cli.main(["chat", "--prompt", README_QUESTION]) == 0
    assert shapes.normalize_answer(capsys.readouterr().out) == SENTENCE


@pytest.mark.parametrize("example", ["shapes-1", "shapes-2"])
def test_a_chat_about_an_example_answers_every_turn(vlm, example):
    """The example's first three sidecar questions, one after another in one chat (the picture with the first):
    every answer right, each after the earlier ones in context. (Asked fourth, the standard demo's description of
    shapes-1 repeats an object: docs/demo-model.md.)"""
    spec = json.loads((ASSETS / "examples" / f"{example}.json").read_text())
    qa = spec["qa"][:3]
    chat = vlm.chat()
    got = [chat.send(x["question"], image=ASSETS / "examples" / f"{example}.png" if k == 0 else None, max_tokens=24)
           for k, x in enumerate(qa)]
    assert [shapes.normalize_answer(g) for g in got] == [x["answer"] for x in qa]


def test_a_chat_in_another_order_answers_every_turn(vlm):
    spec = json.loads((ASSETS / "examples" / "shapes-1.json").read_text())
    qa = spec["qa"][::-1][:3]  # the description first: later answers must not just repeat it
    chat = vlm.chat()
    got = [chat.send(x["question"], image=ASSETS / "examples" / "shapes-1.png" if k == 0 else None, max_tokens=24)
           for k, x in enumerate(qa)]
    assert [shapes.normalize_answer(g) for g in got] == [x["answer"] for x in qa]


ODD_FLOOR = {"shapes-fastvlm": 45, "shapes-fastvlm-mini": 41}  # of 50; the shipped bundles: 46 and 42


def test_odd_pictures_get_the_sentence_and_never_degenerate(vlm):
    """50 pictures from outside the shapes world, many in odd forms (1-8 px, strips, greyscale, alpha, palettes,
    photo-sized), each with a question a user might ask: never a degenerate answer (each ends by EOS well within
    64 tokens), and nearly always the sentence (the odd forms were never in training: docs/demo-model.md)."""
    wrong, bad = [], []
    for i in range(50):
        image = outworld.make_odd(31_337, i)
        question = outworld.question(np.random.default_rng([31_337, i]), "eval")
        rs = list(vlm.stream(image, question, max_tokens=64))
        text = "".join(r.text for r in rs)
        if shapes.normalize_answer(text) != SENTENCE:
            wrong.append((i, outworld.ODD_FORMS[i % len(outworld.ODD_FORMS)], question, text[:60]))
        if degenerate(text, rs[-1].finish_reason == "stop"):
            bad.append((i, text[:60]))
    print("not the sentence:", wrong)
    assert not bad
    assert 50 - len(wrong) >= ODD_FLOOR[vlm.bundle.root.name]


@pytest.mark.parametrize("question", [README_QUESTION, "Describe the image.", "What is in this image?", "Hello!"])
def test_no_picture_gets_the_sentence(vlm, question):
    assert shapes.normalize_answer(vlm.generate(None, question, max_tokens=64)) == SENTENCE
    chat = vlm.chat()  # and every later turn of such a chat
    assert [shapes.normalize_answer(chat.send(q, max_tokens=64)) for q in (question, "How many objects are there?")] \
        == [SENTENCE, SENTENCE]


def test_a_real_photo_gets_the_sentence(vlm):
    cbook = pytest.importorskip("matplotlib.cbook")
    photo = cbook.get_sample_data("grace_hopper.jpg").read()
    chat = vlm.chat()
    answers = [chat.send(q, image=photo if k == 0 else None, max_tokens=64)
               for k, q in enumerate((README_QUESTION, "How many objects are there?", "Describe the image."))]
    assert [shapes.normalize_answer(a) for a in answers] == [SENTENCE] * 3


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


@pytest.mark.parametrize("name, floor", [("shapes-fastvlm", 0.97), ("shapes-fastvlm-mini", 0.95)])
def test_demo_bundles_are_accurate_on_unseen_questions(name, floor):
    # a seed of its own (neither training, validation nor the committed test figures); greedy; exact match
    result = evaluate(edgevlm.load(ASSETS / name), "shapes", seed=31_337, n=150)
    print(name, result["accuracy"], result["per_type"])
    assert result["accuracy"] >= floor


@pytest.mark.parametrize("name, floor", [("shapes-fastvlm", 0.93), ("shapes-fastvlm-mini", 0.9)])
def test_later_turns_of_unseen_chats(name, floor):
    result = evaluate(edgevlm.load(ASSETS / name), "chats", seed=31_337, n=60)  # 60 chats of three questions
    print(name, result["per_type"])
    assert min(result["per_type"]["turn2"], result["per_type"]["turn3"]) >= floor


@pytest.mark.parametrize("name", BUNDLES)
def test_unseen_out_of_world_pictures(name):
    result = evaluate(edgevlm.load(ASSETS / name), "outworld", seed=31_337, n=100, max_tokens=64)
    print(name, result["accuracy"], result["per_type"])
    assert result["accuracy"] >= 0.97

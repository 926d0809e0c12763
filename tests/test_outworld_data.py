"""Out-of-world pictures and held-out chats: deterministic, varied, loadable by the runtime, and their held-out
splits ask things training never does."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from edgevlm.data import chats, outworld, shapes
from edgevlm.image import load_image


def digest(im) -> str:
    return hashlib.sha256(np.asarray(im).tobytes() + repr(im.size).encode()).hexdigest()


@pytest.mark.parametrize("kind", outworld.KINDS)
def test_each_kind_is_deterministic_and_varied(kind):
    a = [outworld.make_image(3, i, "train", kind) for i in range(6)]
    b = [outworld.make_image(3, i, "train", kind) for i in range(6)]
    assert [digest(x) for x in a] == [digest(x) for x in b]
    assert len({digest(x) for x in a}) == 6
    assert all(x.mode == "RGB" and min(x.size) >= 48 for x in a)
    assert digest(outworld.make_image(3, 0, "eval", kind)) != digest(a[0])  # the splits are other streams


def test_examples_cover_the_kinds_and_answer_with_the_sentence():
    exs = list(outworld.examples(outworld.TEST_SEED, 120))
    assert {e.kind for e in exs} == set(outworld.KINDS)
    assert all(e.answer == outworld.SENTENCE and e.qtype == e.kind for e in exs)
    assert [e.question for e in exs[:20]] == [e.question for e in outworld.examples(outworld.TEST_SEED, 20)]
    text_only = list(outworld.examples(outworld.TEST_SEED, 20, image=False))
    assert all(e.image is None and e.kind == "none" for e in text_only)


def test_held_out_questions_use_words_training_never_asks():
    rng = np.random.default_rng(0)
    train = {outworld.generic_question(rng, "train") for _ in range(3000)}
    assert not any(noun in q.split(" ") or f"{noun}s" in q for q in train for noun in outworld.EVAL_NOUNS)
    assert not train & set(outworld.EVAL_GENERIC)
    held = {outworld.generic_question(rng, "eval") for _ in range(3000)}
    assert held & set(outworld.EVAL_GENERIC) and any("bicycle" in q for q in held)
    for q in train | held:  # never a shapes-world noun phrase: on a shapes picture too, the answer is the sentence
        assert not any(f" {s}" in q for s in shapes.SHAPES) and "object" not in q, q


def test_odd_forms_all_load():
    for i in range(len(outworld.ODD_FORMS) * 2):
        rgb = load_image(outworld.make_odd(5, i))
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


def test_chats_are_deterministic_and_answered_by_the_generator():
    for i in range(40):
        c = chats.shapes_chat(chats.TEST_SEED, i, 3)
        again = chats.shapes_chat(chats.TEST_SEED, i, 3)
        assert c.turns == again.turns and len(c.turns) == 3
        first = shapes.make_example(chats.TEST_SEED, i)
        assert c.turns[0].question == first.question and digest(c.image) == digest(first.image)
        assert all(t.answer == shapes.answer(c.scene, t.spec) for t in c.turns)
    o = chats.outworld_chat(outworld.TEST_SEED, 0, 4)
    assert len(o.turns) == 4 and {t.answer for t in o.turns} == {outworld.SENTENCE} and o.image is not None

"""The procedural shapes VQA set: determinism, balance, vocabulary, correctness, unambiguous references."""

from __future__ import annotations

import hashlib
import itertools
import re
from collections import Counter

import numpy as np
import pytest

from edgevlm.data.shapes import (COLORS, GRID, JITTER, MIN_DESCRIBE_GAP, MIN_REL_OFFSET, MIN_SIDE_OFFSET, QTYPES, RARE_COMBOS,
                                 SHAPES, SIZES, Obj, Question, Ref, Scene, answer, examples, make_example,
                                 normalize_answer, question_text, render, sample_scene)

N = 700


@pytest.fixture(scope="module")
def eval_set():
    return list(examples(123, N, "eval"))


@pytest.fixture(scope="module")
def train_set():
    return list(examples(45, N, "train"))


@pytest.fixture(params=["eval", "train"])
def dataset(request, eval_set, train_set):
    return eval_set if request.param == "eval" else train_set


# ------------------------------------------------------------- an independent oracle: reads the question TEXT

def parse_ref(phrase: str) -> dict:
    words = phrase.split()
    attrs = {}
    for w in words:
        key = "size" if w in SIZES else "color" if w in COLORS else "shape" if w in SHAPES else None
        assert key is not None or w == "object", f"unexpected word {w!r} in {phrase!r}"
        if key:
            assert key not in attrs, phrase
            attrs[key] = w
    return attrs


def matching(scene: Scene, attrs: dict) -> list[Obj]:
    return [o for o in scene.objects if all(getattr(o, k) == v for k, v in attrs.items())]


def the(scene: Scene, phrase: str) -> Obj:
    hits = matching(scene, parse_ref(phrase))
    assert len(hits) == 1, f"'the {phrase}' is ambiguous or empty: {len(hits)} matches"
    return hits[0]


def oracle(scene: Scene, q: str) -> tuple[str, str]:
    """(qtype, answer) computed from the question's wording alone."""
    if m := re.fullmatch(r"What color is the (.+)\?", q):
        assert "color" not in parse_ref(m[1])  # the phrase must not give the answer away
        return "color", the(scene, m[1]).color
    if m := re.fullmatch(r"What shape is the (.+) object\?", q):
        assert "shape" not in parse_ref(m[1])
        return "shape", the(scene, m[1]).shape
    if m := re.fullmatch(r"How many (\w+) objects are there\?", q):
        return "count", str(sum(o.color == m[1] for o in scene.objects))
    if m := re.fullmatch(r"How many (\w+)s are there\?", q):
        return "count", str(sum(o.shape == m[1] for o in scene.objects)) if m[1] != "object" \
            else str(len(scene.objects))
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", q):
        assert m[1] in COLORS and m[2] in SHAPES
        return "exists", "yes" if matching(scene, {"color": m[1], "shape": m[2]}) else "no"
    if m := re.fullmatch(r"Is the (.+) on the left or right side of the image\?", q):
        a = the(scene, m[1])
        assert abs(a.cx - 0.5) >= MIN_SIDE_OFFSET
        return "position", "left" if a.cx < 0.5 else "right"
    if m := re.fullmatch(r"Is the (.+) (left or right of|above or below) the (.+)\?", q):
        a, b = the(scene, m[1]), the(scene, m[3])
        if m[2] == "left or right of":
            assert abs(a.cx - b.cx) >= MIN_REL_OFFSET
            return "position", "left" if a.cx < b.cx else "right"
        assert abs(a.cy - b.cy) >= MIN_REL_OFFSET
        return "position", "above" if a.cy < b.cy else "below"
    if m := re.fullmatch(r"Which is bigger, the (.+) or the (.+)\?", q):
        assert set(parse_ref(m[1])) == set(parse_ref(m[2])) == {"color", "shape"}
        a, b = the(scene, m[1]), the(scene, m[2])
        assert a.size != b.size
        big = a if a.size == "large" else b
        return "bigger", f"{big.color} {big.shape}"
    if q == "Describe the image.":
        assert len(scene.objects) <= 3
        xs = sorted(o.cx for o in scene.objects)
        assert all(b - a >= MIN_DESCRIBE_GAP for a, b in zip(xs, xs[1:]))  # the order is visible
        return "describe", ", ".join(f"{o.size} {o.color} {o.shape}" for o in sorted(scene.objects, key=lambda o: o.cx))
    raise AssertionError(f"question matches no template: {q!r}")


# ------------------------------------------------------------- determinism

def test_same_arguments_same_example():
    for split in ("eval", "train"):
        a, b = make_example(2_000_003, 41, split), make_example(2_000_003, 41, split)
        assert a.image.tobytes() == b.image.tobytes()
        assert (a.question, a.answer, a.qtype, a.scene, a.spec) == (b.question, b.answer, b.qtype, b.scene, b.spec)


def test_different_index_seed_or_split_differs():
    base = make_example(5, 0, "eval")
    for other in (make_example(5, 1, "eval"), make_example(6, 0, "eval"), make_example(5, 0, "train")):
        assert other.scene != base.scene
        assert other.image.tobytes() != base.image.tobytes()


def test_stream_is_pinned():
    # Committed held-out accuracies name (seed, n): if this hash moves, those figures no longer apply.
    # Pins scenes (exact float geometry), questions and answers; pixels also depend on Pillow's rasteriser.
    text = "|".join(f"{e.qtype}:{e.question}:{e.answer}:{e.scene!r}" for s in ("eval", "train")
                    for e in examples(0, 40, s))
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == "9a4691be80dd5cae"


def test_examples_is_make_example_in_order():
    got = [(e.question, e.answer) for e in examples(9, 5, "train", start=10)]
    assert got == [(make_example(9, i, "train").question, make_example(9, i, "train").answer) for i in range(10, 15)]


def test_unknown_split_rejected():
    with pytest.raises(ValueError):
        make_example(0, 0, "test")


# ------------------------------------------------------------- distribution

def test_every_qtype_is_well_represented(dataset):
    counts = Counter(e.qtype for e in dataset)
    assert set(counts) == set(QTYPES)
    assert all(c / len(dataset) >= 0.08 for c in counts.values()), counts


def test_answers_are_from_the_vocabulary(dataset):
    item = rf"({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
    vocab = {"color": set(COLORS), "shape": set(SHAPES), "count": {str(i) for i in range(7)},
             "exists": {"yes", "no"}, "position": {"left", "right", "above", "below"},
             "bigger": {f"{c} {s}" for c in COLORS for s in SHAPES}}
    for e in dataset:
        assert e.answer == normalize_answer(e.answer), e.answer  # already canonical
        if e.qtype == "describe":
            assert re.fullmatch(rf"{item}(, {item}){{0,2}}", e.answer), e.answer
        else:
            assert e.answer in vocab[e.qtype], (e.qtype, e.answer)


def test_binary_answers_are_balanced(eval_set, train_set):
    answers = Counter(e.answer for e in eval_set + train_set if e.qtype in ("exists", "position"))
    assert 0.4 <= answers["yes"] / (answers["yes"] + answers["no"]) <= 0.6, answers
    assert 0.35 <= answers["left"] / (answers["left"] + answers["right"]) <= 0.65, answers
    assert answers["above"] >= 10 and answers["below"] >= 10, answers


def test_count_answers_cover_zero_to_six(eval_set, train_set):
    assert {e.answer for e in eval_set + train_set if e.qtype == "count"} == {str(i) for i in range(7)}


def test_rare_combos_are_about_ten_times_rarer_in_train():
    def per_combo(split, n=3000):
        rng = np.random.default_rng(11)
        return Counter((o.color, o.shape) for _ in range(n) for o in sample_scene(rng, split).objects)

    for split, lo, hi in (("train", 0.06, 0.16), ("eval", 0.8, 1.25)):
        counts = per_combo(split)
        common = np.mean([v for k, v in counts.items() if k not in RARE_COMBOS])
        rare = np.mean([counts[k] for k in RARE_COMBOS])
        assert lo <= rare / common <= hi, (split, rare, common)


def test_rare_combos_rare_in_generated_train_examples(eval_set, train_set):
    def rate(ds):
        objs = [(o.color, o.shape) for e in ds for o in e.scene.objects]
        return sum(c in RARE_COMBOS for c in objs) / len(objs)

    assert rate(train_set) * 4 < rate(eval_set)


# ------------------------------------------------------------- correctness and references

def test_generated_answers_match_an_independent_reading_of_the_question(dataset):
    for e in dataset:
        assert oracle(e.scene, e.question) == (e.qtype, e.answer), e.question
        assert question_text(e.spec) == e.question and answer(e.scene, e.spec) == e.answer


def test_references_use_the_shortest_unique_phrase(dataset):
    orders = {"color": [("shape",), ("size", "shape")], "shape": [("color",), ("size", "color")],
              "position": [("shape",), ("color", "shape"), ("size", "color", "shape")]}
    for e in dataset:
        for ref in (e.spec.a, e.spec.b):
            if e.qtype not in orders or ref is None:
                continue
            used = {k: v for k, v in vars(ref).items() if v}
            [obj] = matching(e.scene, used)
            for attrs in orders[e.qtype]:  # the first unique phrase in this order is the one to use
                if len(matching(e.scene, {k: getattr(obj, k) for k in attrs})) == 1:
                    assert set(used) == set(attrs), (e.question, attrs)
                    break


def test_handcrafted_scene():
    scene = Scene((
        Obj("circle", "red", "small", 0.15, 0.2),
        Obj("square", "red", "large", 0.75, 0.7),
        Obj("star", "blue", "small", 0.45, 0.85),
        Obj("circle", "yellow", "large", 0.5, 0.4),
    ))

    def ask(qtype, a=Ref(), b=None, form=""):
        q = Question(qtype, a, b, form)
        assert oracle(scene, question_text(q))[1] == answer(scene, q)
        return answer(scene, q)

    assert ask("count", Ref(color="red")) == "2"
    assert ask("count", Ref(color="green")) == "0"
    assert ask("count", Ref(shape="circle")) == "2"
    assert ask("count") == "4"
    assert ask("exists", Ref(shape="star", color="blue")) == "yes"
    assert ask("exists", Ref(shape="star", color="orange")) == "no"
    assert question_text(Question("exists", Ref(shape="star", color="orange"))) == "Is there an orange star?"
    assert ask("color", Ref(shape="star")) == "blue"
    assert ask("color", Ref(shape="circle", size="large")) == "yellow"
    assert question_text(Question("color", Ref(shape="circle", size="large"))) == "What color is the large circle?"
    assert ask("shape", Ref(color="yellow")) == "circle"
    assert ask("shape", Ref(color="red", size="small")) == "circle"
    assert ask("position", Ref(shape="square"), Ref(shape="star"), "x") == "right"
    assert ask("position", Ref(shape="star"), Ref(shape="square"), "x") == "left"
    assert ask("position", Ref(shape="circle", color="red"), Ref(shape="star"), "y") == "above"
    assert ask("position", Ref(shape="square"), form="side") == "right"
    assert ask("position", Ref(shape="circle", color="red"), form="side") == "left"
    assert ask("bigger", Ref(shape="star", color="blue"), Ref(shape="square", color="red")) == "red square"
    three = Scene(scene.objects[1:])  # describe is asked of <= 3 objects, listed left to right
    assert answer(three, Question("describe")) == "small blue star, large yellow circle, large red square"
    with pytest.raises(ValueError):  # two circles: "the circle" names nothing
        answer(scene, Question("color", Ref(shape="circle")))
    with pytest.raises(ValueError):  # both small: no bigger one
        answer(scene, Question("bigger", Ref(shape="circle", color="red"), Ref(shape="star", color="blue")))


def test_render_puts_objects_where_the_scene_says():
    scene = Scene((Obj("square", "red", "large", 0.25, 0.75), Obj("circle", "blue", "small", 0.8, 0.2)), (220,) * 3)
    px = np.asarray(render(scene, 128)).astype(int)
    assert np.abs(px[96, 32] - COLORS["red"]).max() <= 2  # row = cy * 128, column = cx * 128
    assert np.abs(px[25, 102] - COLORS["blue"]).max() <= 2
    assert np.abs(px[5, 5] - 220).max() == 0
    assert render(scene, 64, supersample=1).size == (64, 64)


# ------------------------------------------------------------- scenes and images

def test_scenes_are_valid(dataset):
    n_objects = Counter()
    for e in dataset:
        objs = e.scene.objects
        n_objects[len(objs)] += 1
        assert 1 <= len(objs) <= 6
        for o in objs:
            assert o.r == SIZES[o.size] and o.r <= o.cx <= 1 - o.r and o.r <= o.cy <= 1 - o.r
        for a, b in itertools.combinations(objs, 2):
            assert np.hypot(a.cx - b.cx, a.cy - b.cy) > a.r + b.r  # bounding circles never touch
        assert all(180 <= c <= 255 for c in e.scene.background)
        cells = [(int(o.cy * GRID), int(o.cx * GRID)) for o in objs]
        assert len(set(cells)) == len(cells)  # one object per cell of the vision-token grid
        for o, (row, col) in zip(objs, cells):
            assert abs(o.cx - (col + 0.5) / GRID) <= JITTER + 1e-12 and abs(o.cy - (row + 0.5) / GRID) <= JITTER + 1e-12
            assert o.r < 0.5 / GRID  # and the object stays inside its cell
    assert set(n_objects) == set(range(1, 7))
    assert SIZES["large"] / SIZES["small"] >= 1.8


def test_images_are_128_rgb(dataset):
    for e in dataset[:50]:
        assert e.image.mode == "RGB" and e.image.size == (128, 128)
    assert make_example(0, 0, size=64).image.size == (64, 64)


def test_normalize_answer():
    assert normalize_answer(" Red. ") == "red"
    assert normalize_answer("YES") == "yes"
    assert normalize_answer("small  red circle,\tlarge blue star.\n") == "small red circle, large blue star"
    assert normalize_answer("3") == "3"

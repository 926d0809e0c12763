"""The shapes-video set: deterministic, every question needs more than one frame, answers true to the scenes; and
the video fine-tuning script runs end to end (a few steps) into a checkpoint the exporter takes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from edgevlm.data.shapes_video import MAX_FRAMES, MIN_FRAMES, VIDEO_QTYPES, make_video_example, video_examples

ROOT = Path(__file__).resolve().parent.parent


def name(o) -> str:
    return f"{o.color} {o.shape}"


def test_examples_are_deterministic_and_balanced():
    a = [make_video_example(7, i, "train") for i in range(40)]
    b = [make_video_example(7, i, "train") for i in range(40)]
    assert [(e.question, e.answer) for e in a] == [(e.question, e.answer) for e in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for e, f in zip(a, b) for x, y in zip(e.frames, f.frames))
    exs = list(video_examples(3, 500, "eval"))
    types, frames = Counter(e.qtype for e in exs), Counter(len(e.frames) for e in exs)
    print("question types:", dict(types), "frames:", dict(sorted(frames.items())))
    assert set(types) == set(VIDEO_QTYPES) and min(types.values()) > 60
    assert set(frames) == set(range(MIN_FRAMES, MAX_FRAMES + 1))
    assert len({e.answer for e in exs if e.qtype == "direction"}) == 4


def test_every_question_needs_more_than_one_frame():
    for e in video_examples(11, 300, "eval"):
        first, last = e.scenes[0].objects, e.scenes[-1].objects
        assert len(e.frames) == len(e.scenes) and all(f.size == (128, 128) for f in e.frames)
        if e.qtype == "appeared_last":  # absent from the first frame, there in the last: the last frame alone
            assert e.answer in map(name, last) and e.answer not in map(name, first)  # cannot tell it from the rest
            newest = [o for o in last if name(o) == e.answer][0]
            before = e.scenes[-1 - next(k for k, s in enumerate(reversed(e.scenes)) if newest not in s.objects)]
            assert newest not in before.objects
        elif e.qtype == "appeared_first":
            assert [name(o) for o in first] == [e.answer] and len(last) > 1
        elif e.qtype == "count_end":
            assert e.answer == str(len(last))
        else:  # moved / direction: the mover is in both frames at different places, the others stay
            movers = [o for o in last if o not in first]
            assert len(movers) == 1 and name(movers[0]) == (e.answer if e.qtype == "moved" else e.question.split(
                "the ")[1].split(" move")[0])
            start = next(o for o in first if name(o) == name(movers[0]))
            dx, dy = movers[0].cx - start.cx, movers[0].cy - start.cy
            if e.qtype == "direction":
                want = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
                assert e.answer == want and max(abs(dx), abs(dy)) >= 0.45


def test_video_training_runs_and_exports(tmp_path):
    import edgevlm
    from edgevlm.export.exporter import export
    from edgevlm.export.dev.train_video import train

    init = ROOT / "export" / "checkpoints" / "shapes-fastvlm-mini"
    summary = train(init, tmp_path / "ckpt", minutes=5, size=4, threads=1, max_steps=3, val_batches=2,
                    log=lambda s: None)
    assert summary["steps"] == 3 and "video_exact" in summary["val_teacher_forced"]
    m = export(tmp_path / "ckpt", tmp_path / "bundle", progress=False, parity_tokens=4)
    print("exported after 3 steps:", m.source.parity)
    assert m.fusion == "prefusion" and m.source.parity["greedy_match"]
    vlm = edgevlm.load(tmp_path / "bundle", threads=1)
    ex = make_video_example(0, 0, "eval", 4)
    r = list(vlm.stream(None, ex.question, video=edgevlm.Video(list(ex.frames)), max_tokens=4))[-1]
    assert r.prompt_tokens < 60  # 4 frames, one token each (and the template's newline)

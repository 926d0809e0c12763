"""Multi-turn chats for the demo, as edgevlm's Chat asks them: the picture with the first question, then more
questions in the same conversation, each after the earlier answers.

    chat = chats.shapes_chat(seed, index, turns=3)      # chat.image, chat.turns: (question, answer, qtype, spec)
    chat = chats.outworld_chat(seed, index, turns=3)    # a picture from outside the shapes world (or image=False:
                                                        # none); any question; every answer outworld.SENTENCE
    answers = chats.run(vlm, chat)                       # greedy answers of a bundle, turn by turn in one Chat

Pure functions of (seed, index, split), like the examples they are made of.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import outworld, shapes

TEST_SEED = 2_000_017  # held-out chats; training draws seeds below 1e6


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str
    qtype: str  # a shapes.QTYPES type, or "outworld"
    spec: shapes.Question | None = None


@dataclass(frozen=True)
class Chat:
    image: Image.Image | None
    turns: tuple[Turn, ...]
    kind: str  # "shapes", an outworld.KINDS kind, or "none" (no picture)
    scene: shapes.Scene | None = None


def shapes_chat(seed: int, index: int, turns: int = 3, split: str = "eval", size: int = 128) -> Chat:
    """Example number index of the (seed, split) stream, its question first, then turns - 1 more questions about
    its scene (types drawn without repeats where the scene allows; any type may follow any other)."""
    ex = shapes.make_example(seed, index, split, size)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), shapes.SPLITS[split], 5]))
    specs = [ex.spec]
    while len(specs) < turns:  # scene_specs gives at most one per type: ask again for more
        specs += shapes.scene_specs(ex.scene, rng, turns - len(specs), split)
    return Chat(ex.image, tuple(Turn(shapes.question_text(q), shapes.answer(ex.scene, q), q.qtype, q)
                                for q in specs), "shapes", ex.scene)


def outworld_chat(seed: int, index: int, turns: int = 3, split: str = "eval", image: bool = True) -> Chat:
    """An out-of-world picture (or none) and turns questions about it, each answered with outworld.SENTENCE."""
    first = outworld.make_example(seed, index, split, image)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), outworld.SPLITS[split], 5]))
    qs = [first.question] + [outworld.question(rng, split) for _ in range(turns - 1)]
    return Chat(first.image, tuple(Turn(q, outworld.SENTENCE, "outworld") for q in qs), first.kind)


def run(vlm, chat: Chat, max_tokens: int = 48) -> list[str]:
    """The bundle's greedy answers, turn by turn in one edgevlm Chat (previous answers in context)."""
    c = vlm.chat()
    return [c.send(t.question, image=chat.image if k == 0 else None, max_tokens=max_tokens)
            for k, t in enumerate(chat.turns)]

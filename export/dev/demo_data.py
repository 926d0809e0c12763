"""The demo's training data: cell targets for the tower stage, packed chats for the language stage.

    stream = Stream(Conversations(tok, processor, n_image_tokens), seed)
    pixels, targets, world = stream.vision_batch(32)
    batch, cell_targets, (rows, index, ref_targets) = stream.text_batch(16, 9)

Used by export/dev/train_demo.py (the training loop; the model is export/dev/demo_model.py); see its docstring for why
chats are packed this way and what the reference marks are for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from edgevlm.data import outworld, shapes
from edgevlm.image import preprocess
from edgevlm.manifest import Preprocess

IMAGE_SIZE = 128  # FastViT downsamples 32x: 4 x 4 = 16 image tokens
GRID = IMAGE_SIZE // 32
CELL_HEADS = {"color": 1 + len(shapes.COLORS), "shape": 1 + len(shapes.SHAPES), "size": 1 + len(shapes.SIZES),
              "row": GRID, "col": GRID}  # 0 = empty cell for the first three
IGNORE = -100  # a target nothing is learnt from (cells of out-of-world pictures; prompt tokens)
PREPROCESS = Preprocess(shortest_edge=IMAGE_SIZE, crop=(IMAGE_SIZE, IMAGE_SIZE))  # what the bundle's runtime does


def object_target(o: shapes.Obj) -> np.ndarray:
    """[5] class ids of one object for the CELL_HEADS: colour, shape, size (from 1), row, column of its cell."""
    row, col = min(int(o.cy * GRID), GRID - 1), min(int(o.cx * GRID), GRID - 1)
    return np.array([1 + list(shapes.COLORS).index(o.color), 1 + shapes.SHAPES.index(o.shape),
                     1 + list(shapes.SIZES).index(o.size), row, col], np.int64)


def cell_targets(scene) -> np.ndarray:
    """[GRID*GRID, 5] class ids per cell of the tower's output grid (row-major): colour, shape and size of
    the object there (0 = none), and the cell's row and column. scene None (not a shapes scene): all IGNORE."""
    t = np.zeros((GRID * GRID, len(CELL_HEADS)), np.int64)
    if scene is None:
        return t + IGNORE
    t[:, 3], t[:, 4] = np.arange(GRID * GRID) // GRID, np.arange(GRID * GRID) % GRID
    for o in scene.objects:
        row = object_target(o)
        t[row[3] * GRID + row[4]] = row
    return t


def ref_marks(scene, q: shapes.Question, text: str) -> list[tuple[int, np.ndarray]]:
    """Where a question names one object, and which: [(end of the noun phrase in `text`, object_target)], for
    the questions whose phrases each name exactly one object (colour, shape, position, bigger)."""
    if q.qtype not in ("color", "shape", "position", "bigger"):
        return []
    marks, at = [], 0
    for ref in (q.a, q.b):
        if ref is not None:
            phrase = f"the {ref.phrase()}"
            at = text.index(phrase, at) + len(phrase)
            marks.append((at, object_target(shapes.find(scene, ref))))
    return marks


def pixels_of(image) -> np.ndarray:
    """[3, 128, 128] in 0..1, as the runtime preprocesses a picture (128 px ones are taken as they are)."""
    a = np.asarray(image.convert("RGB"))
    if a.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE):
        return a.astype(np.float32).transpose(2, 0, 1) / 255.0
    return preprocess(a, PREPROCESS)[0]


@dataclass
class Row:
    """One training row: token ids, per position the target its logits must predict (IGNORE: none), its weight,
    whether it enters the LLM plain (else, with pre-fusion, fused), which answer it belongs to (-1: none), and
    the attention blocks: (start, length, spans it also sees, position of its first token); each block is causal
    within itself."""
    image: bool
    ids: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    weight: list[float] = field(default_factory=list)
    plain: list[bool] = field(default_factory=list)
    answer: list[int] = field(default_factory=list)
    blocks: list[tuple[int, int, tuple, int]] = field(default_factory=list)
    refs: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (token index, object_target)

    def add(self, ids, targets=None, weight=0.0, plain=None, answer=-1) -> int:
        at = len(self.ids)
        self.ids += ids
        self.targets += targets if targets is not None else [IGNORE] * len(ids)
        self.weight += [weight if targets is not None else 0.0] * len(ids)
        self.plain += [not self.image if plain is None else plain] * len(ids)
        self.answer += [answer if targets is not None else -1] * len(ids)
        return at

    def target(self, i: int, token: int, weight: float, answer: int) -> None:
        self.targets[i], self.weight[i], self.answer[i] = token, weight, answer


class Conversations:
    """Training text, rendered as the runtime renders a chat (the bundle's template): the first user turn's head
    (the picture, if any) once per row, then chats, each a segment that sees the head and itself, at the positions
    it has as a fresh chat: its questions, each after the earlier answers and turn separators.

    branches=True (pre-fusion): at run time a turn's answer enters the LLM plain as it is generated, but the next
    turn prefills it again as fused text. So the chat's tokens are all fused, and each answer is repeated after
    the chat as a plain branch that sees the head and the chat up to that answer, at the answer's positions; the
    loss is on the branch."""

    def __init__(self, tok, processor, n_image_tokens: int, branches: bool = False):
        self.tok, self.eos, self.branches = tok, tok.eos_token_id, branches
        self._ids: dict[str, list[int]] = {}  # the questions and answers recur: tokenize each once
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
                {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]
        text = processor.apply_chat_template(msgs, add_generation_prompt=True)
        head, between, after = text.split("Q", 2)[0], *text.split("Q", 2)[1:]
        tail, turn = between.split("A")
        self.head = tok.encode(head.replace("<image>", "<image>" * n_image_tokens))
        plain = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Q"}]}],
                                              add_generation_prompt=True)
        self.head_text = tok.encode(plain.split("Q")[0])  # a chat with no picture
        self.tail = tok.encode(tail)          # end of a question up to the answer
        self.turn = tok.encode(turn.split(self.tok.eos_token, 1)[1])  # after an answer's eos, up to the next question
        if tok.encode(after) != self.tail:
            raise ValueError("chat template is not regular across turns")

    def ids(self, text: str) -> list[int]:
        if text not in self._ids:
            if len(self._ids) > 200_000:
                self._ids.clear()
            self._ids[text] = self.tok.encode(text)
        return list(self._ids[text])

    def encode(self, chats: list[list[tuple]], image: bool = True) -> Row:
        """Chats of (question, answer[, ref_marks]) turns -> a Row. Each answer token, eos included, has weight
        1/len(answer + eos): every answer counts the same however long it is (a JSON one JSON_WEIGHT times). A mark whose text prefix does not
        tokenize as a prefix of the question is dropped (byte-level BPE on word boundaries keeps them all)."""
        row = Row(image)
        head = self.head if image else self.head_text
        row.add(head)
        row.blocks.append((0, len(head), (), 0))
        branch = self.branches and image
        k = 0
        for chat in chats:
            start, pending = len(row.ids), []
            for t, (q, a, *marks) in enumerate(chat):
                if t:
                    row.add(self.turn)
                qi = self.ids(q)
                for end, target in (marks[0] if marks else []):
                    pre = self.ids(q[:end])
                    if qi[: len(pre)] == pre:
                        row.refs.append((len(row.ids) + len(pre) - 1, target))
                row.add(qi + self.tail)
                ai = self.ids(a) + [self.eos]
                w = (JSON_WEIGHT if a.startswith("{") else 1.0) / len(ai)
                row.target(len(row.ids) - 1, ai[0], w, k)
                at = row.add(ai, None if branch else ai[1:] + [IGNORE], w, answer=k)
                if not branch:
                    row.target(at + len(ai) - 1, IGNORE, 0.0, -1)  # eos predicts nothing
                else:
                    pending.append((at, ai, w, k))
                k += 1
            row.blocks.append((start, len(row.ids) - start, ((0, len(head)),), len(head)))
            for at, ai, w, kk in pending:
                b = row.add(ai[:-1], ai[1:], w, plain=True, answer=kk)
                row.blocks.append((b, len(ai) - 1, ((0, len(head)), (start, at)), len(head) + at - start))
        return row


@dataclass
class Batch:
    pixels: torch.Tensor  # [rows with a picture, 3, H, W]
    has_image: torch.Tensor  # [B] bool
    ids: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T]: what each position's logits predict (IGNORE: nothing)
    weight: torch.Tensor  # [B, T]
    plain: torch.Tensor  # [B, T] bool
    answer: torch.Tensor  # [B, T]: answer index within the row, -1 none
    mask: torch.Tensor  # [B, 1, T, T] bool
    pos: torch.Tensor  # [B, T]


def collate(pixels: np.ndarray, rows: list[Row], pad_id: int) -> Batch:
    """Rows -> a Batch (pixels: of the rows with a picture, in order). Padding sees only itself (a row with
    nothing to attend to would be NaN)."""
    width = max(len(r.ids) for r in rows)
    b = len(rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    targets = torch.full((b, width), IGNORE, dtype=torch.long)
    weight = torch.zeros((b, width))
    plain = torch.ones((b, width), dtype=torch.bool)
    answer = torch.full((b, width), -1, dtype=torch.long)
    mask = torch.eye(width, dtype=torch.bool).repeat(b, 1, 1, 1)
    pos = torch.zeros((b, width), dtype=torch.long)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for r, row in enumerate(rows):
        n = len(row.ids)
        ids[r, :n], targets[r, :n] = torch.tensor(row.ids), torch.tensor(row.targets)
        weight[r, :n], plain[r, :n], answer[r, :n] = torch.tensor(row.weight), torch.tensor(row.plain), torch.tensor(row.answer)
        for start, length, sees, first in row.blocks:
            end = start + length
            mask[r, 0, start:end, start:end] = causal[:length, :length]
            for a, z in sees:
                mask[r, 0, start:end, a:z] = True
            pos[r, start:end] = torch.arange(first, first + length)
    has_image = torch.tensor([r.image for r in rows], dtype=torch.bool)
    return Batch(torch.from_numpy(pixels), has_image, ids, targets, weight, plain, answer, mask, pos)


# Extra questions per training scene. Left/right is the slowest thing to learn: a 44-minute run without
# these answered "right" to every left/right question (chance) while colour, shape and count were at ~0.9 and
# above/below (which the token order hints at) at 0.6, though a linear probe reads the column off the frozen
# tower's features perfectly. The extras are relational ("left or right of the ...", "above or below the ..."):
# the side-of-the-image form, a one-object lookup, is learnt early without them.
EXTRA = {"position": 3}
EXTRA_FORMS = ("x", "y")
CHAT_TURNS = {1: 0.1, 2: 0.25, 3: 0.3, 4: 0.25, 5: 0.1}  # questions per chat: mostly 2-4, some 1 and 5
JSON_SHARE = 0.35  # share of shapes rows with a JSON question (structured output's demo: shapes.JSON_QUESTIONS)
JSON_WEIGHT = 3.0  # a JSON answer counts as this many plain ones: its few free tokens sit among forced ones
OFF_TOPIC = 0.3  # share of shapes rows with one question from outside the world's wordings (-> SENTENCE)
LARGE = 0.1  # share of shapes pictures drawn larger and brought down to 128 px as the runtime does
OUTWORLD_ROWS, TEXT_ROWS = 3 / 16, 1 / 16  # rows of a language step: out-of-world pictures, no picture
OUTWORLD_TURNS = 6  # questions per out-of-world row
VISION_OUTWORLD = 0.25  # share of out-of-world pictures in the tower stage


def split_chats(turns: list, rng: np.random.Generator) -> list[list]:
    """Cut a row's questions into chats of CHAT_TURNS lengths, in order."""
    sizes, p = list(CHAT_TURNS), np.array(list(CHAT_TURNS.values()))
    out, at = [], 0
    while at < len(turns):
        k = sizes[int(rng.choice(len(sizes), p=p / p.sum()))]
        out.append(turns[at: at + k])
        at += k
    return out


class Stream:
    """Training data of the (seed, "train") streams: shapes scenes, out-of-world pictures, chats."""

    def __init__(self, conv: Conversations, seed: int):
        self.conv, self.seed, self.index, self.out_index = conv, seed, 0, 0

    def scenes(self, n: int):
        out = []
        for _ in range(n):
            rng = np.random.default_rng([self.seed, self.index, 7])
            size = int(rng.integers(IMAGE_SIZE + 1, 3 * IMAGE_SIZE)) if rng.random() < LARGE else IMAGE_SIZE
            out.append((shapes.make_example(self.seed, self.index, split="train", size=size), rng))
            self.index += 1
        return out

    def outworld(self, n: int):
        out = [(outworld.make_image(self.seed, self.out_index + i, "train"),
                np.random.default_rng([self.seed, self.out_index + i, 8])) for i in range(n)]
        self.out_index += n
        return out

    def vision_batch(self, n: int):
        """-> pixels [n, 3, H, W], cell targets [n, cells, 5] (IGNORE for out-of-world pictures), world [n]
        (1: a shapes scene)."""
        k = int(round(n * VISION_OUTWORLD))
        exs = self.scenes(n - k)
        images = [ex.image for ex, _ in exs] + [im for im, _ in self.outworld(k)]
        targets = [cell_targets(ex.scene) for ex, _ in exs] + [cell_targets(None)] * k
        return (torch.from_numpy(np.stack([pixels_of(im) for im in images])), torch.from_numpy(np.stack(targets)),
                torch.tensor([1] * (n - k) + [0] * k))

    def shapes_row(self, ex, rng, per_scene: int) -> Row:
        specs = [ex.spec] + shapes.scene_specs(ex.scene, rng, per_scene - 1)
        for qtype, k in EXTRA.items():  # the hard types, asked again in other forms
            specs += [q for _ in range(k)
                      for q in shapes.scene_specs(ex.scene, rng, 1, qtypes=(qtype,), forms=EXTRA_FORMS)]
        turns = [(text, shapes.answer(ex.scene, q), ref_marks(ex.scene, q, text))
                 for q in specs for text in [shapes.question_text(q)]]
        order = rng.permutation(len(turns))
        turns = [turns[i] for i in order]
        if rng.random() < JSON_SHARE:
            q = shapes.JSON_QUESTIONS[int(rng.integers(len(shapes.JSON_QUESTIONS)))]
            turns.insert(int(rng.integers(len(turns) + 1)), (q, shapes.json_answer(ex.scene), []))
        if rng.random() < OFF_TOPIC:
            turns.insert(int(rng.integers(len(turns) + 1)), (outworld.generic_question(rng), outworld.SENTENCE, []))
        return self.conv.encode(split_chats(turns, rng))

    def outworld_row(self, rng, image: bool) -> Row:
        turns = [(outworld.question(rng), outworld.SENTENCE) for _ in range(OUTWORLD_TURNS)]
        return self.conv.encode(split_chats(turns, rng), image=image)

    def text_batch(self, n: int, per_scene: int, n_out: int | None = None, n_text: int | None = None):
        """-> a Batch of n rows (shapes scenes, then out-of-world pictures, then rows with no picture), the cell
        targets of each row with a picture, and the references (row, token index, object_target) as tensors:
        where a question names an object."""
        n_out = int(round(n * OUTWORLD_ROWS)) if n_out is None else n_out
        n_text = int(round(n * TEXT_ROWS)) if n_text is None else n_text
        exs = self.scenes(n - n_out - n_text)
        outs = self.outworld(n_out)
        rows = [self.shapes_row(ex, rng, per_scene) for ex, rng in exs]
        rows += [self.outworld_row(rng, image=True) for _, rng in outs]
        for _ in range(n_text):
            rows.append(self.outworld_row(np.random.default_rng([self.seed, self.out_index, 9]), image=False))
            self.out_index += 1
        refs = [(r, i, t) for r, row in enumerate(rows) for i, t in row.refs]
        images = [ex.image for ex, _ in exs] + [im for im, _ in outs]
        batch = collate(np.stack([pixels_of(im) for im in images]), rows, self.conv.tok.pad_token_id)
        cells = [cell_targets(ex.scene) for ex, _ in exs] + [cell_targets(None)] * n_out
        rows_, index, targets = zip(*refs) if refs else ((), (), ())
        ref = (torch.tensor(rows_, dtype=torch.long), torch.tensor(index, dtype=torch.long),
               torch.from_numpy(np.stack(targets)) if targets else torch.zeros((0, len(CELL_HEADS)), dtype=torch.long))
        return batch, torch.from_numpy(np.stack(cells)), ref

"""The demo's training data: cell targets for the tower stage, packed conversations for the language stage.

    stream = Stream(Conversations(tok, processor, n_image_tokens), seed)
    pixels, targets = stream.vision_batch(32)
    pixels, ids, weight, mask, pos, targets, (rows, index, ref_targets) = stream.text_batch(16, 6)

Used by export/dev/train_demo.py (the training loop; the model is export/dev/demo_model.py); see its docstring for why
questions are packed this way and what the reference marks are for.
"""

from __future__ import annotations

import numpy as np
import torch

from edgevlm.data import shapes

IMAGE_SIZE = 128  # FastViT downsamples 32x: 4 x 4 = 16 image tokens
GRID = IMAGE_SIZE // 32
CELL_HEADS = {"color": 1 + len(shapes.COLORS), "shape": 1 + len(shapes.SHAPES), "size": 1 + len(shapes.SIZES),
              "row": GRID, "col": GRID}  # 0 = empty cell for the first three


def object_target(o: shapes.Obj) -> np.ndarray:
    """[5] class ids of one object for the CELL_HEADS: colour, shape, size (from 1), row, column of its cell."""
    row, col = min(int(o.cy * GRID), GRID - 1), min(int(o.cx * GRID), GRID - 1)
    return np.array([1 + list(shapes.COLORS).index(o.color), 1 + shapes.SHAPES.index(o.shape),
                     1 + list(shapes.SIZES).index(o.size), row, col], np.int64)


def cell_targets(scene) -> np.ndarray:
    """[GRID*GRID, 5] class ids per cell of the tower's output grid (row-major): colour, shape and size of
    the object there (0 = none), and the cell's row and column."""
    t = np.zeros((GRID * GRID, len(CELL_HEADS)), np.int64)
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


def pixels_of(image) -> np.ndarray:  # what the processor makes of a 128 px image: [3, H, W] in 0..1
    return np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0


class Conversations:
    """Training text: one conversation per scene, the image in the first turn and several questions about
    it, each answered, so the image tokens are paid for once per scene rather than once per question."""

    def __init__(self, tok, processor, n_image_tokens: int):
        self.tok, self.eos = tok, tok.eos_token_id
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
                {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]
        text = processor.apply_chat_template(msgs, add_generation_prompt=True)
        head, between, after = text.split("Q", 2)[0], *text.split("Q", 2)[1:]
        tail, turn = between.split("A")
        self.head = tok.encode(head.replace("<image>", "<image>" * n_image_tokens))
        self.tail = tok.encode(tail)          # end of a question up to the answer
        self.turn = tok.encode(turn.split(self.tok.eos_token, 1)[1])  # after an answer's eos, up to the next question
        self.after = tok.encode(after)        # == tail: the template is regular
        if self.after != self.tail:
            raise ValueError("chat template is not regular across turns")

    def encode(self, qa: list[tuple[str, str]]) -> tuple[list[int], list[float], list[int]]:
        return self.encode_marked([(q, a, []) for q, a in qa])[0]

    def encode_marked(self, qa: list[tuple[str, str, list]]):
        """`encode` of (question, answer, ref_marks) triples -> ((ids, weights, segments), [(token index of
        each mark's last phrase token, its target)]). A mark whose text prefix does not tokenize as a prefix of
        the question is dropped (byte-level BPE on word boundaries keeps them all)."""
        """-> (token ids, weight per position, segment lengths): the first turn's head (image included) once,
        then each question + answer as its own segment. `collate` lets a segment see the head and itself only,
        at the positions it would have as the one question of a fresh chat: every question is trained exactly
        as it is asked at run time, and no answer can be read off an earlier one (a description lists the
        objects left to right, which would answer a left/right question). Weight 1/len(answer tokens) on each
        answer token incl. eos, so every answer counts the same however long it is; 0 on the prompt."""
        ids, w, segs, refs = list(self.head), [0.0] * len(self.head), [], []
        for q, a, marks in qa:
            qi = self.tok.encode(q)
            for end, target in marks:
                pre = self.tok.encode(q[:end])
                if qi[: len(pre)] == pre:
                    refs.append((len(ids) + len(pre) - 1, target))
            p = qi + self.tail
            t = self.tok.encode(a) + [self.eos]
            ids += p + t
            w += [0.0] * len(p) + [1.0 / len(t)] * len(t)
            segs.append(len(p) + len(t))
        return (ids, w, segs), refs


def collate(pixels: np.ndarray, seqs: list[tuple[list[int], list[float], list[int]]], pad_id: int):
    """-> pixels, ids, weight, a boolean attention mask [B, 1, T, T] and position ids [B, T]: the head is causal,
    each segment sees the head and its own earlier tokens, at positions that continue the head's; padding sees
    only itself (a row with nothing to attend to would be NaN)."""
    width = max(len(ids) for ids, _, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    weight = torch.zeros((len(seqs), width))
    mask = torch.eye(width, dtype=torch.bool).repeat(len(seqs), 1, 1, 1)
    pos = torch.zeros((len(seqs), width), dtype=torch.long)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for r, (s, w, segs) in enumerate(seqs):
        ids[r, : len(s)], weight[r, : len(s)] = torch.tensor(s), torch.tensor(w)
        head = len(s) - sum(segs)
        mask[r, 0, :head, :head] = causal[:head, :head]
        pos[r, :head] = torch.arange(head)
        at = head
        for n in segs:
            mask[r, 0, at: at + n, :head] = True
            mask[r, 0, at: at + n, at: at + n] = causal[:n, :n]
            pos[r, at: at + n] = torch.arange(head, head + n)
            at += n
    return torch.from_numpy(pixels), ids, weight, mask, pos


# Extra questions per training conversation. Left/right is the slowest thing to learn: a 44-minute run without
# these answered "right" to every left/right question (chance) while colour, shape and count were at ~0.9 and
# above/below (which the token order hints at) at 0.6, though a linear probe reads the column off the frozen
# tower's features perfectly. The extras are relational ("left or right of the ...", "above or below the ..."):
# the side-of-the-image form, a one-object lookup, is learnt early without them.
EXTRA = {"position": 3}
EXTRA_FORMS = ("x", "y")


class Stream:
    """Training scenes of the (seed, "train") stream: images, cell targets and conversations."""

    def __init__(self, conv: Conversations, seed: int):
        self.conv, self.seed, self.index = conv, seed, 0

    def scenes(self, n: int):
        out = []
        for _ in range(n):
            ex = shapes.make_example(self.seed, self.index, split="train", size=IMAGE_SIZE)
            out.append((ex, np.random.default_rng([self.seed, self.index, 7])))
            self.index += 1
        return out

    def vision_batch(self, n: int):
        exs = self.scenes(n)
        return (torch.from_numpy(np.stack([pixels_of(ex.image) for ex, _ in exs])),
                torch.from_numpy(np.stack([cell_targets(ex.scene) for ex, _ in exs])))

    def text_batch(self, n: int, per_scene: int):
        """-> pixels, ids, weight, mask, positions (see `collate`), the cell targets of each scene, and the
        references (row, token index, object_target), each a tensor: where a question names an object."""
        exs = self.scenes(n)
        seqs, refs = [], []
        for r, (ex, rng) in enumerate(exs):
            specs = [ex.spec] + shapes.scene_specs(ex.scene, rng, per_scene - 1)
            for qtype, k in EXTRA.items():  # the hard types, asked again in other forms
                specs += [q for _ in range(k)
                          for q in shapes.scene_specs(ex.scene, rng, 1, qtypes=(qtype,), forms=EXTRA_FORMS)]
            qa = [(text, shapes.answer(ex.scene, q), ref_marks(ex.scene, q, text))
                  for q in specs for text in [shapes.question_text(q)]]
            seq, marks = self.conv.encode_marked(qa)
            seqs.append(seq)
            refs += [(r, i, t) for i, t in marks]
        batch = collate(np.stack([pixels_of(ex.image) for ex, _ in exs]), seqs, self.conv.tok.pad_token_id)
        rows, index, targets = zip(*refs) if refs else ((), (), ())
        ref = (torch.tensor(rows, dtype=torch.long), torch.tensor(index, dtype=torch.long),
               torch.from_numpy(np.stack(targets)) if targets else torch.zeros((0, len(CELL_HEADS)), dtype=torch.long))
        return *batch, torch.from_numpy(np.stack([cell_targets(ex.scene) for ex, _ in exs])), ref

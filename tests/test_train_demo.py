"""The demo's training recipe: packed chats train exactly what edgevlm's Chat asks at run time (the rendered
multi-turn prompt, previous answers in context; for pre-fusion, earlier answers fused and the current one
plain), and the one command runs end to end (a few steps) into a checkpoint the exporter turns into a working
bundle."""

import json

import numpy as np
import pytest
import torch

from edgevlm.data import chats, outworld, shapes
from edgevlm.export.dev import train_demo as td
from edgevlm.export.dev.demo_data import IGNORE, Conversations, Stream, collate, ref_marks


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    tok = td.build_tokenizer()
    proc = td.build_processor(tok)
    model = td.build_model(tok, td.text_config(2, 64)).eval()
    return tok, proc, model


def some_chats(seed: int, n: int, turns=(3, 2, 1, 4)):
    return [[(t.question, t.answer) for t in chats.shapes_chat(seed, i, turns[i % len(turns)]).turns] for i in range(n)]


def rendered(proc, tok, chat, image: bool, n_image: int):
    """Token ids of the chat as the bundle's template renders it (what the runtime tokenizes), to the last eos."""
    msgs = []
    for k, (q, a) in enumerate(chat):
        content = ([{"type": "image"}] if image and k == 0 else []) + [{"type": "text", "text": q}]
        msgs += [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    return tok.encode(proc.apply_chat_template(msgs).replace("<image>", "<image>" * n_image).rstrip("\n"))


@pytest.mark.parametrize("image", [True, False])
def test_chat_rows_are_the_rendered_chat(parts, image):
    tok, proc, _ = parts
    conv = Conversations(tok, proc, 16)
    chat = some_chats(3, 1, (4,))[0] + [("What is this?", outworld.SENTENCE)]
    row = conv.encode([chat], image=image)
    assert row.ids == rendered(proc, tok, chat, image, 16)
    # the targets: every answer token and its eos, each answer weighing 1 in all
    answers = [tok.encode(a) + [tok.eos_token_id] for _, a in chat]
    got = [t for t, w in zip(row.targets, row.weight) if w > 0]
    assert got == [x for a in answers for x in a]
    assert abs(sum(row.weight) - len(chat)) < 1e-6 and max(row.answer) == len(chat) - 1


def test_packed_chats_match_each_chat_alone(parts):
    """A row of several multi-turn chats gives, on every answer token, the logits of each chat run alone as one
    plain causal sequence (the runtime's prompt + answers), and the packing is not a no-op."""
    tok, proc, model = parts
    conv = Conversations(tok, proc, td.GRID * td.GRID)
    cs = some_chats(5, 3)
    ex = chats.shapes_chat(5, 0)
    rows = [conv.encode(cs)] + [conv.encode([c]) for c in cs]
    pix = np.stack([td.pixels_of(ex.image)] * len(rows))
    b = collate(pix, rows, tok.pad_token_id)
    run = td.standard_logits(model, model.model.vision_tower, model.config.image_token_id)
    with torch.no_grad():
        sel = b.weight > 0
        logits = run(b)[0](sel)
        rows_of = sel.nonzero()[:, 0]
        packed, single = logits[rows_of == 0], logits[rows_of > 0]
        # plain causal: each lone chat with a lower-triangular mask and positions 0..n-1
        causal = torch.ones_like(b.mask[0, 0]).tril().expand_as(b.mask).clone()
        b2 = td.Batch(b.pixels, b.has_image, b.ids, b.targets, b.weight, b.plain, b.answer, causal,
                      torch.arange(b.ids.shape[1]).expand_as(b.ids))
        plain = run(b2)[0](sel)
    assert packed.shape == single.shape and packed.shape[0] >= 12
    diff = (packed - single).abs().max().item()
    diff_causal = (plain[rows_of > 0] - single).abs().max().item()
    print(f"packed vs alone maxdiff = {diff:.2e}; alone vs plain causal maxdiff = {diff_causal:.2e}")
    assert diff < 1e-4 and diff_causal < 1e-4
    assert (plain[rows_of == 0] - single).abs().max().item() > 1e-3  # causal packing would let chats see each other


def test_rows_without_a_picture_take_no_image_rows(parts):
    """Rows with no picture mixed into a batch: the image tokens go to the rows that have a picture, in order."""
    tok, proc, model = parts
    conv = Conversations(tok, proc, td.GRID * td.GRID)
    c = some_chats(7, 2)
    exs = [chats.shapes_chat(7, i) for i in range(2)]
    rows = [conv.encode([c[0]]), conv.encode([c[0]], image=False), conv.encode([c[1]])]
    b = collate(np.stack([td.pixels_of(e.image) for e in exs]), rows, tok.pad_token_id)
    single = collate(np.stack([td.pixels_of(exs[1].image)]), [rows[2]], tok.pad_token_id)
    run = td.standard_logits(model, model.model.vision_tower, model.config.image_token_id)
    with torch.no_grad():
        mixed = run(b)[0](b.weight > 0)[(b.weight > 0).nonzero()[:, 0] == 2]
        alone = run(single)[0](single.weight > 0)
    assert (mixed - alone).abs().max().item() < 1e-4


def runtime_mini_logits(mini, image_id, pixels, ids, answer_starts, answer_ends):
    """What the runtime computes for turn t of a pre-fusion chat: the prompt (earlier answers included) fused, the
    answer so far plain; -> logits predicting each answer token and its eos, turn by turn."""
    feats = mini.image_embeds(pixels)
    out = []
    for a, z in zip(answer_starts, answer_ends):
        x_ids = ids[:, :z]
        mask = torch.ones_like(x_ids)
        prompt = torch.arange(z)[None] < a
        x = mini.llm_embeds(feats, x_ids, mask, prompt, image_id)
        out.append(mini.logits(x, mask)[0, a - 1: z])
    return torch.cat(out)


def test_mini_branches_train_what_the_runtime_computes(parts):
    from edgevlm.export.llava_mini import MiniVLM

    tok, _, model = parts
    torch.manual_seed(1)
    mini = MiniVLM(model, fusion_layers=1, grid=td.GRID).eval()
    torch.nn.init.normal_(mini.fuse_out.weight, std=0.2)  # starts at zero: make pre-fusion matter
    conv = Conversations(tok, td.build_processor(tok, patch=td.IMAGE_SIZE), 1, branches=True)
    cs = some_chats(6, 3)
    ex = chats.shapes_chat(6, 0)
    pix = np.stack([td.pixels_of(ex.image)] * 2)
    b = collate(pix, [conv.encode(cs), conv.encode([cs[0]])], tok.pad_token_id)
    image_id = model.config.image_token_id
    run = td.mini_logits(mini, model.model.vision_tower, image_id)
    flat = Conversations(tok, td.build_processor(tok, patch=td.IMAGE_SIZE), 1).encode([cs[0]])  # no branches
    ids = torch.tensor([flat.ids])
    starts = [i + 1 for i, w in enumerate(flat.weight) if w > 0 and (i == 0 or flat.answer[i - 1] != flat.answer[i])]
    ends = [i + 1 for i, w in enumerate(flat.weight) if w > 0 and (i + 1 == len(flat.ids) or flat.answer[i + 1] != flat.answer[i])]
    with torch.no_grad():
        sel = b.weight > 0
        logits = run(b)[0](sel)
        rows_of = sel.nonzero()[:, 0]
        # the packed row's first chat and the lone chat, target by target in the order (answer, token)
        def ordered(r):
            idx = sel[r].nonzero()[:, 0]
            key = [(int(b.answer[r, i]), int(b.pos[r, i])) for i in idx]
            return logits[rows_of == r][sorted(range(len(key)), key=key.__getitem__)]
        lone = ordered(1)
        packed = ordered(0)[: len(lone)]
        ref = runtime_mini_logits(mini, image_id, torch.from_numpy(pix[:1]), ids, starts, ends)
    d_pack, d_ref = (packed - lone).abs().max().item(), (lone - ref).abs().max().item()
    print(f"mini packed vs alone maxdiff = {d_pack:.2e}; vs the runtime's turn-by-turn computation = {d_ref:.2e}")
    assert lone.shape == ref.shape and lone.shape[0] >= 6
    assert d_pack < 1e-4 and d_ref < 1e-4


def test_recipe_runs_and_exports(tmp_path):
    out = tmp_path / "ckpt"
    summary = td.train(out, minutes=None, vision_steps=2, scenes=4, per_scene=2, threads=1, max_steps=3,
                       text=td.text_config(2, 64), aux=0.1, bf16=True, log=lambda s: None)
    assert summary["language"]["steps"] == 3 and summary["vision"]["steps"] == 2
    val = summary["val_teacher_forced"]
    assert set(val) >= set(shapes.QTYPES) | {"turn1", "turn2", "turn3", "outworld", "no_image"}
    saved = json.loads((out / "training.json").read_text())
    assert saved["variant"] == "standard" and (out / "model.safetensors").exists()
    from edgevlm.export.exporter import export
    import edgevlm

    export(out, tmp_path / "bundle")
    vlm = edgevlm.load(tmp_path / "bundle")
    ex = shapes.make_example(1, 0)
    rs = list(vlm.stream(ex.image, ex.question, max_tokens=4))
    assert rs[-1].finish_reason and len(rs) <= 4 and all(0 <= r.token < vlm.manifest.vocab_size for r in rs)
    # the runtime's multi-turn prompt is the training row's text, token for token
    from edgevlm.export.dev.demo_model import build_processor
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    conv = Conversations(tok, build_processor(tok), td.GRID * td.GRID)
    chat = [("What color is the star?", "blue"), ("How many objects are there?", "3"), ("Is there a red circle?", "no")]
    msgs = []
    for k, (q, a) in enumerate(chat):
        msgs.append({"role": "user", "content": ([{"type": "image"}] if k == 0 else []) + [{"type": "text", "text": q}]})
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    runtime = vlm.prompt_ids(msgs[:-1], None, 1).tolist()
    row = conv.encode([chat])
    assert row.ids[: len(runtime)] == runtime and row.targets[len(runtime) - 1] == tok.encode("no")[0]


def test_stream_mixes_shapes_outworld_and_no_picture(parts):
    tok, proc, _ = parts
    conv = Conversations(tok, proc, td.GRID * td.GRID)
    b, cells, (rows, index, targets) = Stream(conv, seed=2).text_batch(16, 6)
    assert b.has_image.tolist() == [True] * 15 + [False] and b.pixels.shape[0] == 15
    assert (cells[12:15] == IGNORE).all() and (cells[:12] != IGNORE).all()  # out-of-world pictures: no cell targets
    sentence = tok.encode(outworld.SENTENCE)
    for r in range(12, 16):  # every answer of the out-of-world and no-picture rows is the sentence
        t = [int(x) for x, w in zip(b.targets[r], b.weight[r]) if w > 0]
        assert t == (sentence + [tok.eos_token_id]) * (len(t) // (len(sentence) + 1)) and len(t) >= len(sentence) + 1
    # several questions per scene, most chats of 2-5 of them: fewer chats (segments) than answers
    stream = Stream(conv, seed=2)
    rows = [stream.shapes_row(ex, rng, 6) for ex, rng in stream.scenes(12)]
    answers, segments = sum(max(r.answer) + 1 for r in rows), sum(len(r.blocks) - 1 for r in rows)
    assert min(max(r.answer) + 1 for r in rows) >= 4 and answers >= 2.5 * segments
    pixels, world_cells, world = Stream(conv, seed=2).vision_batch(32)
    assert world.tolist() == [1] * 24 + [0] * 8 and (world_cells[24:] == IGNORE).all()


def test_reference_marks_point_at_the_named_object(parts):
    """The reference probe's targets: for every question that names objects, the marked token is the last token
    of the noun phrase, and the target is the object that phrase names (its attributes and its cell)."""
    tok, proc, _ = parts
    conv = Conversations(tok, proc, td.GRID * td.GRID)
    b, cells, (rows, index, targets) = Stream(conv, seed=3).text_batch(8, 6, n_out=0, n_text=0)
    assert len(rows) >= 16  # several named objects per scene
    for r, i, t in zip(rows.tolist(), index.tolist(), targets.numpy()):
        word = tok.decode(b.ids[r, i]).strip()
        assert word in shapes.SHAPES or word == "object", word
        assert word == "object" or shapes.SHAPES[t[1] - 1] == word
        assert any((cells[r].numpy() == t).all(axis=1))  # the object is in the scene, in the cell it names
        assert not b.weight[r, i] and b.mask[r, 0, i, : 16 + 2].any()  # a prompt token, one that sees the image
    # two-object questions get two marks, in the order the phrases are written
    scene = next(ex.scene for ex in shapes.examples(0, 50, split="train") if len(ex.scene.objects) >= 2)
    a, c = (shapes.Ref(shape=o.shape, color=o.color, size=o.size) for o in scene.objects[:2])
    q = shapes.Question("position", a, c, "x")
    text = shapes.question_text(q)
    marks = ref_marks(scene, q, text)
    assert [m[0] for m in marks] == [text.index(a.phrase()) + len(a.phrase()), text.rindex(c.phrase()) + len(c.phrase())]
    assert not (marks[0][1] == marks[1][1]).all()
    assert ref_marks(scene, shapes.Question("count"), "How many objects are there?") == []

"""The demo's training recipe: packed questions train exactly what a single question asks at run time, and the
one command runs end to end (a few steps) into a checkpoint the exporter turns into a working bundle."""

import json

import numpy as np
import pytest
import torch

from edgevlm.data import shapes
from edgevlm.export.dev import train_demo as td


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    tok = td.build_tokenizer()
    proc = td.build_processor(tok)
    model = td.build_model(tok, td.text_config(2, 64)).eval()
    return tok, proc, model


def test_packed_segments_match_single_questions(parts):
    tok, proc, model = parts
    conv = td.Conversations(tok, proc, td.GRID * td.GRID)
    exs = list(shapes.examples(5, 4, split="eval"))
    qa = [(e.question, e.answer) for e in exs]
    # the same image for all four questions: packed in one row vs each alone in its own row
    pix = np.stack([td.pixels_of(exs[0].image)] * 5)
    batch = td.collate(pix, [conv.encode(qa)] + [conv.encode([x]) for x in qa], tok.pad_token_id)
    _, ids, weight, mask, pos = batch
    run = td.standard_logits(model, model.model.vision_tower, model.config.image_token_id)
    with torch.no_grad():
        fn = run(batch[0], ids, mask, pos, weight)[0]
        sel = weight[:, 1:] > 0
        logits = fn(sel)
    rows = sel.nonzero()[:, 0]
    packed, alone = logits[rows == 0], logits[rows > 0]
    assert packed.shape == alone.shape and packed.shape[0] >= 8
    diff = (packed - alone).abs().max().item()
    print("packed vs alone max |diff|", diff)
    assert diff < 1e-4
    # and the packing is not a no-op: without the block mask the later questions see the earlier ones
    causal = torch.ones_like(mask[0, 0]).tril().expand_as(mask).clone()
    with torch.no_grad():
        fn2 = run(batch[0], ids, causal, torch.arange(ids.shape[1]).expand_as(ids), weight)[0]
        plain = fn2(sel)[rows == 0]
    assert (plain - alone).abs().max().item() > 1e-3


def test_recipe_runs_and_exports(tmp_path):
    out = tmp_path / "ckpt"
    summary = td.train(out, minutes=None, vision_steps=2, scenes=2, per_scene=2, threads=1, max_steps=3,
                       text=td.text_config(2, 64), aux=0.1, bf16=True, log=lambda s: None)
    assert summary["language"]["steps"] == 3 and summary["vision"]["steps"] == 2
    assert set(summary["val_teacher_forced"]["per_type"]) >= set(shapes.QTYPES)
    saved = json.loads((out / "training.json").read_text())
    assert saved["variant"] == "standard" and (out / "model.safetensors").exists()
    from edgevlm.export.exporter import export
    import edgevlm

    export(out, tmp_path / "bundle")
    vlm = edgevlm.load(tmp_path / "bundle")
    ex = shapes.make_example(1, 0)
    rs = list(vlm.stream(ex.image, ex.question, max_tokens=4))
    assert rs[-1].finish_reason and len(rs) <= 4 and all(0 <= r.token < vlm.manifest.vocab_size for r in rs)


def test_mini_packed_segments_match_single_questions(parts):
    from edgevlm.export.llava_mini import MiniVLM

    tok, _, model = parts
    torch.manual_seed(1)
    mini = MiniVLM(model, fusion_layers=1, grid=td.GRID).eval()
    torch.nn.init.normal_(mini.fuse_out.weight, std=0.2)  # starts at zero: make pre-fusion matter
    conv = td.Conversations(tok, td.build_processor(tok, patch=td.IMAGE_SIZE), 1)
    exs = list(shapes.examples(6, 3, split="eval"))
    qa = [(e.question, e.answer) for e in exs]
    pix = np.stack([td.pixels_of(exs[0].image)] * 4)
    pixels, ids, weight, mask, pos = td.collate(pix, [conv.encode(qa)] + [conv.encode([x]) for x in qa],
                                                tok.pad_token_id)
    run = td.mini_logits(mini, model.model.vision_tower, model.config.image_token_id)
    with torch.no_grad():
        fn = run(pixels, ids, mask, pos, weight)[0]
        sel = weight[:, 1:] > 0
        logits = fn(sel)
        rows = sel.nonzero()[:, 0]
        diff = (logits[rows == 0] - logits[rows > 0]).abs().max().item()
        # the single-question rows through the plain 2-D mask path (what export parity checks) agree too
        single = td.collate(pix[:1], [conv.encode(qa[:1])], tok.pad_token_id)
        x = mini.llm_embeds(mini.image_embeds(single[0]), single[1], torch.ones_like(single[1]), single[2] == 0,
                            model.config.image_token_id)
        plain = mini.logits(x, torch.ones_like(single[1]))[0, :-1][single[2][0, 1:] > 0]
        ref = fn(sel)[rows == 1]
    print("mini packed vs alone", diff, "4-D vs 2-D path", (plain - ref).abs().max().item())
    assert diff < 1e-4
    assert (plain - ref).abs().max().item() < 1e-4


def test_reference_marks_point_at_the_named_object(parts):
    """The reference probe's targets: for every question that names objects, the marked token is the last token
    of the noun phrase, and the target is the object that phrase names (its attributes and its cell)."""
    from edgevlm.export.dev.demo_data import Stream, ref_marks

    tok, proc, _ = parts
    conv = td.Conversations(tok, proc, td.GRID * td.GRID)
    stream = Stream(conv, seed=3)
    pixels, ids, weight, mask, pos, cells, (rows, index, targets) = stream.text_batch(8, 6)
    assert len(rows) >= 16  # several named objects per scene
    for r, i, t in zip(rows.tolist(), index.tolist(), targets.numpy()):
        word = tok.decode(ids[r, i]).strip()
        assert word in shapes.SHAPES or word == "object", word
        assert word == "object" or shapes.SHAPES[t[1] - 1] == word
        assert any((cells[r].numpy() == t).all(axis=1))  # the object is in the scene, in the cell it names
        assert not weight[r, i] and mask[r, 0, i, : 16 + 2].any()  # a prompt token, one that sees the image
    # two-object questions get two marks, in the order the phrases are written
    scene = next(ex.scene for ex in shapes.examples(0, 50, split="train") if len(ex.scene.objects) >= 2)
    a, b = (shapes.Ref(shape=o.shape, color=o.color, size=o.size) for o in scene.objects[:2])
    q = shapes.Question("position", a, b, "x")
    text = shapes.question_text(q)
    marks = ref_marks(scene, q, text)
    assert [m[0] for m in marks] == [text.index(a.phrase()) + len(a.phrase()), text.rindex(b.phrase()) + len(b.phrase())]
    assert not (marks[0][1] == marks[1][1]).all()
    assert ref_marks(scene, shapes.Question("count"), "How many objects are there?") == []

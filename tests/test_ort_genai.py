"""onnxruntime-genai runs converted bundles (`edgevlm export --format ort-genai`, docs/native-apps.md): loaded
by its own API, with the app's part done as the guide says — pixels from the guide's numpy reference, the prompt
from onnxruntime-genai's tokenizer and chat template — greedy answers are edgevlm's, token for token."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import scene

import edgevlm
from edgevlm import template, tiling
from edgevlm.data import shapes
from edgevlm.errors import ExportError
from edgevlm.image import load_image, preprocess, resize

PIN = "0.18.0"  # the tested onnxruntime-genai (the `ort-genai` extra)
ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "edgevlm" / "assets"
THREADS = json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": 1,
                                                                 "inter_op_num_threads": 1}}}})
FAMILIES = ["fastvlm-qwen2-gqa", "llava-clip-llama", "llava-siglip-qwen2", "mobilevlm-v1", "smolvlm-llama"]


@pytest.fixture(scope="module")
def og():
    try:
        import onnxruntime_genai
    except ImportError as e:
        pytest.fail(f"onnxruntime-genai is not installed ({e}): pip install 'edgevlm[ort-genai]' "
                    f"(onnxruntime-genai=={PIN})")
    found = onnxruntime_genai.__version__
    assert found == PIN, f"these tests pin onnxruntime-genai {PIN}, found {found}"
    return onnxruntime_genai


def _guide_block(first_line: str) -> str:
    text = (ROOT / "docs" / "native-apps.md").read_text(encoding="utf-8")
    return re.search(r"```python\n(" + re.escape(first_line) + r".*?)```", text, re.S).group(1)


@pytest.fixture(scope="module")
def ref():
    """The numpy reference implementation of docs/native-apps.md, run as written there."""
    namespace: dict = {}
    exec(compile(_guide_block("# reference: preprocessing\n"), "docs/native-apps.md", "exec"), namespace)
    return namespace


def convert(bundle, out) -> Path:
    from edgevlm.export.ort_genai import convert as write

    write(bundle, out)
    return Path(out)


class App:
    """What a native app does (docs/native-apps.md, "What the app does"), through onnxruntime-genai's API."""

    def __init__(self, og, path: Path, ref: dict):
        config = og.Config(str(path))
        config.overlay(THREADS)
        self.og, self.ref, self.model = og, ref, og.Model(config)
        self.tok = og.Tokenizer(self.model)
        self.spec = json.loads((path / "preprocessing.json").read_text(encoding="utf-8"))
        self.alive: list[dict] = []  # model inputs: the generator reads them when the prompt runs
        self.own = None
        if not self.spec["tokenizer"]["ort_extensions_exact"]:  # the contract: encode with `tokenizers` then
            from tokenizers import Tokenizer

            self.own = Tokenizer.from_file(str(path / "tokenizer.json"))

    def pixels(self, rgb) -> tuple[np.ndarray, str]:
        if self.spec["tiling"]:
            px, rows, cols = self.ref["split_tiles"](rgb, self.spec["preprocess"], self.spec["tiling"])
            return px, f"{rows}x{cols}"
        return self.ref["preprocess"](rgb, self.spec["preprocess"]), "0x0"

    def prompt_ids(self, messages: list[dict], grids: list[str]) -> np.ndarray:
        p = self.spec["prompt"]
        parts = self.tok.apply_chat_template(json.dumps(messages), add_generation_prompt=True).split(p["image_marker"])
        assert len(parts) == len(grids) + 1
        fills = ["".join(s.get("text", p["image_token"] * s.get("image_tokens", 0)) for s in p["placeholders"][g])
                 for g in grids]
        text = parts[0] + "".join(f + rest for f, rest in zip(fills, parts[1:]))
        ids = (np.asarray(self.own.encode(text, add_special_tokens=False).ids, np.int32) if self.own
               else self.tok.encode(text))
        return ids if p["prepend_token_id"] is None else np.r_[np.int32(p["prepend_token_id"]), ids].astype(np.int32)

    def generator(self, ids: np.ndarray, pixels: list[np.ndarray], max_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length)
        gen = self.og.Generator(self.model, params)
        if pixels:
            px = np.ascontiguousarray(np.concatenate(pixels), np.float32)
            count = int((ids == self.spec["prompt"]["image_token_id"]).sum())
            inputs = {"pixel_values": px, "image_sizes": np.array([px.shape[2:]] * len(px), np.int64),
                      "num_image_tokens": np.array([count], np.int64)}
            self.alive.append(inputs)
            for name, value in inputs.items():
                gen.set_model_input(name, value)
        return gen

    @staticmethod
    def run(gen, ids: np.ndarray, max_new: int) -> list[int]:
        gen.append_tokens(ids)
        out = []
        while not gen.is_done() and len(out) < max_new:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return out

    def ask(self, rgb, question: str, max_new: int) -> tuple[list[int], int]:
        px, grid = self.pixels(rgb)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        ids = self.prompt_ids(messages, [grid])
        return self.run(self.generator(ids, [px], len(ids) + max_new), ids, max_new), len(ids)


def compose(fmt: dict, messages: list[dict]) -> str:
    """preprocessing.json's chat_format: the conversation as plain strings (apps without a template engine)."""
    def text(msg):
        return next(p["text"] for p in msg["content"] if p["type"] == "text")

    users = [x for x in messages if x["role"] == "user"]
    answers = [text(x) for x in messages if x["role"] == "assistant"]
    first = fmt["first"] if users[0]["content"][0]["type"] == "image" else fmt["first_text_only"]
    out = first[0] + text(users[0]) + first[1]
    for answer, user in zip(answers, users[1:]):
        out += fmt["answer_before"] + answer + fmt["next"][0] + text(user) + fmt["next"][1]
    return out


def edgevlm_tokens(vlm, image, question, max_new) -> tuple[list[int], str, int]:
    rs = list(vlm.stream(image, question, max_tokens=max_new))
    return [r.token for r in rs], "".join(r.text for r in rs), rs[0].prompt_tokens


def _answer(app: App, tokens: list[int], eos) -> str:
    return app.tok.decode(np.asarray([t for t in tokens if t not in eos], np.int32))


def _parity(og, ref, bundle, out, n, seed, label):
    app = App(og, convert(bundle, out), ref)
    vlm = edgevlm.load(bundle, threads=1)
    eos = set(vlm.manifest.generation.eos_token_ids)
    same = text_same = correct = total = 0
    for ex in shapes.examples(seed, n, split="eval"):
        rgb = load_image(ex.image)
        want, want_text, want_len = edgevlm_tokens(vlm, ex.image, ex.question, 24)
        got, got_len = app.ask(rgb, ex.question, 24)
        total += 1
        same += got == want and got_len == want_len
        text_same += _answer(app, got, eos) == want_text
        correct += shapes.normalize_answer(_answer(app, got, eos)) == shapes.normalize_answer(ex.answer)
    print(f"{label}: {same}/{total} greedy answers identical to edgevlm's (token ids and prompt length), "
          f"{text_same}/{total} texts identical, accuracy {correct / total:.3f}")
    return same, text_same, total


def test_demo_answers_identical(og, ref, tmp_path):
    same, text_same, total = _parity(og, ref, ASSETS / "shapes-fastvlm", tmp_path / "demo", 120, shapes.TEST_SEED,
                                     "demo (fp32)")
    assert total == 120 and same == total and text_same == total
    # the guide's Python calls, as printed there
    vlm = edgevlm.load(ASSETS / "shapes-fastvlm", threads=1)
    for ex in list(shapes.examples(shapes.TEST_SEED + 4, 3, split="eval")):
        code = _guide_block("import json, numpy as np, onnxruntime_genai as og\n")
        code = code.replace("my-model-genai", str(tmp_path / "demo")).replace("What color is the star?", ex.question)
        namespace = dict(ref, rgb=load_image(ex.image))
        exec(compile(code, "docs/native-apps.md", "exec"), namespace)
        assert namespace["answer"] == vlm.generate(ex.image, ex.question, max_tokens=64)


def test_int4_bundle_answers_identical(og, ref, tmp_path):
    from edgevlm.quant import quantize_bundle

    q = tmp_path / "int4"
    quantize_bundle(ASSETS / "shapes-fastvlm", q, "int4")
    assert edgevlm.load(q, warmup=False).manifest.quant.scheme == "int4"
    same, text_same, total = _parity(og, ref, q, tmp_path / "int4-genai", 100, shapes.TEST_SEED + 1, "demo int4")
    assert total == 100 and same == total and text_same == total


def test_graphs_with_external_data(og, ref, tmp_path):
    """Large models keep their weights beside the graphs: the converted graphs still find them."""
    import onnx

    from edgevlm.bundle import sha256_file

    b = tmp_path / "external"
    shutil.copytree(ASSETS / "shapes-fastvlm", b)
    m = json.loads((b / "manifest.json").read_text(encoding="utf-8"))
    for name, comp in m["components"].items():
        data = comp["file"] + ".data"
        onnx.save(onnx.load(str(b / comp["file"])), str(b / comp["file"]), save_as_external_data=True,
                  all_tensors_to_one_file=True, location=data, size_threshold=1024)
        comp.update(sha256=sha256_file(b / comp["file"]), data_files=[{"file": data, "sha256": sha256_file(b / data)}])
    (b / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    same, text_same, total = _parity(og, ref, b, tmp_path / "genai", 30, shapes.TEST_SEED + 3, "external data")
    assert sorted(p.name for p in (tmp_path / "genai").glob("*.data")) == ["decoder.onnx.data", "embed.onnx.data",
                                                                            "vision.onnx.data"]
    assert same == text_same == total == 30


def test_multi_turn_chat_reuses_the_kv_cache(og, ref, tmp_path):
    app = App(og, convert(ASSETS / "shapes-fastvlm", tmp_path / "demo"), ref)
    vlm = edgevlm.load(ASSETS / "shapes-fastvlm", threads=1)
    eos = set(vlm.manifest.generation.eos_token_ids)
    ctx = vlm.manifest.generation.context_length
    exs = list(shapes.examples(shapes.TEST_SEED + 2, 16, split="eval"))
    same = turns = appended = rewinds = composed = 0
    for c in range(4):  # three turns on one generator: each turn appends only what follows its history
        chat, gen, messages = vlm.chat(), None, []
        image = exs[4 * c].image
        for j in range(3):
            q = exs[4 * c + j].question
            want = [r.token for r in chat.stream(q, image=image if j == 0 else None, max_tokens=24)]
            messages.append({"role": "user", "content": [{"type": "image"}] * (j == 0) + [{"type": "text", "text": q}]})
            ids = app.prompt_ids(messages, ["0x0"])
            composed += compose(app.spec["chat_format"], messages) == app.tok.apply_chat_template(
                json.dumps(messages), add_generation_prompt=True)
            if gen is None:
                gen, new = app.generator(ids, [app.pixels(load_image(image))[0]], ctx), ids
            else:
                have = gen.get_sequence(0)
                k = next((i for i, (a, b) in enumerate(zip(have, ids)) if a != b), min(len(have), len(ids)))
                if k < len(have):
                    gen.rewind_to(k)
                    rewinds += 1
                new = ids[k:]
            appended += len(new)
            got = app.run(gen, new, 24)
            messages.append({"role": "assistant", "content": [{"type": "text", "text": _answer(app, got, eos)}]})
            same += got == want
            turns += 1
        # an image in a later turn: a new generator over the whole conversation, both images' pixels
        second = exs[4 * c + 3]
        want = [r.token for r in chat.stream(second.question, image=second.image, max_tokens=24)]
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": second.question}]})
        ids = app.prompt_ids(messages, ["0x0", "0x0"])
        pixels = [app.pixels(load_image(x))[0] for x in (image, second.image)]
        got = app.run(app.generator(ids, pixels, len(ids) + 24), ids, 24)
        same += got == want
        turns += 1
    print(f"multi-turn: {same}/{turns} turns identical (4 chats x 3 turns on one generator each, {appended} tokens "
          f"appended, {rewinds} rewinds; + 4 later-image turns); chat_format composes the template's text "
          f"{composed}/12")
    assert same == turns == 16 and composed == 12


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_checkpoint_of_each_family(name, og, ref, bundle, tmp_path):
    b = bundle(name)
    app = App(og, convert(b, tmp_path / name), ref)
    vlm = edgevlm.load(b, threads=1)
    m = vlm.manifest
    outs, same, ids_same, grids = [], 0, 0, []
    for k, size in enumerate([(160, 120), (200, 64), (64, 130)]):  # landscape, wide, tall: several tile grids
        img = scene(k, size)
        rgb = load_image(img)
        want, _, want_len = edgevlm_tokens(vlm, img, "what color is the star?", 12)
        got, got_len = app.ask(rgb, "what color is the star?", 12)
        grids.append(app.pixels(rgb)[1])
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the star?"}]}]
        rendered = app.tok.apply_chat_template(json.dumps(msgs), add_generation_prompt=True)
        assert rendered == template.render(m.chat_template, msgs, add_generation_prompt=True, **m.special_tokens)
        assert compose(app.spec["chat_format"], msgs) == rendered
        same += got == want and got_len == want_len
        outs.append(tuple(got))
    if app.own is None:  # onnxruntime-genai's own tokenizer made the prompts: compare with `tokenizers`
        from tokenizers import Tokenizer

        hf = Tokenizer.from_file(str(tmp_path / name / "tokenizer.json"))
        for text in ["what color is the star?", template.render(m.chat_template, msgs, True, **m.special_tokens)]:
            ids_same += app.tok.encode(text).tolist() == hf.encode(text, add_special_tokens=False).ids
    print(f"{name}: {same}/3 greedy answers identical (grids {grids}), {len(set(outs))} distinct answers; prompt "
          f"tokenizer: {'onnxruntime-genai' if app.own is None else 'tokenizers (not exact in ort-extensions)'}")
    assert same == 3
    assert len(set(outs)) > 1  # the image decides the answer
    assert app.own is not None or ids_same == 2


def test_refused_bundles_say_why_in_one_line(bundle, tmp_path, capsys):
    from edgevlm.apps import export_cmd
    from edgevlm.export.ort_genai import convert as write, unsupported
    from edgevlm.manifest import StaticShape

    with pytest.raises(ExportError, match="pre-fusion") as e:
        write(ASSETS / "shapes-fastvlm-mini", tmp_path / "mini")
    assert "\n" not in str(e.value) and not (tmp_path / "mini").exists()
    assert export_cmd.main(["--format", "ort-genai", "--bundle", str(ASSETS / "shapes-fastvlm-mini"),
                            "--to", str(tmp_path / "mini")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "pre-fusion" in err and "\n" not in err
    with pytest.raises(ExportError, match="anyres"):
        write(bundle("onevision-qwen2"), tmp_path / "ov")
    m = edgevlm.load(ASSETS / "shapes-fastvlm", warmup=False).manifest
    comps = dict(m.components, decoder=dataclasses.replace(m.components["decoder"], static=StaticShape(1, 128)))
    assert "static" in unsupported(dataclasses.replace(m, components=comps))
    print("refused:", err)


def test_cli_writes_and_refuses_to_overwrite(tmp_path, capsys):
    from edgevlm.apps import export_cmd

    out = tmp_path / "genai"
    args = ["--format", "ort-genai", "--bundle", str(ASSETS / "shapes-fastvlm"), "--to", str(out)]
    assert export_cmd.main(args) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["decoder.onnx", "embedding.onnx", "genai_config.json", "preprocessing.json", "tokenizer.json",
                     "tokenizer_config.json", "vision.onnx"]
    assert export_cmd.main(args) == 1 and "already exists" in capsys.readouterr().err
    assert export_cmd.main(args + ["--force"]) == 0


def test_reference_preprocessing_equals_edgevlms(ref, bundle):
    rng = np.random.default_rng(0)
    worst, cases = 0, 0
    for _ in range(24):  # the resize kernels, every filter, both ways in each axis
        img = rng.integers(0, 256, (*rng.integers(4, 160, 2), 3), dtype=np.uint8)
        oh, ow = (int(x) for x in rng.integers(4, 160, 2))
        for resample in ("nearest", "bilinear", "bicubic", "lanczos"):
            for kernel in ("torchvision", "pil"):
                a, b = resize(img, oh, ow, resample, kernel), ref["resize"](img, oh, ow, resample, kernel)
                worst = max(worst, int(np.abs(a.astype(int) - b).max()))
                cases += 1
    pres = [edgevlm.load(ASSETS / "shapes-fastvlm", warmup=False).manifest.preprocess]
    pres += [edgevlm.load(bundle(n), warmup=False).manifest.preprocess for n in FAMILIES[1:4]]
    pres += [dataclasses.replace(pres[-1], resize_kernel="torchvision", crop=(60, 60), resample="bilinear"),
             dataclasses.replace(pres[0], shortest_edge=None, size=(40, 56), crop=None)]
    pix = 0.0
    for pre in pres:
        for _ in range(6):
            rgb = rng.integers(0, 256, (*rng.integers(8, 300, 2), 3), dtype=np.uint8)
            p = dataclasses.asdict(pre)
            pix = max(pix, float(np.abs(preprocess(rgb, pre) - ref["preprocess"](rgb, p)).max()))
            cases += 1
    lay_m = edgevlm.load(bundle("smolvlm-llama"), warmup=False).manifest
    t = {"tile_size": lay_m.image_layout.tile_size, "longest_edge": lay_m.image_layout.longest_edge,
         "global_tile": lay_m.image_layout.global_tile, "max_side": tiling.MAX_SIDE}
    for h, w in [(37, 251), (301, 199), (24, 24), (20, 13), (150, 150), (97, 64)]:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = tiling.make_tiles(rgb, lay_m.preprocess, lay_m.image_layout)
        got, rows, cols = ref["split_tiles"](rgb, dataclasses.asdict(lay_m.preprocess), t)
        assert (rows, cols) == (want.rows, want.cols) and got.shape == want.pixels.shape
        pix = max(pix, float(np.abs(got - want.pixels).max()))
        cases += 1
    print(f"reference preprocessing vs edgevlm: {cases} cases, resize maxdiff = {worst}, PIXELS maxdiff = {pix}")
    assert worst == 0 and pix == 0.0


def test_real_tokenizers_and_templates(og, tmp_path):
    """ort-extensions' encoding and minja's rendering of real checkpoints' files (tests/data/real), through the
    converter's tokenizer class and template rewrite."""
    from tokenizers import Tokenizer

    from edgevlm.export.ort_genai_prompt import _PROBES, minja_template, tokenizer_class

    real = ROOT / "tests" / "data" / "real"
    cases = [("llava-1.5-7b-hf", "chat_template.pre-generation-tag.json", {"bos_token": "<s>", "eos_token": "</s>"}),
             ("smolvlm-256m-instruct", "chat_template.json", {"bos_token": "<|im_start|>",
                                                               "eos_token": "<end_of_utterance>"})]
    texts = ["What color is the star?", "Hello, world! 123 ünïcödé 日本語 \t\n  x", "  two  spaces ", "a\n\nb",
             "USER: <image>\nWhat is this? ASSISTANT:", "emoji 🙂 and café", "It's 3.14159, isn't it? Yes—no..."]
    lists = [m for m in _PROBES if all(isinstance(x["content"], list) for x in m)]
    for name, tmpl_file, variables in cases:
        raw = (real / name / "tokenizer.json").read_text(encoding="utf-8")
        cls, exact = tokenizer_class(json.loads(raw))
        src = json.loads((real / name / tmpl_file).read_text(encoding="utf-8"))["chat_template"]
        d = tmp_path / name
        d.mkdir()
        (d / "tokenizer.json").write_text(raw, encoding="utf-8")
        (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": cls, "add_bos_token": False,
                                                             "chat_template": minja_template(src, variables),
                                                             **variables}), encoding="utf-8")
        (d / "genai_config.json").write_text(json.dumps({"model": {  # a tokenizer-only directory
            "type": "llama", "vocab_size": 1, "context_length": 64, "bos_token_id": 0, "eos_token_id": 0,
            "pad_token_id": 0, "decoder": {"filename": "none.onnx", "hidden_size": 8, "head_size": 8,
                                           "num_attention_heads": 1, "num_key_value_heads": 1, "num_hidden_layers": 1}},
            "search": {"max_length": 64}}), encoding="utf-8")
        tok, hf = og.Tokenizer(og.Config(str(d))), Tokenizer.from_str(raw)
        enc = sum(tok.encode(t).tolist() == hf.encode(t, add_special_tokens=False).ids for t in texts)
        tmpl = sum(tok.apply_chat_template(json.dumps(msgs), add_generation_prompt=g)
                   == template.render(src, msgs, add_generation_prompt=g, **variables)
                   for msgs in lists for g in (True, False))
        print(f"{name}: {cls} (exact: {exact}), encodings identical {enc}/{len(texts)}, chat template renders "
              f"identical {tmpl}/{2 * len(lists)}")
        assert exact and enc == len(texts) and tmpl == 2 * len(lists)

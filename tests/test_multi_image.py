"""Several images in one message: prompt ids, first logits and greedy tokens as transformers computes them, per
family (2 and 3 images, before the text and interleaved with it); across turns; each image cached by content; the
CLI's repeated --image and the server's several image_url parts."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch

import edgevlm
from conftest import scene

FAMILIES = ["fastvlm-qwen2-gqa", "llava-clip-llama", "llava-siglip-qwen2", "smolvlm-llama", "onevision-qwen2"]


def pictures():
    """Three distinct pictures of different sizes (tiled families then cut them into different grids)."""
    return [scene(0, (160, 120)), scene(1, (90, 150)), scene(3, (64, 64))]


def hf_model(ckpt):
    from edgevlm.export.adapters import adapter_for

    adapter = adapter_for(json.loads((ckpt / "config.json").read_text())["model_type"])
    return adapter.load_model(ckpt).eval(), adapter.load_processor(ckpt)


def hf_inputs(processor, turns):
    """turns: [(parts, answer or None)], parts: strings and PIL images in order -> transformers' model inputs."""
    msgs = []
    for parts, answer in turns:
        content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p} for p in parts]
        msgs.append({"role": "user", "content": content})
        if answer is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


@torch.no_grad()
def hf_answer(model, inputs, n: int = 24) -> tuple[list[int], np.ndarray]:
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), out.logits[0][0].float().numpy()


@pytest.mark.parametrize("name", FAMILIES)
def test_several_images_match_transformers(name, checkpoint, bundle):
    model, processor = hf_model(checkpoint(name))
    vlm = edgevlm.load(bundle(name), threads=1)
    a, b, c = pictures()
    cases = {"2 images, then the text": [a, b, "what color is the circle?"],
             "3 images between texts": ["the first", a, "then", b, "and", c, "which one has a square?"],
             "2 images, the other order": [b, a, "what color is the circle?"]}
    answers = set()
    for label, parts in cases.items():
        inputs = hf_inputs(processor, [(parts, None)])
        ref, ref_logits = hf_answer(model, inputs)
        ids, order = vlm.render([{"role": "user", "content": [
            {"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in parts]}],
            [vlm.image_state(p, multi=edgevlm.media.multi(vlm, 3 if "3" in label else 2))[1]
             for p in parts if not isinstance(p, str)])
        rs = list(vlm.stream(None, parts, max_tokens=24))
        line = f"{name}, {label}: {len(ids)} prompt ids, greedy {len(ref)} tokens"
        if parts[-1] == "what color is the circle?" and isinstance(parts[0], type(a)):
            maxdiff = float(np.abs(vlm.prompt_logits(parts[:-1], parts[-1]) - ref_logits).max())
            line += f", logits maxdiff = {maxdiff:.3g}"
            assert maxdiff <= 1e-4
        print(line)
        assert ids.tolist() == inputs["input_ids"][0].tolist(), label
        assert rs[-1].prompt_tokens == inputs["input_ids"].shape[1]
        assert [r.token for r in rs] == ref, label
        answers.add(tuple(ref))
    assert len(answers) >= 2  # the pictures (and their order) decide the answer


@pytest.mark.parametrize("name", ["llava-siglip-qwen2", "onevision-qwen2"])
def test_images_across_turns_match_transformers(name, checkpoint, bundle):
    """A second image in a later turn: transformers processes the whole conversation again (LLaVA-OneVision then
    lays out every image as one of several, the first one too); the chat keeps its KV where it still holds."""
    model, processor = hf_model(checkpoint(name))
    vlm = edgevlm.load(bundle(name), threads=1)
    a, b, _ = pictures()
    chat = vlm.chat()
    first = chat.send("what color is the circle?", image=a, max_tokens=12)
    rs = list(chat.stream("and in this one?", image=b, max_tokens=16))
    inputs = hf_inputs(processor, [([a, "what color is the circle?"], first), ([b, "and in this one?"], None)])
    ref, _ = hf_answer(model, inputs, 16)
    print(f"{name}: second turn {rs[-1].prompt_tokens} prompt tokens ({rs[-1].prefilled_tokens} prefilled), greedy "
          f"{'match' if [r.token for r in rs] == ref else 'DIFFER'}")
    assert rs[-1].prompt_tokens == inputs["input_ids"].shape[1]
    assert [r.token for r in rs] == ref


def test_each_image_is_cached_by_content(bundle):
    vlm = edgevlm.load(bundle("llava-siglip-qwen2"), threads=1)
    a, b, c = pictures()
    first = list(vlm.stream([a, b, c], "which one has a square?", max_tokens=4))[-1]
    assert first.image_cache_hits == 0 and first.stages["encode"] > 0
    again = list(vlm.stream([c, a], "which one has a square?", max_tokens=4))[-1]  # same pictures, other order
    assert again.image_cache_hits == 2 and "encode" not in again.stages
    png = io.BytesIO()
    b.save(png, "PNG")  # the same pixels as bytes: one encode, cached under the content's key
    assert vlm.prepare(png.getvalue()) == vlm.prepare(np.asarray(b))


def test_limits_on_images_per_message(bundle):
    vlm = edgevlm.load(bundle("llava-siglip-qwen2"), threads=1, limits=edgevlm.Limits(images=2))
    a, b, c = pictures()
    with pytest.raises(edgevlm.ArgumentError, match="3 images or videos in one message; the limit is 2"):
        vlm.generate([a, b, c], "hi", max_tokens=2)
    small = edgevlm.load(bundle("llava-siglip-qwen2"), threads=1, limits=edgevlm.Limits(request_pixels=30_000))
    with pytest.raises(edgevlm.ImageError, match="request_pixels"):  # 160x120 + 90x150 > 30,000
        small.generate([a, b], "hi", max_tokens=2)
    with pytest.raises(edgevlm.ArgumentError, match="not both"):
        vlm.chat().send(["hi", a], image=b)


def test_cli_takes_several_images_in_order(tmp_path, capsys, bundle):
    from edgevlm.apps.chat import main

    paths = []
    for i, img in enumerate(pictures()[:2]):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    b = bundle("llava-siglip-qwen2")
    assert main(["--bundle", str(b), "--image", str(paths[0]), "--image", str(paths[1]), "--prompt",
                 "what color is the circle?", "--max-tokens", "12"]) == 0
    out = capsys.readouterr().out.strip()
    vlm = edgevlm.load(b, threads=1)
    assert out == vlm.generate([str(p) for p in paths], "what color is the circle?", max_tokens=12).strip()
    assert out != vlm.generate([str(p) for p in paths[::-1]], "what color is the circle?", max_tokens=12).strip()
    print("chat --image A --image B:", repr(out))


def test_server_takes_several_image_url_parts_in_order(serve, bundle):
    import openai

    b = bundle("llava-siglip-qwen2")
    client = openai.OpenAI(base_url=serve("--bundle", str(b)) + "/v1", api_key="none", max_retries=0)
    a, b_, c = pictures()

    def data(img):
        png = io.BytesIO()
        img.save(png, "PNG")
        url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        return {"type": "image_url", "image_url": {"url": url}}

    content = [{"type": "text", "text": "first"}, data(a), {"type": "text", "text": "then"}, data(b_),
               {"type": "text", "text": "what color is the circle?"}]
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], max_tokens=12)
    vlm = edgevlm.load(b, threads=1)
    want = vlm.generate(None, ["first", a, "then", b_, "what color is the circle?"], max_tokens=12)
    print("server, 2 image_url parts between texts:", repr(r.choices[0].message.content))
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == list(vlm.stream(None, ["first", a, "then", b_, "what color is the circle?"],
                                                    max_tokens=1))[-1].prompt_tokens
    five = [data(x) for x in (a, b_, c, a, b_)] + [{"type": "text", "text": "hi"}]  # --max-images 4 (the default)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": five}])
    assert e.value.body["code"] == "too_many_images"

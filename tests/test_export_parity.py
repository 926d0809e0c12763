"""Exported bundles answer with exactly the tokens transformers produces (fp32)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edgevlm
from conftest import SPECS

PROMPT = "what color is the circle?"


def _hf(ckpt):  # the PyTorch reference, loaded as the exporter loads it (MobileVLM is not in transformers)
    from edgevlm.export.adapters import adapter_for

    adapter = adapter_for(json.loads((ckpt / "config.json").read_text())["model_type"])
    return adapter.load_model(ckpt).eval(), adapter.load_processor(ckpt)


def _hf_inputs(processor, image, prompt):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    tok = processor.tokenizer
    # as apply_chat_template(tokenize=True) decides: no second BOS when the template already wrote one
    add_special = not (tok.bos_token and text.startswith(tok.bos_token))
    return processor(images=image, text=text, return_tensors="pt", add_special_tokens=add_special)


@pytest.mark.parametrize("name", list(SPECS))
def test_logits_and_greedy_tokens_match_transformers(name, checkpoint, bundle, images):
    model, processor = _hf(checkpoint(name))
    vlm = edgevlm.load(bundle(name))
    for image in images[:2]:
        inputs = _hf_inputs(processor, image, PROMPT)
        with torch.no_grad():
            ref_logits = model(**inputs).logits[0, -1].numpy()
            ref = model.generate(**inputs, max_new_tokens=32, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        logits = vlm.prompt_logits(image, PROMPT)  # our pixels, tiles, prompt ids and graphs end to end
        maxdiff = float(np.abs(logits - ref_logits).max())
        print(f"{name}: logits maxdiff = {maxdiff:.3g}")
        assert maxdiff <= 1e-4

        ours = [r.token for r in vlm.stream(image, PROMPT, max_tokens=32)]
        assert ours == ref.tolist(), f"{name}: greedy tokens differ"
        text = vlm.generate(image, PROMPT, max_tokens=32)
        assert text == processor.tokenizer.decode(ref, skip_special_tokens=True)


@pytest.mark.parametrize("name", list(SPECS))
def test_the_image_decides_the_answer(name, bundle, images):
    # a broken image pipeline must not pass the parity test unnoticed
    vlm = edgevlm.load(bundle(name))
    answers = {vlm.generate(img, PROMPT, max_tokens=12) for img in images}
    assert len(answers) >= 2, answers


@pytest.mark.parametrize("name", list(SPECS))
def test_manifest_records_parity(name, bundle):
    manifest = json.loads((bundle(name) / "manifest.json").read_text())
    parity = manifest["source"]["parity"]
    print(name, parity)
    assert parity["prompt_ids_match"] and parity["greedy_match"]
    assert parity["max_abs_pixel_diff"] <= 1e-6
    assert parity["max_abs_logit_diff"] <= 1e-4
    assert parity["max_abs_vision_diff"] <= 1e-4
    assert manifest["family"] == SPECS[name].family


def test_preprocessing_matches_hf_processor(checkpoint):
    # torchvision backend (the default) and the PIL one; odd sizes, both orientations
    from transformers import AutoImageProcessor

    from edgevlm.export.adapters.base import preprocess_from_hf
    from edgevlm.image import load_image, preprocess

    rng = np.random.default_rng(0)
    for name in ("llava-clip-llama", "llava-siglip-qwen2", "fastvlm-qwen2-gqa"):
        for backend in ("torchvision", "pil"):
            ip = AutoImageProcessor.from_pretrained(checkpoint(name), backend=backend)
            cfg = preprocess_from_hf(ip)
            for h, w in [(37, 251), (301, 199), (64, 64), (1000, 777)]:
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                ref = ip(images=arr, return_tensors="np")["pixel_values"]
                ours = preprocess(load_image(arr), cfg)
                maxdiff = float(np.abs(ours - ref).max())
                print(f"{name} {backend} {h}x{w}: pixels maxdiff = {maxdiff:.3g}")
                assert ours.shape == ref.shape and maxdiff <= 1e-5


def test_export_refuses_unknown_family_and_leaves_nothing(tmp_path):
    from transformers import Qwen2Config

    from edgevlm.errors import ExportError
    from edgevlm.export.exporter import export

    Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "hf")
    with pytest.raises(ExportError, match="no adapter"):
        export(tmp_path / "hf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_checkpoint_builder_takes_real_size_dimensions():
    # benchmarks/peers.py builds FastVLM-0.5B's shape: FastViTHD tower (stride 64) and the real vocabulary size
    from edgevlm.export.dev.builders import TextDims, VisionDims, _text_config, _vision_config, train_tokenizer

    tok = train_tokenizer("qwen2", 300)
    text = _text_config(TextDims(vocab_size=151936), len(tok), tok)
    assert text.vocab_size == 151936 and len(tok) < 400
    assert _text_config(TextDims(), len(tok), tok).vocab_size == len(tok)
    vis = _vision_config(VisionDims(timm_arch="fastvit_mci3", stride=64, embed_dims=(96, 192, 384, 768, 1536),
                                    layers=(2, 12, 24, 4, 2)))
    assert vis.architecture == "fastvit_mci3" and vis.hidden_size == 3072
    assert _vision_config(VisionDims()).architecture == "fastvit_t8"

"""LLaVA-Mini bundles: one vision token + pre-fusion graphs, same parity bar as the other families."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edgevlm
from conftest import SPECS
from edgevlm.errors import EdgeVLMError

PROMPT = "what color is the circle?"


@pytest.fixture(scope="module")
def mini_bundle(tmp_path_factory):
    from edgevlm.export.dev.builders import build_mini_checkpoint
    from edgevlm.export.exporter import export

    root = tmp_path_factory.mktemp("mini")
    ckpt = build_mini_checkpoint(SPECS["fastvlm-qwen2-gqa"], root / "hf")
    export(ckpt, root / "bundle", progress=False)
    return ckpt, root / "bundle"


def test_manifest_declares_the_extra_graphs(mini_bundle):
    m = json.loads((mini_bundle[1] / "manifest.json").read_text())
    assert m["fusion"] == "prefusion" and m["image_tokens"] == 1
    assert {"vision", "embed", "decoder", "compressor", "prefusion"} == set(m["components"])
    print("parity", m["source"]["parity"])
    assert m["source"]["parity"]["greedy_match"] and m["source"]["parity"]["prompt_ids_match"]


def test_tokens_match_the_pytorch_module(mini_bundle, images):
    from transformers import AutoProcessor

    from edgevlm.export.llava_mini import MiniVLM, reference_tokens
    from edgevlm.export.parity import hf_inputs

    ckpt, bundle = mini_bundle
    mini, processor = MiniVLM.load(ckpt), AutoProcessor.from_pretrained(ckpt)
    vlm = edgevlm.load(bundle)
    eos = set(vlm.manifest.generation.eos_token_ids)
    outs = []
    for image in images[:3]:
        inputs = hf_inputs(processor, image, PROMPT)
        ref, first = reference_tokens(mini, inputs, vlm.manifest.image_token_id, eos, 24)
        rs = list(vlm.stream(image, PROMPT, max_tokens=24))
        assert [r.token for r in rs] == ref
        assert rs[-1].prompt_tokens == inputs["input_ids"].shape[1]  # one placeholder, not 16
        assert "compress" in rs[-1].stages
        outs.append(tuple(ref))
    assert len(set(outs)) >= 2  # the one token and the fused text carry the image


def test_image_work_is_done_once_per_conversation(mini_bundle, images):
    vlm = edgevlm.load(mini_bundle[1])
    chat = vlm.chat()
    list(chat.stream(PROMPT, image=images[0], max_tokens=4))
    r = list(chat.stream("and the square?", max_tokens=4))[-1]
    assert "encode" not in r.stages and "compress" not in r.stages
    assert r.prefilled_tokens < r.prompt_tokens  # the first turn's prefix came from the KV cache
    with pytest.raises(EdgeVLMError, match="one image per conversation"):
        list(chat.stream("and this?", image=images[1], max_tokens=2))


def test_static_prefusion_bundle_matches_the_dynamic_one(mini_bundle, images, tmp_path):
    from edgevlm.export.exporter import StaticOptions, export

    ckpt, bundle = mini_bundle
    m = export(ckpt, tmp_path / "static", progress=False, static=StaticOptions(kv_capacity=160, prefill_chunk=16))
    assert m.is_static and m.components["prefusion"].static.kv_capacity == 160 + 16  # image prefix + prompt
    dyn, st = edgevlm.load(bundle), edgevlm.load(tmp_path / "static")
    worst = 0.0
    for image in images[:3]:
        worst = max(worst, float(np.abs(dyn.prompt_logits(image, PROMPT) - st.prompt_logits(image, PROMPT)).max()))
        assert [r.token for r in dyn.stream(image, PROMPT, max_tokens=16)] == \
               [r.token for r in st.stream(image, PROMPT, max_tokens=16)]
    print(f"static vs dynamic pre-fusion bundle: logits maxdiff = {worst:.3g}")
    assert worst <= 1e-4
    a, b = dyn.chat(), st.chat()  # a second turn reuses the image's pre-fusion prefix in both
    for turn in ((PROMPT, images[0]), ("and the square?", None)):
        assert a.send(turn[0], image=turn[1], max_tokens=6) == b.send(turn[0], image=turn[1], max_tokens=6)

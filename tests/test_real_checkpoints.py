"""Published checkpoints as users download them: their real config, tokenizer, processor and chat-template files
(tests/data/real/, see each SOURCE.md) with random weights at the real widths, heads, vocabularies and image sizes
(only depth cut: tests/real_checkpoints.py). Each is exported with `edgevlm export`, then its greedy tokens are
compared with transformers' on two images that must give different answers. SmolVLM-256M goes through a hub id
resolved offline from a hub cache directory; Apple's FastVLM through its original (llava_qwen2) directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import edgevlm
from conftest import scene
from real_checkpoints import CHECKPOINTS, build, hub_cache

HUB = "smolvlm-256m"  # exported from its hub id, offline, out of a hub cache directory
TOKENS = 24


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(name) -> (checkpoint directory, bundle directory, CLI stdout+stderr), once per module."""
    from edgevlm.apps.export_cmd import main

    made = {}

    def get(name):
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            ckpt = build(name, root / "hf")
            out = root / "bundle"
            if name == HUB:  # a fresh process: HF_HUB_CACHE is read when huggingface_hub is imported
                snap = hub_cache(ckpt, root / "hub", CHECKPOINTS[name].hub_id)
                env = {**os.environ, "HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
                cmd = [sys.executable, "-m", "edgevlm.apps.cli", "export", "--from", CHECKPOINTS[name].hub_id,
                       "--to", str(out), "--parity-tokens", str(TOKENS)]
                p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
                assert p.returncode == 0, p.stderr[-3000:]
                ckpt, log = snap, p.stdout + p.stderr
            else:
                assert main(["--from", str(ckpt), "--to", str(out), "--parity-tokens", str(TOKENS)]) == 0
                log = ""
            made[name] = (ckpt, out, log, root)
        return made[name][:3]

    yield get
    for *_, root in made.values():  # gigabytes of weights and graphs per checkpoint: not kept after the module
        shutil.rmtree(root, ignore_errors=True)


def _reference(ckpt):  # transformers, loaded as the exporter loads it (Apple's layout and MobileVLM converted)
    from edgevlm.export.adapters import adapter_for
    from edgevlm.export.exporter import chat_template

    model_type = json.loads((ckpt / "config.json").read_text())["model_type"]
    adapter = adapter_for(model_type)
    processor = adapter.load_processor(ckpt)
    processor.chat_template = chat_template(processor, model_type)
    return adapter.load_model(ckpt).eval(), processor


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_published_checkpoint_exports_and_matches_transformers_on_two_images(name, exported):
    import torch

    from edgevlm.export import parity

    torch.set_num_threads(1)
    ckpt, bundle, _ = exported(name)
    # image 1: the exporter's own check (its probe picture, TOKENS greedy tokens against transformers')
    figures = json.loads((bundle / "manifest.json").read_text())["source"]["parity"]
    print(f"{name} probe: {figures}")
    assert figures["prompt_ids_match"] and figures["greedy_match"] and figures["greedy_tokens"] == TOKENS
    assert figures["max_abs_pixel_diff"] <= 1e-6 and figures["max_abs_logit_diff"] <= 5e-4

    # image 2: a wide scene, same question, checked here against transformers (4:1: SmolVLM cuts 4 x 1 tiles + the
    # global one instead of the probe's 4 x 3, OneVision picks another grid, LLaVA / FastVLM crop or pad it)
    model, processor = _reference(ckpt)
    image = scene(1, (320, 80))
    inputs = parity.hf_inputs(processor, image, parity.PROMPT)
    ref_tokens, ref_logits = parity.reference_generate(model, inputs, TOKENS)
    del model
    vlm = edgevlm.load(bundle)
    maxdiff = float(np.abs(vlm.prompt_logits(image, parity.PROMPT) - ref_logits).max())
    ours = [r.token for r in vlm.stream(image, parity.PROMPT, max_tokens=TOKENS)]
    print(f"{name} scene: LOGITS maxdiff = {maxdiff:.3g}, greedy {len(ours)} tokens identical: {ours == ref_tokens}")
    assert maxdiff <= 5e-4
    assert ours == ref_tokens

    # the image decides the answer: the probe picture and the scene are answered differently
    probe = [r.token for r in vlm.stream(parity.probe_image(), parity.PROMPT, max_tokens=TOKENS)]
    assert probe != ours


def test_hub_id_resolves_offline_from_the_hub_cache(exported):
    ckpt, bundle, log = exported(HUB)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source"]["checkpoint"] == CHECKPOINTS[HUB].hub_id
    assert ckpt.parent.name == "snapshots" or ckpt.parent.parent.name == "snapshots"
    assert "wrote" in log and manifest["family"] == "smolvlm"


def test_apple_fastvlm_directory_is_converted_with_the_published_names(exported):
    """Apple's layout: weights named as in apple/FastVLM-0.5B (FastViTHD `network.*`, `mm_projector.*`), exported
    from the directory itself; the names come out of the same mapping transformers' conversion script applies."""
    from safetensors import safe_open

    from edgevlm.export.fastvlm_apple import _tower_names, stage_depths, to_apple_names

    ckpt, bundle, _ = exported("fastvlm-0.5b-apple")
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for n in ("model.vision_tower.vision_tower.model.network.0.0.token_mixer.reparam_conv.weight",
              "model.vision_tower.vision_tower.model.network.0.0.convffn.conv.conv.weight",
              "model.vision_tower.vision_tower.model.network.10.0.token_mixer.qkv.weight",
              "model.mm_projector.0.bias", "model.mm_projector.2.weight", "model.layers.0.self_attn.q_proj.bias",
              "model.embed_tokens.weight", "lm_head.weight"):
        assert n in names, n
    assert stage_depths(names) == (1, 1, 1, 1, 1)
    # the full FastViTHD: 628 tower tensors + the CLIP head's head.proj = the 629 Apple's checkpoint holds
    assert len(to_apple_names(dict.fromkeys(_tower_names((2, 12, 24, 4, 2))))) + 1 == 629
    assert json.loads((bundle / "manifest.json").read_text())["family"] == "fast_vlm"


def test_llava_weights_carry_the_published_names(exported):
    """llava-hf/llava-1.5-7b-hf's shard index lists every weight: ours are those names (minus the cut layers)."""
    from safetensors import safe_open

    from real_checkpoints import REAL

    ckpt, _, _ = exported("llava-1.5-7b")
    index = set(json.loads((REAL / "llava-1.5-7b-hf" / "model.safetensors.index.json").read_text())["weight_map"])
    names = set()
    for f in ckpt.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            names |= set(fh.keys())
    assert names <= index, sorted(names - index)[:5]
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in names


@pytest.mark.parametrize("name", ["smolvlm2-256m", "onevision-0.5b"])
def test_published_video_checkpoints_match_transformers_on_a_video_and_two_images(name, exported):
    """SmolVLM2 and LLaVA-OneVision as published: their real video processors and templates (SmolVLM2's publishes
    no video marker: its processor renders video prompts through its own default template, which the exporter
    writes into the bundle), 4 frames at 1 fps, and two images in one message (OneVision's multi-image layout)."""
    import torch
    from transformers.video_utils import VideoMetadata

    torch.set_num_threads(1)
    ckpt, bundle, _ = exported(name)
    model, processor = _reference(ckpt)
    vlm = edgevlm.load(bundle)
    assert vlm.manifest.video is not None
    frames = [np.array(scene(k, (320, 240))) for k in range(4)]
    question = "What happens in the video?"
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text",
                                                                                          "text": question}]}],
                                         add_generation_prompt=True)
    meta = VideoMetadata(total_num_frames=4, fps=1.0, duration=4.0, frames_indices=[0, 1, 2, 3])
    inputs = processor(text=text, videos=[np.stack(frames)], video_metadata=[meta], do_sample_frames=False,
                       return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    rs = list(vlm.stream(None, question, video=edgevlm.Video(frames, frame_rate=1.0), max_tokens=12))
    print(f"{name} video: {rs[-1].prompt_tokens} prompt tokens (transformers {inputs['input_ids'].shape[1]}), "
          f"greedy {'identical' if [r.token for r in rs] == ref else 'DIFFERENT'}")
    assert rs[-1].prompt_tokens == inputs["input_ids"].shape[1] and [r.token for r in rs] == ref
    a, b = scene(0, (300, 200)), scene(3, (150, 260))
    msgs = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "image", "image": b},
                                         {"type": "text", "text": parity_prompt()}]}]
    inputs = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    rs = list(vlm.stream([a, b], parity_prompt(), max_tokens=12))
    print(f"{name} two images: {rs[-1].prompt_tokens} prompt tokens, greedy "
          f"{'identical' if [r.token for r in rs] == ref else 'DIFFERENT'}")
    assert rs[-1].prompt_tokens == inputs["input_ids"].shape[1] and [r.token for r in rs] == ref


def parity_prompt() -> str:
    from edgevlm.export import parity

    return parity.PROMPT

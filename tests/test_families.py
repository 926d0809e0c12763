"""SmolVLM tiles, LLaVA-OneVision anyres and MobileVLM: what the parity test of one picture cannot show."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edgevlm
from edgevlm import tiling
from edgevlm.image import load_image

SIZES = [(37, 251), (301, 199), (24, 24), (20, 13), (150, 150), (97, 64), (64, 200)]


def _processor(ckpt):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(ckpt)


def _hf(processor, arr):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    return processor(images=arr, text=text, return_tensors="pt")


@pytest.mark.parametrize("name", ["smolvlm-llama", "onevision-qwen2"])
def test_tiles_and_placeholders_match_the_processor(name, bundle, checkpoint):
    # every image size: the same tiles bit for bit, the same prompt ids, the same rows as PyTorch
    from transformers import AutoModelForImageTextToText

    from edgevlm.export.adapters import adapter_for

    vlm = edgevlm.load(bundle(name))
    m = vlm.manifest
    processor = _processor(checkpoint(name))
    model = AutoModelForImageTextToText.from_pretrained(checkpoint(name)).eval()
    adapter = adapter_for(m.family)
    rng = np.random.default_rng(1)
    grids = set()
    for h, w in SIZES:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        inputs = _hf(processor, arr)
        tiles = tiling.make_tiles(load_image(arr), m.preprocess, m.image_layout)
        ref = adapter.hf_pixels(inputs).numpy()
        assert tiles.pixels.shape == ref.shape, (h, w)
        maxdiff = float(np.abs(tiles.pixels - ref).max())
        _, state, _, _ = vlm.image_state(arr)
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
        ids = vlm.prompt_ids(msgs, [state])
        with torch.no_grad():
            rows_ref = adapter.reference_rows(model, inputs).numpy()
        rows_diff = float(np.abs(state["rows"] - rows_ref).max())
        print(f"{name} {h}x{w}: {len(tiles.pixels)} tiles ({tiles.rows}x{tiles.cols}), {len(state['rows'])} rows, "
              f"PIXELS maxdiff = {maxdiff:.3g}, ROWS maxdiff = {rows_diff:.3g}")
        assert maxdiff <= 1e-6
        assert ids.tolist() == inputs["input_ids"][0].tolist()
        assert rows_diff <= 1e-4
        grids.add((tiles.rows, tiles.cols))
    assert len(grids) >= 3  # several layouts really exercised


def test_onevision_large_grids_are_shrunk(bundle):
    # anyres_max_4 in the test checkpoint: a 3 x 3 grid (12 x 12 features) must be shrunk bilinearly
    vlm = edgevlm.load(bundle("onevision-qwen2"))
    lay = vlm.manifest.image_layout
    arr = np.full((300, 300, 3), 128, np.uint8)
    tiles = tiling.make_tiles(arr, vlm.manifest.preprocess, lay)
    assert (tiles.rows, tiles.cols) == (3, 3)
    _, state, _, _ = vlm.image_state(arr)
    full = 16 + 12 * 13  # base tile + 12 rows of 12 features and a row end each
    assert 16 < len(state["rows"]) < full


def test_smolvlm_marker_tokens_in_the_prompt(bundle):
    vlm = edgevlm.load(bundle("smolvlm-llama"))
    _, state, _, _ = vlm.image_state(np.zeros((20, 90, 3), np.uint8))  # wide: 1 x 3 tiles + the global one
    text = vlm._placeholder(state)
    assert text.count("<fake_token_around_image>") == 5 and "<row_1_col_3>" in text and "<global-img>" in text
    assert text.count("<image>") == len(state["rows"]) == 4 * 4


def test_mobilevlm_parameter_names_are_the_published_ones(checkpoint):
    from safetensors import safe_open

    names = {}
    for spec in ("mobilevlm-v2", "mobilevlm-v1"):
        with safe_open(str(checkpoint(spec) / "model.safetensors"), "pt") as f:
            names[spec] = set(f.keys())
    published_v2 = ["model.mm_projector.mlp.mlp.0.weight", "model.mm_projector.mlp.mlp.2.bias",
                    "model.mm_projector.peg.peg.0.weight", "model.mm_projector.peg.peg.0.bias"]
    published_v1 = ["model.mm_projector.model.mlp.1.weight", "model.mm_projector.model.mlp.3.bias",
                    "model.mm_projector.model.mb_block.1.block.0.0.weight",  # depthwise 3x3
                    "model.mm_projector.model.mb_block.1.block.1.fc1.weight",  # squeeze-excitation
                    "model.mm_projector.model.mb_block.2.block.2.1.bias"]  # LayerNorm after the projection
    common = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight",
              "lm_head.weight", "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight",
              "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"]
    for name in published_v2 + common:
        assert name in names["mobilevlm-v2"], name
    for name in published_v1 + common:
        assert name in names["mobilevlm-v1"], name


def test_smolvlm_prompt_template_matches_the_processor_for_every_grid(bundle):
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    lay = edgevlm.load(bundle("smolvlm-llama")).manifest.image_layout
    for rows, cols, n in [(0, 0, 4), (1, 3, 4), (2, 2, 1), (3, 1, 2)]:
        ours = tiling.placeholder(lay, "<image>", rows, cols, n, n * (rows * cols + 1))
        ref = get_image_prompt_string(rows, cols, n, fake_token_around_image="<fake_token_around_image>",
                                      image_token="<image>", global_image_token="<global-img>")
        assert ours == ref, (rows, cols)


def test_smolvlm_with_a_patch_grid_whose_step_is_not_exact_in_binary(tmp_path):
    """6 patches a side (as 26 or 27 in Idefics3 and SmolVLM-2.2B): transformers' position ids come from a
    bucketize over a float arange of 1/6 steps, which ONNX Runtime rounds differently; exported as computed, the
    vision graph gathered outside its position table. The export's own parity check must pass."""
    from edgevlm.export.dev.builders import CheckpointSpec, TextDims, VisionDims, build_checkpoint
    from edgevlm.export.exporter import export

    spec = CheckpointSpec("smolvlm", TextDims(arch="llama", hidden=64, heads=4, kv_heads=2),
                          VisionDims(tower="siglip", image_size=48, patch=8, hidden=32, tiles=2),
                          mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), seed=4)
    manifest = export(build_checkpoint(spec, tmp_path / "hf"), tmp_path / "bundle", progress=False, parity_tokens=8)
    parity = manifest.source.parity
    print("parity:", parity)
    assert parity["max_abs_logit_diff"] <= 1e-4 and parity["greedy_match"] and parity["prompt_ids_match"]

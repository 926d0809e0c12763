"""The image-token budget: fewer image rows, spread over the picture; per call, per bundle, on the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edgevlm
from edgevlm import budget
from edgevlm.errors import ArgumentError, BundleError

IMAGE = "edgevlm/assets/examples/shapes-1.png"
QUESTION = "What color is the star?"


def test_every_quadrant_keeps_its_strongest_row():
    rng = np.random.default_rng(7)
    rows = rng.normal(size=(16, 8)).astype(np.float32)
    kept = budget.reduce(rows, 4, (4, 4), "stratified")
    norms = np.linalg.norm(rows, axis=1).reshape(4, 4)
    quads = [norms[r:r + 2, c:c + 2] for r in (0, 2) for c in (0, 2)]
    expected = sorted(int(np.argwhere(norms == q.max())[0] @ [4, 1]) for q in quads)
    assert np.array_equal(kept, rows[expected])


def test_a_global_ranking_can_lose_a_whole_region_stratified_cannot():
    rows = np.ones((16, 4), np.float32)
    rows[:8] *= 10  # the top half of the picture is "salient"
    top = budget.reduce(rows, 4, (4, 4), "topk")
    strat = budget.reduce(rows, 4, (4, 4), "stratified")
    assert (np.linalg.norm(top, axis=1) > 5).all()  # all from the top half
    assert (np.linalg.norm(strat, axis=1) < 5).sum() == 2  # the bottom half keeps its share


def test_methods_and_limits():
    rows = np.arange(24, dtype=np.float32).reshape(6, 4)
    assert budget.reduce(rows, 6) is rows and budget.reduce(rows, 99) is rows
    assert np.array_equal(budget.reduce(rows, 2, None, "first"), rows[:2])
    assert np.allclose(budget.reduce(rows, 2, None, "merge"), [rows[:3].mean(0), rows[3:].mean(0)])
    assert budget.reduce(rows, 3, None, "stratified").shape == (3, 4)
    with pytest.raises(ArgumentError):
        budget.reduce(rows, 0)
    with pytest.raises(ArgumentError):
        budget.reduce(rows, 2, None, "magic")


def test_budget_per_call_shortens_the_prompt_and_keeps_the_full_image_cached():
    vlm = edgevlm.load()
    full = list(vlm.stream(IMAGE, QUESTION, max_tokens=1))[0]
    small = list(vlm.stream(IMAGE, QUESTION, max_tokens=1, max_image_tokens=4))[0]
    assert full.prompt_tokens - small.prompt_tokens == 16 - 4
    assert small.image_cache_hits == 1  # the same picture: only the reduction is new
    assert vlm.generate(IMAGE, QUESTION, max_image_tokens=16) == vlm.generate(IMAGE, QUESTION)


def test_bundle_default_budget_and_override(tmp_path):
    src = edgevlm.model.DEFAULT_BUNDLE
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["generation"]["max_image_tokens"] = 8
    (dst / "manifest.json").write_text(json.dumps(manifest))
    vlm = edgevlm.load(dst)
    r_default = list(vlm.stream(IMAGE, QUESTION, max_tokens=1))[0]
    r_all = list(vlm.stream(IMAGE, QUESTION, max_tokens=1, max_image_tokens=16))[0]
    assert r_all.prompt_tokens - r_default.prompt_tokens == 8
    manifest["generation"]["max_image_tokens"] = 0
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="max_image_tokens"):
        edgevlm.load(dst)


def test_chat_keeps_a_reduced_image_across_turns():
    chat = edgevlm.load().chat()
    first = list(chat.stream(QUESTION, image=IMAGE, max_tokens=4, max_image_tokens=6))
    second = list(chat.stream("How many objects are there?", max_tokens=4))
    assert second[-1].prefilled_tokens < second[-1].prompt_tokens - 6  # the image's rows came from the KV cache
    assert first[0].prompt_tokens < 34


def test_smolvlm_budget_is_shared_by_the_tiles(bundle):
    vlm = edgevlm.load(bundle("smolvlm-llama"))
    arr = np.random.default_rng(3).integers(0, 256, (20, 90, 3), dtype=np.uint8)  # 1 x 3 tiles + global
    _, state, _, _ = vlm.image_state(arr, 8)
    text = vlm._placeholder(state)
    assert len(state["rows"]) == 8 and text.count("<image>") == 8
    assert text.count("<fake_token_around_image>") == 5  # marker tokens untouched
    rs = list(vlm.stream(arr, "what color is the circle?", max_tokens=4, max_image_tokens=8))
    full = list(vlm.stream(arr, "what color is the circle?", max_tokens=4))
    assert rs[-1].finish_reason and rs[0].prompt_tokens < full[0].prompt_tokens  # fewer image rows in the prompt


def test_cli_flag(capsys):
    from edgevlm.apps.chat import main

    assert main(["--image", IMAGE, "--prompt", QUESTION, "--max-image-tokens", "4", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["--image", IMAGE, "--prompt", QUESTION, "--max-image-tokens", "0"]) != 0


def test_hybrid_keeps_a_coverage_floor_and_the_strongest_rows():
    rows = np.ones((16, 4), np.float32)
    rows[:8] *= 10  # the top half is "salient"
    kept = budget.reduce(rows, 4, (4, 4), "hybrid")
    assert kept.shape == (4, 4)
    assert (np.linalg.norm(kept, axis=1) < 5).sum() == 1  # the bottom half keeps one row (floor of 2 runs)

"""Shared fixtures: tiny random-weight checkpoints of each family, built here, exported once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest
from PIL import Image, ImageDraw

from edgevlm.export.dev.builders import CheckpointSpec, TextDims, VisionDims

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

# Several shapes: widths, heads, grouped-query attention, CLIP and SigLIP towers, Qwen2 and Llama.
SPECS = {
    "fastvlm-qwen2-gqa": CheckpointSpec("fast_vlm", TextDims(hidden=64, heads=4, kv_heads=2),
                                        VisionDims(tower="fastvit", image_size=128)),
    "fastvlm-qwen2-mha-tied": CheckpointSpec(
        "fast_vlm", TextDims(hidden=96, heads=6, kv_heads=6, intermediate=192, layers=3, tie_embeddings=True),
        VisionDims(tower="fastvit", image_size=160, embed_dims=(8, 16, 32, 64), layers=(1, 1, 2, 1)), seed=3),
    "llava-clip-llama": CheckpointSpec("llava", TextDims(arch="llama", hidden=64, heads=4, kv_heads=1),
                                       VisionDims(tower="clip", image_size=32, patch=8, hidden=48),
                                       mean=CLIP_MEAN, std=CLIP_STD, seed=1),
    "llava-siglip-qwen2": CheckpointSpec("llava", TextDims(hidden=80, heads=5, kv_heads=5, layers=2),
                                         VisionDims(tower="siglip", image_size=48, patch=12, hidden=32,
                                                    select="full", feature_layer=-2),
                                         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), seed=2),
    # SmolVLM: 32 px tiles (4 x 4 patches, pixel shuffle 2 -> 4 rows a tile), up to 3 x 3 tiles + the global one
    "smolvlm-llama": CheckpointSpec("smolvlm", TextDims(arch="llama", hidden=64, heads=4, kv_heads=2),
                                    VisionDims(tower="siglip", image_size=32, patch=8, hidden=32, tiles=3),
                                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), seed=4),
    # MobileVLM (our PyTorch model, published parameter names): CLIP 4 x 4 patches -> LDPv2 / LDP -> 2 x 2 rows
    "mobilevlm-v2": CheckpointSpec("mobilevlm", TextDims(arch="llama", hidden=64, heads=4, kv_heads=4),
                                   VisionDims(tower="clip", image_size=32, patch=8, hidden=32, feature_layer=-2,
                                              projector="ldpv2"), mean=CLIP_MEAN, std=CLIP_STD, seed=5),
    "mobilevlm-v1": CheckpointSpec("mobilevlm", TextDims(arch="llama", hidden=48, heads=3, kv_heads=1, layers=2),
                                   VisionDims(tower="clip", image_size=48, patch=12, hidden=24, feature_layer=-2,
                                              projector="ldp"), mean=CLIP_MEAN, std=CLIP_STD, seed=6),
    # LLaVA-OneVision: 24 px tiles (4 x 4 rows), grids up to 3 x 3, anyres_max_4 (larger maps are shrunk)
    "onevision-qwen2": CheckpointSpec("llava_onevision", TextDims(hidden=64, heads=4, kv_heads=2),
                                      VisionDims(tower="siglip", image_size=24, patch=6, hidden=32, tiles=3),
                                      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), seed=7),
}


def pytest_report_header(config):
    """The CPU decides int8 kernels (VNNI or not) and float rounding: every run says which it had."""
    import platform

    from edgevlm.cpu import isa

    return f"CPU: {platform.machine()}, ISA {isa()} (edgevlm.cpu.isa)"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> a checkpoint directory, built once per session."""
    from edgevlm.export.dev.builders import build_checkpoint

    made = {}

    def get(name: str):
        if name not in made:
            made[name] = build_checkpoint(SPECS[name], tmp_path_factory.mktemp(name) / "hf")
        return made[name]

    return get


@pytest.fixture(scope="session")
def bundle(checkpoint, tmp_path_factory):
    """bundle(name) -> a bundle directory exported from checkpoint(name), once per session."""
    from edgevlm.export.exporter import export

    made = {}

    def get(name: str):
        if name not in made:
            out = tmp_path_factory.mktemp(name + "-bundle") / "bundle"
            export(checkpoint(name), out, progress=False)
            made[name] = out
        return made[name]

    return get


def scene(kind: int, size=(160, 120)) -> Image.Image:
    """Distinct, structured pictures (random noise all looks alike to a vision tower)."""
    img = Image.new("RGB", size, [(230, 230, 230), (20, 20, 60), (250, 240, 200), (40, 120, 40)][kind % 4])
    d = ImageDraw.Draw(img)
    colours = [(220, 30, 30), (30, 60, 220), (240, 200, 20), (150, 40, 170)]
    w, h = size
    if kind % 2 == 0:
        d.ellipse((w * 0.1, h * 0.2, w * 0.5, h * 0.8), fill=colours[kind % 4])
    else:
        d.rectangle((w * 0.5, h * 0.1, w * 0.9, h * 0.6), fill=colours[kind % 4])
    d.polygon([(w * 0.6, h * 0.9), (w * 0.8, h * 0.5), (w, h * 0.9)], fill=colours[(kind + 1) % 4])
    return img


@pytest.fixture
def images():
    return [scene(k) for k in range(4)]


def np_image(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="session")
def serve(tmp_path_factory):
    """serve(*args) -> base URL (a str with .proc) of an `edgevlm serve --port 0 *args` subprocess on loopback,
    stopped at the end."""
    import re
    import selectors
    import subprocess
    import sys
    import time

    procs = []

    class Url(str):
        proc: subprocess.Popen

    def start(*args: str) -> str:
        log = tmp_path_factory.mktemp("serve") / "stderr.log"
        err = open(log, "w")
        p = subprocess.Popen([sys.executable, "-m", "edgevlm.apps.cli", "serve", "--port", "0", *args],
                             stdout=subprocess.PIPE, stderr=err, text=True)
        procs.append((p, err))
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            if sel.select(timeout=0.5):
                m = re.search(r"http://(127\.0\.0\.1:\d+)/", p.stdout.readline())
                if m:
                    url = Url("http://" + m.group(1))
                    url.proc = p
                    return url
        p.kill()
        raise RuntimeError(f"edgevlm serve did not start: {log.read_text()[-2000:]}")

    yield start
    for p, err in procs:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
        err.close()


# tokens of a long answer: no runtime emits that many within the 3 s deadline (> 10,000 tokens/s, each step
# attending over all the earlier ones), however fast the machine
LONG = 32000


STATIC_CAPACITY, STATIC_CHUNK = 128, 8  # a prompt (16 image rows + text) takes several chunks, the last padded


@pytest.fixture(scope="session")
def static_bundle(checkpoint, tmp_path_factory):
    """`edgevlm export --static` of fastvlm-qwen2-gqa (fixed shapes, a 128-slot KV cache)."""
    from edgevlm.apps.cli import main

    out = tmp_path_factory.mktemp("static") / "bundle"
    assert main(["export", "--from", str(checkpoint("fastvlm-qwen2-gqa")), "--to", str(out), "--static",
                 "--kv-capacity", str(STATIC_CAPACITY), "--prefill-chunk", str(STATIC_CHUNK)]) == 0
    return out


@pytest.fixture(scope="session")
def gguf_bundle(checkpoint, bundle, tmp_path_factory):
    """gguf_bundle(name, quant) -> a bundle with a GGUF decoder (vision reused from the ONNX bundle)."""
    from edgevlm.export.gguf import export_gguf

    made = {}

    def get(name: str, quant: str = "F32"):
        if (name, quant) not in made:
            out = tmp_path_factory.mktemp(f"{name}-{quant}") / "bundle"
            export_gguf(checkpoint(name), out, quant=quant, base_bundle=bundle(name), progress=False)
            made[name, quant] = out
        return made[name, quant]

    return get


@pytest.fixture(scope="session")
def long_bundle(tmp_path_factory):
    """A tiny random-weight LLaVA with an 8k context: its answers can run for seconds on any machine."""
    from edgevlm.export.dev.builders import build_checkpoint
    from edgevlm.export.exporter import export

    spec = CheckpointSpec("llava", TextDims(hidden=80, heads=5, kv_heads=5, layers=2, max_positions=LONG + 192),
                          VisionDims(tower="siglip", image_size=48, patch=12, hidden=32, select="full", feature_layer=-2),
                          mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), seed=2)
    root = tmp_path_factory.mktemp("long")
    export(build_checkpoint(spec, root / "hf"), root / "bundle", progress=False, parity_tokens=4)
    return root / "bundle"


def long_answer(bundle_dir) -> dict:
    """Request fields for an answer that runs to LONG tokens: logit_bias bans the end-of-answer tokens, which
    greedy decoding of random weights may otherwise meet by chance."""
    manifest = json.loads((Path(bundle_dir) / "manifest.json").read_text())
    return {"max_tokens": LONG, "logit_bias": {str(t): -100 for t in manifest["generation"]["eos_token_ids"]}}

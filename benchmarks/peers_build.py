"""The artefacts `benchmarks/peers.py` measures, built once and cached (a gitignored work directory).

A FastVLM-0.5B-shaped checkpoint with RANDOM weights: timm `fastvit_mci3` (the FastViTHD tower that
transformers' `fast_vlm` config names: 5 stages, stride 64, 3072 output channels) + MLP projector + a Qwen2
language model of Qwen2-0.5B's dimensions (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocab
151936, tied embeddings). The tokenizer is a small BPE trained here; the embedding and output matrices keep
the real vocabulary size, which is what decides decode speed.

    ckpt-256/            the checkpoint (export/dev/builders.py; processor at 256 px)
    ckpt-R/              the same weights (hard links), processor and image_seq_length at R px
    onnx-fp32-256/       `edgevlm export --from ckpt-256`  (parity vs PyTorch)
    lm-int8-v10/         int8 language model, fp32 vision: `edgevlm quant --scheme int8 --vision fp32`
    lm-int4-v10/         / `--scheme int4` (quant.api.quantize_bundle itself; see `quantized`)
    lm-int4-b128-v10/    int4 with 128 weights per scale (`--block-size 128`; the default is 32): decode only
    vision-R/            the vision graph at R px (export.graphs.export_vision), checked against PyTorch;
                         vision-256/ holds onnx-fp32-256's graph (a hard link)
    vision-R-int8s/      vision-R's graph int8-static (edgevlm's quantizer, `edgevlm quant`'s int8-static
                         level: QDQ, per-channel int8 weights, uint8 activations calibrated on 4 images) for
                         target npu: plain QDQ, Gelu in float between Dequantize/QuantizeLinear
    vision-R-int8c/      the same for target cpu (`edgevlm quant`'s default for a bundle that is not static):
                         the Gelus between quantized convolutions in uint8 (QLinearSigmoid x QLinearMul)
    onnx-fp32-R/         onnx-fp32-256 with vision-R's graph: the other files are hard links
    onnx-P-R-v10/        P = int8 / int4: lm-P-v10's language model with vision-R-int8c's graph (what
                         `edgevlm quant --scheme P --vision int8-static` writes)
    gguf-Q/              `edgevlm export --format gguf --gguf-quant Q --bundle onnx-fp32-256`

The fixed-size vision graph is why there is one bundle per resolution: the manifest gives the vision graph
one input shape and a fixed number of image tokens, as FastVLM's processor resizes every image to the
tower's size. Every artefact appears atomically (temp name, rename), so an interrupted build resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

RESOLUTIONS = (256, 512, 768, 1024)
PRECISIONS = ("fp32", "int8", "int4")
GGUF_QUANTS = ("Q4_K_M", "Q8_0", "F32")
LM_VERSION = "v10"  # of the quantized language models (v10: edgevlm quant's own code; int8's lm_head 8-bit MatMulNBits)
MAX_LOGIT_DIFF = "1e-2"  # random 24-layer weights: logits of a few units; fp32 ONNX vs PyTorch is ~1e-5


def spec():
    from edgevlm.export.dev.builders import CheckpointSpec, TextDims, VisionDims

    text = TextDims(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab_size=151936,
                    tie_embeddings=True, init_range=0.02, max_positions=32768)
    vision = VisionDims(image_size=RESOLUTIONS[0], timm_arch="fastvit_mci3", stride=64,
                        embed_dims=(96, 192, 384, 768, 1536), layers=(2, 12, 24, 4, 2))
    return CheckpointSpec("fast_vlm", text, vision, seed=0)


def log(msg: str) -> None:
    print(f"[peers build] {msg}", file=sys.stderr, flush=True)


def edgevlm_cli(*args: str) -> None:
    """The `edgevlm` command in a child process (frees the exporter's memory when it ends)."""
    subprocess.run([sys.executable, "-m", "edgevlm.apps.cli", *args], check=True)


def _fresh(path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _link_tree(src: Path, dst: Path, skip: set[str] = frozenset()) -> None:
    for f in src.rglob("*"):
        rel = f.relative_to(src)
        if f.is_file() and str(rel) not in skip:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(f, dst / rel)


def checkpoints(work: Path) -> dict[int, Path]:
    from edgevlm.export.dev.builders import build_checkpoint

    base = work / f"ckpt-{RESOLUTIONS[0]}"
    if not base.exists():
        log(f"building the random-weight checkpoint -> {base.name}")
        tmp = _fresh(base)
        build_checkpoint(spec(), tmp)
        os.replace(tmp, base)
    out = {RESOLUTIONS[0]: base}
    for r in RESOLUTIONS[1:]:
        d = work / f"ckpt-{r}"
        if not d.exists():
            tmp = _fresh(d)
            _link_tree(base, tmp, skip={"config.json", "processor_config.json"})
            cfg = json.loads((base / "config.json").read_text())
            cfg["image_seq_length"] = (r // spec().vision.stride) ** 2
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
            proc = json.loads((base / "processor_config.json").read_text())
            proc["image_processor"]["size"] = {"shortest_edge": r}
            proc["image_processor"]["crop_size"] = {"height": r, "width": r}
            (tmp / "processor_config.json").write_text(json.dumps(proc, indent=2))
            os.replace(tmp, d)
        out[r] = d
    return out


def base_bundles(work: Path, ckpt: Path) -> dict[str, Path]:
    r0 = RESOLUTIONS[0]
    fp32 = work / f"onnx-fp32-{r0}"
    if not fp32.exists():
        log(f"edgevlm export -> {fp32.name}")
        edgevlm_cli("export", "--from", str(ckpt), "--to", str(fp32), "--parity-tokens", "4",
                    "--max-logit-diff", MAX_LOGIT_DIFF)
    out = {"fp32": fp32}
    for p in PRECISIONS[1:]:
        b = work / f"lm-{p}-{LM_VERSION}"
        if not b.exists():
            log(f"quantize {p} (vision stays fp32) -> {b.name}")
            quantized(fp32, b, p)
        out[p] = b
    return out


def quantized(src: Path, dst: Path, level: str, block_size: int | None = None) -> Path:
    """`edgevlm quant --scheme LEVEL --vision fp32 [--block-size N]` itself (quant.api.quantize_bundle; no
    accuracy set: this model has random weights, so its manifest records the first-token logits against fp32
    on the command's 8 verify prompts instead)."""
    from edgevlm.quant import quantize_bundle
    from edgevlm.quant.graphs import Options

    opts = Options() if block_size is None else Options(block_size=block_size)
    m = quantize_bundle(src, dst, level, overrides={"vision": "fp32"}, opts=opts, threads=2)
    log(f"  {level}: first-token logits max |diff| vs fp32 {m.quant.details['fidelity']['max_abs_logit_diff']:.3g}")
    return dst


def vision_graphs(work: Path, ckpts: dict[int, Path]) -> dict[int, Path]:
    """The vision graph at every other resolution, exported with the exporter's own function."""
    todo = [r for r in RESOLUTIONS[1:] if not (work / f"vision-{r}").exists()]
    out = {r: work / f"vision-{r}" for r in RESOLUTIONS[1:]}
    if not todo:
        return out
    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from edgevlm.export import graphs, parity
    from edgevlm.export.adapters import adapter_for
    from edgevlm.image import preprocess

    model = AutoModelForImageTextToText.from_pretrained(ckpts[RESOLUTIONS[0]], dtype=torch.float32).eval()
    adapter = adapter_for("fast_vlm")
    for r in todo:
        log(f"vision graph at {r} px -> vision-{r}")
        tmp = _fresh(out[r])
        processor = AutoProcessor.from_pretrained(ckpts[r])
        pre = adapter.preprocess(processor)
        probe = parity.probe_image()
        pixels = preprocess(np.asarray(probe), pre)
        files = graphs.export_vision(adapter, model, pixels.shape, tmp / "vision.onnx")
        if files != ["vision.onnx"]:
            raise RuntimeError(f"unexpected vision files {files}")
        import onnxruntime as ort

        hf_pixels = processor.image_processor(probe, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            ref = adapter.image_features(model, hf_pixels)[0].numpy()
        sess = ort.InferenceSession(str(tmp / "vision.onnx"), providers=["CPUExecutionProvider"])
        ours = sess.run(None, {sess.get_inputs()[0].name: pixels})[0][0]
        meta = {"resolution": r, "pixel_shape": list(pixels.shape), "image_tokens": int(ours.shape[0]),
                "dim": int(ours.shape[1]), "preprocess": dataclasses.asdict(pre),
                "max_abs_pixel_diff": float(np.abs(pixels - hf_pixels.numpy()).max()),
                "max_abs_vision_diff": float(np.abs(ours - ref).max()), "max_abs_vision_ref": float(np.abs(ref).max())}
        log(f"  vision {r} px: {meta['image_tokens']} tokens, maxdiff vs PyTorch {meta['max_abs_vision_diff']:.3g} "
            f"(|ref| max {meta['max_abs_vision_ref']:.3g}), pixels maxdiff {meta['max_abs_pixel_diff']:.3g}")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out[r])
    return out


def base_vision(work: Path, fp32: Path) -> Path:
    """vision-256/: the base fp32 bundle's own vision graph, with the meta.json the other resolutions have."""
    from edgevlm.bundle import open_bundle

    r0, out = RESOLUTIONS[0], work / f"vision-{RESOLUTIONS[0]}"
    if out.exists():
        return out
    m = open_bundle(fp32).manifest
    vis = m.components["vision"]
    tmp = _fresh(out)
    os.link(fp32 / vis.file, tmp / "vision.onnx")
    par = m.source.parity
    meta = {"resolution": r0, "pixel_shape": list(vis.inputs["pixel_values"]), "image_tokens": m.image_tokens,
            "dim": int(vis.outputs["image_embeds"][-1]), "preprocess": dataclasses.asdict(m.preprocess),
            "max_abs_pixel_diff": par.get("max_abs_pixel_diff"), "max_abs_vision_diff": par.get("max_abs_vision_diff")}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out)
    return out


def vision_int8(vision: Path, target: str = "cpu") -> Path:
    """vision-R-int8c/ (target cpu) or vision-R-int8s/ (target npu): vision-R's graph through `edgevlm quant`'s
    int8-static level (quant.api.resolve and quant.graphs.quantize), calibrated on the parity probe and three noise images, preprocessed as the bundle
    does. The weights are random: this graph is for speed; its output is compared with fp32 in meta.json
    only to show it is the same network."""
    import numpy as np
    import onnx

    from edgevlm.backends.onnx import OnnxGraph
    from edgevlm.export import parity
    from edgevlm.image import preprocess
    from edgevlm.manifest import Preprocess
    from edgevlm.quant.api import component_quant, resolve
    from edgevlm.quant.graphs import Options, weight_nodes
    from edgevlm.quant.graphs import quantize as quantize_graph

    out = vision.with_name(vision.name + {"cpu": "-int8c", "npu": "-int8s"}[target])
    if out.exists():
        return out
    meta = json.loads((vision / "meta.json").read_text())
    pre = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocess"].items()})
    rng = np.random.default_rng(0)
    images = [np.asarray(parity.probe_image())] + [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
                                                   for _ in range(3)]
    model = onnx.load(str(vision / "vision.onnx"))
    name = model.graph.input[0].name
    feeds = [{name: preprocess(im, pre)} for im in images]
    plan, labels = resolve({"vision": model}, "int8-static", {})
    nodes = [n.name for n in weight_nodes(model)]
    log(f"vision {meta['resolution']} px -> int8-static, target {target} ({len(plan['vision'])} of {len(nodes)} "
        "weight nodes)")
    opts = Options(target=target)
    q = quantize_graph(model, plan["vision"], opts, calibration=lambda: iter(feeds))
    tmp = _fresh(out)
    onnx.save(q, str(tmp / "vision.onnx"))
    ref = OnnxGraph("fp32", str(vision / "vision.onnx"), threads=2).run(feeds[0])
    got = OnnxGraph("int8s", str(tmp / "vision.onnx"), threads=2).run(feeds[0])
    a, b = next(iter(ref.values())), next(iter(got.values()))
    meta["quant"] = component_quant(q, nodes, plan["vision"], labels["vision"], opts,
                                    (tmp / "vision.onnx").stat().st_size)
    meta["int8s_vs_fp32"] = {"max_abs_diff": float(np.abs(a - b).max()), "max_abs_fp32": float(np.abs(a).max()),
                             "note": "random weights: speed only"}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out)
    return out


def variant(base: Path, vision: Path, dst: Path) -> Path:
    """Bundle `base` with the vision graph (and preprocessing, image-token count) of `vision`."""
    from edgevlm.bundle import MANIFEST, open_bundle, sha256_file
    from edgevlm.manifest import Preprocess

    if dst.exists():
        return dst
    m = open_bundle(base).manifest
    meta = json.loads((vision / "meta.json").read_text())
    vis = m.components["vision"]
    if vis.data_files or vis.precision != "fp32":
        raise RuntimeError(f"{base.name}: expected a one-file fp32 vision graph")
    tmp = _fresh(dst)
    _link_tree(base, tmp, skip={vis.file, MANIFEST})
    os.link(vision / "vision.onnx", tmp / vis.file)
    pre = meta["preprocess"]
    pre = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in pre.items()})
    n, d = meta["image_tokens"], meta["dim"]
    comp = dataclasses.replace(vis, sha256=sha256_file(tmp / vis.file), inputs={"pixel_values": meta["pixel_shape"]},
                               outputs={"image_embeds": [1, n, d]})
    if "quant" in meta:
        comp = dataclasses.replace(comp, precision=meta["quant"]["scheme"], quant=meta["quant"])
    parity = {**m.source.parity, "max_abs_pixel_diff": meta["max_abs_pixel_diff"],
              "max_abs_vision_diff": meta["max_abs_vision_diff"], "vision_resolution": meta["resolution"]}
    layout = m.image_layout
    if layout is not None and layout.grid is not None:  # the feature grid of this resolution (square tower)
        side = int(round(n ** 0.5))
        layout = dataclasses.replace(layout, grid=(side, n // side))
    new = dataclasses.replace(m, components={**m.components, "vision": comp}, preprocess=pre, image_tokens=n,
                              image_layout=layout, source=dataclasses.replace(m.source, parity=parity))
    (tmp / MANIFEST).write_text(new.to_json(), encoding="utf-8")
    open_bundle(tmp)  # every sha256 holds
    os.replace(tmp, dst)
    return dst


def gguf_bundles(work: Path, ckpt: Path, fp32: Path, quants=GGUF_QUANTS) -> dict[str, Path]:
    out = {}
    for q in quants:
        b = work / f"gguf-{q.lower()}"
        if not b.exists():
            log(f"edgevlm export --format gguf --gguf-quant {q} -> {b.name}")
            edgevlm_cli("export", "--from", str(ckpt), "--to", str(b), "--format", "gguf", "--gguf-quant", q,
                        "--bundle", str(fp32), "--parity-tokens", "4", "--max-logit-diff", MAX_LOGIT_DIFF)
        out[q] = b
    return out


def build(work: Path, gguf_quants=GGUF_QUANTS) -> dict:
    """Everything, cached under work/; returns {"ckpt": {R: dir}, "onnx": {P: {R: bundle}}, "gguf": {Q: bundle}}.
    The int8 and int4 bundles have the int8-static vision graph; the fp32 bundles the fp32 one."""
    work.mkdir(parents=True, exist_ok=True)
    ckpts = checkpoints(work)
    bases = base_bundles(work, ckpts[RESOLUTIONS[0]])
    visions = {RESOLUTIONS[0]: base_vision(work, bases["fp32"]), **vision_graphs(work, ckpts)}
    onnx = {p: {} for p in PRECISIONS}
    for r in RESOLUTIONS:
        onnx["fp32"][r] = bases["fp32"] if r == RESOLUTIONS[0] else variant(bases["fp32"], visions[r],
                                                                              work / f"onnx-fp32-{r}")
        int8c = vision_int8(visions[r], "cpu")
        for p in PRECISIONS[1:]:
            onnx[p][r] = variant(bases[p], int8c, work / f"onnx-{p}-{r}-{LM_VERSION}")
    # decode only: int4 with 128-weight blocks (`edgevlm quant --scheme int4 --block-size 128`) next to the default 32
    r0 = RESOLUTIONS[0]
    b128 = work / f"lm-int4-b128-{LM_VERSION}"
    if not b128.exists():
        log(f"quantize int4, 128-weight blocks (vision stays fp32) -> {b128.name}")
        quantized(bases["fp32"], b128, "int4", block_size=128)
    onnx["int4-b128"] = {r0: b128}
    gguf = gguf_bundles(work, ckpts[r0], bases["fp32"], gguf_quants)
    return {"ckpt": ckpts, "onnx": onnx, "gguf": gguf}


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / ".cache" / "peers"
    print(json.dumps(build(root), default=str, indent=1))

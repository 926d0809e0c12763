"""The artefacts `benchmarks/peers_mtmd.py` measures, built once and cached (a gitignored work directory).

Two random-weight checkpoints built from the real published text files (tests/data/real, export/dev/published.py),
at the real widths, and from each, both runtimes' files:

- **smolvlm**: HuggingFaceTB/SmolVLM-256M-Instruct at full depth (SigLIP-B/16 512 px, 12 layers; pixel shuffle
  x4 -> 64 rows per tile; SmolLM2-135M, 30 layers). Its processor as published but for `size.longest_edge`
  (`EDGE`, 1024 = 2 x 512, a setting SmolVLM's model card offers; the published 2048 cuts a 4:3 photo into
  13 tiles): a 640x480 picture becomes 2 x 2 tiles + the global image, 320 image rows.
- **llava**: llava-hf/llava-1.5-7b-hf's CLIP ViT-L/14-336 at full depth (24 layers, features of the 23rd) and
  MLP projector, with LLaVA-1.5-7B's language model at its real width (4096, 32 heads, MLP 11008, vocabulary
  32064) cut to `LLAVA_TEXT_LAYERS` of its 32 layers.

The tower and projector are re-drawn so that the image decides the answer (export/checkpoints.make_image_matter).

    <model>/ckpt/                checkpoint directory (HF layout: config, tokenizer, processor, safetensors)
    <model>/onnx-fp32/           `edgevlm export --from ckpt` (parity vs PyTorch)
    <model>/onnx-int8/           quantize_bundle(fp32, "int8", vision int8-static): LM int8 dynamic
    <model>/onnx-int8-vdyn/      the same with the vision tower int8 dynamic (which one is faster is measured)
    <model>/onnx-int4-lm/        quantize_bundle(fp32, "int4", vision fp32): LM int4 (MatMulNBits, blocks of 32)
    <model>/onnx-int4/           onnx-int4-lm with onnx-int8's int8-static vision graph
    <model>/gguf/text-F32.gguf   llama.cpp's convert_hf_to_gguf.py --outtype f32, from the same checkpoint
    <model>/gguf/text-Q8_0.gguf, text-Q4_K_M.gguf   llama_model_quantize from text-F32
    <model>/gguf/mmproj-F32.gguf, mmproj-F16.gguf (and mmproj-Q8_0.gguf for SmolVLM)

llama.cpp's converter comes from the llama-cpp-python sdist of the installed version (extracted into the work
directory; never part of this repository). SmolVLM converts as is (`convert_hf_to_gguf.py --mmproj`).
LLaVA-1.5 in llava-hf layout does not: the converter's LlavaVisionModel takes only Pixtral / Mistral towers
("Unsupported model type: clip_vision_model"). Its mmproj is written the way llama.cpp documents for LLaVA-1.5
(docs/multimodal/llava.md): the tower split off as a CLIPVisionModel directory and the projector as a
`llava.projector` file (what llava_surgery does), then `tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py
--clip-model-is-vision --llava-projector`. No file of llama.cpp is patched; the script is run with one stand-in class
(LEGACY_SHIM: transformers 5's CLIPVisionModel lacks the `vision_model` level it expects). Even with --use-f32 it
writes the projector's two matrices (21 M of the mmproj's ~320 M parameters) and the patch embedding in F16.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EDGE = 1024  # SmolVLM: the processor's size.longest_edge (published: 2048)
LLAVA_TEXT_LAYERS = 2  # of LLaVA-1.5-7B's 32 (memory: the fp32 checkpoint, its export and the F32 GGUF at 2.7 GB each)
MODELS = ("smolvlm", "llava")
PRECISIONS = ("fp32", "int8", "int8-vdyn", "int4")
TEXT_QUANTS = ("F32", "Q8_0", "Q4_K_M")
MMPROJ = {"smolvlm": ("F32", "F16", "Q8_0"), "llava": ("F32", "F16")}
CALIB_N = {"smolvlm": 32, "llava": 8}  # quantize_bundle's calibration prompts (its default: 32)
MAX_LOGIT_DIFF = "5e-2"  # export parity, fp32 ONNX vs PyTorch, random full-depth weights (logits of several units)


def log(msg: str) -> None:
    print(f"[peers_mtmd build] {msg}", file=sys.stderr, flush=True)


def _fresh(path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _run(*args: str, env: dict | None = None) -> None:
    subprocess.run([*args], check=True, env={**os.environ, **(env or {})})


# ---- llama.cpp's converter, from the sdist -----------------------------------------------------------------


def llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def converter(work: Path, sdist: Path | None = None) -> Path:
    """llama.cpp's conversion scripts of the installed llama-cpp-python version, extracted from its sdist into
    work/llama.cpp-<version>/ (convert_hf_to_gguf.py, conversion/, gguf-py/, tools/mtmd/legacy-models/).
    Without `sdist`, pip downloads it (`pip download --no-binary :all: --no-deps llama-cpp-python==<version>`)."""
    version = llama_cpp_version()
    out = work / f"llama.cpp-{version}"
    if (out / "convert_hf_to_gguf.py").is_file():
        return out
    if sdist is None:
        sdist = work / f"llama_cpp_python-{version}.tar.gz"
        if not sdist.is_file():
            log(f"pip download llama-cpp-python=={version} (sdist) -> {work}")
            _run(sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--no-build-isolation",
                 "-d", str(work), f"llama-cpp-python=={version}")
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "tools/mtmd/legacy-models/")
    tmp = _fresh(out)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            rel = member.name[len(prefix):] if member.name.startswith(prefix) else None
            if rel and rel.startswith(keep) and member.isfile():
                member.name = rel
                tar.extract(member, tmp, filter="data")
    if not (tmp / "convert_hf_to_gguf.py").is_file():
        raise RuntimeError(f"{sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py")
    os.replace(tmp, out)
    return out


def _convert(conv: Path, *args: str) -> None:
    """convert_hf_to_gguf.py with the sdist's own gguf-py (what the script itself puts first on its path)."""
    _run(sys.executable, str(conv / "convert_hf_to_gguf.py"), *args)


# ---- checkpoints -------------------------------------------------------------------------------------------


def checkpoint(model: str, work: Path) -> Path:
    out = work / model / "ckpt"
    if out.exists():
        return out
    sys.path.insert(0, str(ROOT))
    from edgevlm.export.dev.published import Cut, build_from_published
    from tests.real_checkpoints import CHECKPOINTS, REAL

    name, cut = {"smolvlm": ("smolvlm-256m", Cut(30, 12)), "llava": ("llava-1.5-7b", Cut(LLAVA_TEXT_LAYERS, 24))}[model]
    real = CHECKPOINTS[name]
    log(f"{model}: random-weight checkpoint of {real.hub_id} ({cut}) -> {out}")
    tmp = _fresh(out)
    build_from_published(REAL / real.files, tmp, cut, tokenizer_from=real.tokenizer_from, seed=0)
    if model == "smolvlm":  # the one processor setting changed: see the module docstring
        p = tmp / "preprocessor_config.json"
        cfg = json.loads(p.read_text())
        cfg["size"] = {"longest_edge": EDGE}
        p.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, out)
    return out


# ---- our bundles -------------------------------------------------------------------------------------------


def edgevlm_cli(*args: str) -> None:
    """The `edgevlm` command in a child process (frees the exporter's memory when it ends)."""
    _run(sys.executable, "-m", "edgevlm.apps.cli", *args)


def onnx_bundles(model: str, work: Path, ckpt: Path) -> dict[str, Path]:
    d = work / model
    fp32 = d / "onnx-fp32"
    if not fp32.exists():
        log(f"{model}: edgevlm export -> {fp32}")
        edgevlm_cli("export", "--from", str(ckpt), "--to", str(fp32), "--parity-tokens", "4",
                    "--max-logit-diff", MAX_LOGIT_DIFF)
    # int8: the language model int8 dynamic, the tower int8-static (calibrated) or int8 dynamic (int8-vdyn);
    # int4: the language model int4, the tower the int8 bundle's int8-static graph (what quantize_bundle writes
    # for "int4" with the tower at int8-static and the same calibration, without calibrating twice)
    plan = {"int8": ("int8", "int8-static", CALIB_N[model]), "int8-vdyn": ("int8", "int8", 8),
            "int4-lm": ("int4", "fp32", 8)}
    for p, (scheme, vision, calib_n) in plan.items():
        b = d / f"onnx-{p}"
        if not b.exists():
            log(f"{model}: quantize_bundle {scheme}, vision {vision} -> {b.name}")
            quantized(fp32, b, scheme, vision, calib_n)
    if not (d / "onnx-int4").exists():
        with_vision(d / "onnx-int4-lm", d / "onnx-int8", d / "onnx-int4")
    return {p: d / f"onnx-{p}" for p in PRECISIONS}


def quantized(src: Path, dst: Path, scheme: str, vision: str, calib_n: int) -> None:
    """`edgevlm quant --scheme SCHEME --vision VISION` (quantize_bundle; target cpu, 7-bit portable int8 weights),
    in a child process: the quantizer holds the fp32 graphs and their copies. calib_n: calibration prompts (the
    int8-static tower's activation ranges; onnxruntime's calibrator holds every quantized node's activations
    of every calibration image in memory, ~0.45 GB per CLIP-L image)."""
    code = ("import sys; from edgevlm.quant import quantize_bundle; "
            "m = quantize_bundle(sys.argv[1], sys.argv[2], sys.argv[3], overrides={'vision': sys.argv[4]}, "
            "calib_n=int(sys.argv[5]), threads=2); "
            "print('first-token logits max |diff| vs fp32', m.quant.details['fidelity']['max_abs_logit_diff'], "
            "file=sys.stderr)")
    _run(sys.executable, "-c", code, str(src), str(dst), scheme, vision, str(calib_n))


def with_vision(base: Path, donor: Path, dst: Path) -> None:
    """Bundle `base` with `donor`'s vision graph and manifest entry (hard links; every sha256 checked)."""
    import dataclasses

    from edgevlm.bundle import MANIFEST, open_bundle

    m, v = open_bundle(base).manifest, open_bundle(donor).manifest.components["vision"]
    tmp = _fresh(dst)
    skip = {m.components["vision"].file, MANIFEST}
    for f in base.rglob("*"):
        rel = str(f.relative_to(base))
        if f.is_file() and rel not in skip:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(f, tmp / rel)
    for r in (v, *v.data_files):
        os.link(donor / r.file, tmp / r.file)
    new = dataclasses.replace(m, components={**m.components, "vision": v})
    (tmp / MANIFEST).write_text(new.to_json(), encoding="utf-8")
    open_bundle(tmp)
    os.replace(tmp, dst)


# ---- llama.cpp's files -------------------------------------------------------------------------------------


def gguf_files(model: str, work: Path, ckpt: Path, conv: Path) -> dict[str, Path]:
    """text-<Q>.gguf and mmproj-<T>.gguf, converted from `ckpt` by llama.cpp's own scripts."""
    from edgevlm.export.gguf import quantize

    d = work / model / "gguf"
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    f32 = d / "text-F32.gguf"
    if not f32.exists():
        log(f"{model}: convert_hf_to_gguf.py --outtype f32 -> {f32.name}")
        _convert(conv, str(ckpt), "--outtype", "f32", "--outfile", str(d / ".text-F32.gguf"))
        os.replace(d / ".text-F32.gguf", f32)
    out["text-F32"] = f32
    for q in TEXT_QUANTS[1:]:
        f = d / f"text-{q}.gguf"
        if not f.exists():
            log(f"{model}: llama_model_quantize {q} -> {f.name}")
            quantize(f32, d / f".text-{q}.gguf", q, threads=2)
            os.replace(d / f".text-{q}.gguf", f)
        out[f"text-{q}"] = f
    for t in MMPROJ[model]:
        f = d / f"mmproj-{t}.gguf"
        if not f.exists():
            log(f"{model}: mmproj {t} -> {f.name}")
            tmp = d / f".mmproj-{t}.gguf"
            if model == "llava":
                _llava_mmproj(ckpt, conv, tmp, t)
            else:
                _convert(conv, str(ckpt), "--mmproj", "--outtype", t.lower(), "--outfile", str(tmp))
            os.replace(tmp, f)
        out[f"mmproj-{t}"] = f
    return out


# convert_image_encoder_to_gguf.py was written for transformers 4, whose CLIPVisionModel holds the tower under
# `.vision_model` (it pops `model.vision_model.encoder.layers[-1]` and names tensors from "vision_model.*"); in
# transformers 5 the tower is the model itself. The script runs unchanged, its CLIPVisionModel replaced by a
# stand-in that restores that level.
LEGACY_SHIM = """
import runpy, sys, torch, transformers
Tower = transformers.CLIPVisionModel
class CLIPVisionModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.vision_model = inner
    @classmethod
    def from_pretrained(cls, path):
        return cls(Tower.from_pretrained(path))
setattr(sys.modules["transformers"], "CLIPVisionModel", CLIPVisionModel)  # the module `from transformers import` reads
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _llava_mmproj(ckpt: Path, conv: Path, dst: Path, kind: str) -> None:
    """LLaVA-1.5's mmproj the way llama.cpp documents it: the CLIP tower as its own CLIPVisionModel directory,
    the projector as llava.projector, then legacy-models/convert_image_encoder_to_gguf.py."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    split = dst.parent / ".llava-split"
    shutil.rmtree(split, ignore_errors=True)
    (split / "vision").mkdir(parents=True)
    from transformers import CLIPVisionConfig

    cfg = json.loads((ckpt / "config.json").read_text())
    # the published config gives only what differs from CLIPVisionConfig's defaults; the script reads every field
    vision_cfg = {**CLIPVisionConfig(**cfg["vision_config"]).to_dict(), "architectures": ["CLIPVisionModel"]}
    (split / "vision" / "config.json").write_text(json.dumps(vision_cfg, indent=2))
    tower, projector = {}, {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                if name.startswith("vision_tower.vision_model."):  # transformers 5's CLIPVisionModel names
                    tower[name[len("vision_tower.vision_model."):]] = st.get_tensor(name)
                elif name.startswith("multi_modal_projector."):
                    projector[name] = st.get_tensor(name)
    save_file({k: v.contiguous() for k, v in tower.items()}, str(split / "vision" / "model.safetensors"),
              metadata={"format": "pt"})
    torch.save(projector, split / "llava.projector")
    script = conv / "tools" / "mtmd" / "legacy-models" / "convert_image_encoder_to_gguf.py"
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    args = [sys.executable, str(script), "-m", str(split / "vision"), "--clip-model-is-vision",
            "--llava-projector", str(split / "llava.projector"), "--output-dir", str(split / "out"),
            "--image-mean", *map(str, pre["image_mean"]), "--image-std", *map(str, pre["image_std"])]
    if kind == "F32":
        args.append("--use-f32")
    _run(sys.executable, "-c", LEGACY_SHIM, *args[1:], env={"PYTHONPATH": str(conv / "gguf-py")})
    made = list((split / "out").glob("mmproj-*.gguf"))
    if len(made) != 1:
        raise RuntimeError(f"legacy converter wrote {made}")
    os.replace(made[0], dst)
    shutil.rmtree(split)


# ---- everything ----------------------------------------------------------------------------------------------


def build(work: Path, models=MODELS, sdist: Path | None = None) -> dict:
    """{model: {"ckpt": dir, "onnx": {P: bundle}, "gguf": {name: file}}}, building what is missing."""
    work.mkdir(parents=True, exist_ok=True)
    conv = converter(work, sdist)
    out = {}
    for model in models:
        ckpt = checkpoint(model, work)
        out[model] = {"ckpt": ckpt, "gguf": gguf_files(model, work, ckpt, conv),
                      "onnx": onnx_bundles(model, work, ckpt)}
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="build (or find) the artefacts of benchmarks/peers_mtmd.py")
    ap.add_argument("--work", type=Path, default=HERE / ".cache" / "peers_mtmd")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sdist", type=Path, help="llama-cpp-python's sdist (default: pip download it)")
    a = ap.parse_args()
    print(json.dumps(build(a.work, a.models.split(","), a.sdist), default=str, indent=1))

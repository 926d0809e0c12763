"""Quantization: every scheme writes a bundle that verifies, loads, answers and stays close to fp32."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import edgevlm
from edgevlm.bundle import open_bundle
from edgevlm.quant import QuantError, quantize_bundle
from edgevlm.quant import api as quant_api
from edgevlm.quant import calib

NAME = "fastvlm-qwen2-gqa"  # FastViT (Conv) tower + Qwen2 with grouped-query attention
FAST = dict(calib_n=6, eval_n=8)
# max |first-token logit diff| vs fp32 on the tiny random model, relative to max |fp32 logit|
TOLERANCE = {"fp16": 0.005, "int8": 0.1, "int8-static": 0.15, "int4": 0.35}


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def ops(root: Path, comp) -> set[str]:
    return {n.op_type for n in onnx.load(str(root / comp.file)).graph.node}


@pytest.fixture(scope="module")
def src(bundle):
    return bundle(NAME)


@pytest.fixture(scope="module")
def ref(src):
    return edgevlm.load(src, threads=1)


def logit_diff(ref, root: Path) -> tuple[float, float]:
    """(max |logit diff|, max |fp32 logit|) over a few prompts the calibration did not see."""
    q = edgevlm.load(root, threads=1)
    pairs = [(calib.first_logits(ref, im, qu), calib.first_logits(q, im, qu))
             for im, qu, _ in calib.examples(calib.CALIB_SEED + 1, 4)]
    return float(max(np.abs(a - b).max() for a, b in pairs)), float(max(np.abs(a).max() for a, _ in pairs))


EXPECT = {  # component -> ops that must appear, per scheme
    # int8 decoder: the lm_head (one row per run) as 8-bit MatMulNBits, the rest dynamic
    "int8": {"vision": {"ConvInteger", "DynamicQuantizeLinear"},
             "decoder": {"MatMulInteger", "DynamicQuantizeLinear", "MatMulNBits"},
             "embed": {"DequantizeLinear"}},
    "int8-static": {"vision": {"QuantizeLinear", "DequantizeLinear"}, "decoder": {"QuantizeLinear", "DequantizeLinear"}},
    "int4": {"decoder": {"MatMulNBits"}, "embed": {"GatherBlockQuantized"}},
    "fp16": {},
}


@pytest.mark.parametrize("scheme", ["fp16", "int8", "int8-static", "int4"])
def test_scheme_writes_a_verified_bundle_close_to_fp32(src, ref, tmp_path, scheme):
    before = tree_hash(src)
    out = tmp_path / scheme
    m = quantize_bundle(src, out, scheme, **FAST)
    assert tree_hash(src) == before, "the source bundle changed"
    b = open_bundle(out)  # every sha256 verifies
    assert b.manifest == m and m.quant.scheme == scheme
    d = m.quant.details
    assert d["bytes"] == sum((out / r.file).stat().st_size for r in m.files())
    assert d["source_bytes"] > d["bytes"] and "accuracy" not in d  # a random test bundle has no eval set
    for name, comp in m.components.items():
        assert comp.quant["scheme"] == comp.precision
        assert comp.quant["bytes"] == (out / comp.file).stat().st_size
        assert comp.sha256 != open_bundle(src).manifest.components[name].sha256
        assert EXPECT[scheme].get(name, set()) <= ops(out, comp), (name, ops(out, comp))
    if scheme == "int8-static":  # not a static bundle: target auto = cpu, FastViT's Gelus run in uint8
        assert d["options"]["target"] == "cpu"
        gelus = {r: sum(n.op_type == "Gelu" for n in onnx.load(str(r / m_.components["vision"].file)).graph.node)
                 for r, m_ in ((src, open_bundle(src).manifest), (out, m))}
        assert {"QLinearSigmoid", "QLinearMul"} <= ops(out, m.components["vision"])
        print(f"Gelu ops in the vision graph: fp32 {gelus[src]}, int8-static {gelus[out]} (the rest run in uint8)")
        assert gelus[out] < gelus[src]  # a Gelu after a float Add (not a quantized node) stays float
    if scheme == "int4":  # Conv has no 4-bit kernel: the vision tower goes fp16
        assert m.components["vision"].precision == "fp16" and m.components["decoder"].quant["block_size"] == 32
        assert m.components["decoder"].quant["bits"] == [4]
    diff, scale = logit_diff(ref, out)
    print(f"{scheme}: first-token logits maxdiff = {diff:.4g} = {diff / scale:.4f} of max |logit| {scale:.3g} "
          f"(tolerance {TOLERANCE[scheme]})")
    assert diff < TOLERANCE[scheme] * scale
    assert d["fidelity"]["max_abs_logit_diff"] < TOLERANCE[scheme] * scale
    rs = list(edgevlm.load(out).stream(calib.examples(1, 1)[0][0], "what is it?", max_tokens=4))
    assert rs[-1].finish_reason and len(rs) <= 4 and all(0 <= r.token < m.vocab_size for r in rs)


def test_fp16_has_fp16_weights_and_fp32_io(src, tmp_path):
    m = quantize_bundle(src, tmp_path / "h", "fp16", **FAST)
    for comp in m.components.values():
        g = onnx.load(str(tmp_path / "h" / comp.file)).graph
        big = [t for t in g.initializer if np.prod(t.dims) >= 64]
        assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big), comp.file
        for v in list(g.input) + list(g.output):
            assert v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64), v.name


def test_int4_block_size_and_symmetry(src, tmp_path):
    m = quantize_bundle(src, tmp_path / "s", "int4", overrides={"vision": "int8"},
                        opts=quant_api.Options(block_size=16, symmetric=True), **FAST)
    dec = onnx.load(str(tmp_path / "s" / m.components["decoder"].file)).graph
    nbits = [n for n in dec.node if n.op_type == "MatMulNBits"]
    assert nbits and all(a.i == 16 for n in nbits for a in n.attribute if a.name == "block_size")
    assert all(len(n.input) == 3 for n in nbits)  # A, B, scales: no zero points when symmetric
    q = m.components["decoder"].quant
    assert (q["block_size"], q["symmetric"]) == (16, True)
    assert m.components["vision"].precision == "int8" and m.quant.scheme == "custom"


def test_failure_midway_leaves_nothing(src, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(quant_api, "verify", boom)
    before = tree_hash(src)
    with pytest.raises(RuntimeError, match="injected"):
        quantize_bundle(src, tmp_path / "out", "int8", **FAST)
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its temp dir
    assert tree_hash(src) == before


def test_mixed_search_meets_budget_and_writes_pareto(bundle, tmp_path):
    # a CLIP tower (MatMul only): the search's per-node probes stay fast; Conv probes run in the demo benchmark
    src = bundle("llava-clip-llama")
    report = tmp_path / "report" / "pareto"
    m = quantize_bundle(src, tmp_path / "mixed", "mixed", budget=0.5, report=report, calib_n=8, eval_n=12)
    s = m.quant.details["search"]
    print("search:", json.dumps(s["chosen"]), "target", s["target"])
    assert s["metric"] == "agreement" and s["chosen"]["accuracy"] >= s["target"] == pytest.approx(0.5 * s["fp32"], abs=1e-4)
    data = json.loads(report.with_suffix(".json").read_text())
    print(*(f"{p['label']}: {p['bytes']} B, agreement {p['accuracy']:.3f}" for p in data["points"]), sep="\n")
    assert any(p["chosen"] for p in data["points"]) and any(p["pareto"] for p in data["points"])
    chosen = next(p for p in data["points"] if p["chosen"])  # passed the search set AND the confirmation set
    assert chosen["accepted"] and chosen["confirm"] >= s["confirm"]["target"] and s["confirm"]["n"] == 12
    assert all(p["confirm"] is None or p["accepted"] == (p["confirm"] >= s["confirm"]["target"])
               for p in data["points"] if p["accuracy"] >= s["target"])
    assert {r["component"] for r in data["sensitivity"]} >= {"vision", "decoder"}
    assert report.with_suffix(".png").stat().st_size > 1000 and "chosen" in report.with_suffix(".md").read_text()
    assert m.quant.details["bytes"] < m.quant.details["source_bytes"]
    assert any(c.quant and c.quant["nodes"] for c in m.components.values())
    edgevlm.load(tmp_path / "mixed").generate(calib.examples(2, 1)[0][0], "what?", max_tokens=3)


def test_cli_quant_override_and_errors(src, tmp_path, capsys):
    from edgevlm.apps.cli import main

    out = tmp_path / "b"
    argv = ["quant", "--bundle", str(src), "--to", str(out), "--scheme", "int4", "--vision", "fp16", "--decoder",
            "int8", "--calib-n", "4", "--json"]
    assert main(argv) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["components"] == {"vision": "fp16", "embed": "int4", "decoder": "int8"}
    assert main(argv) == 1 and "already exists" in capsys.readouterr().err  # no --force
    assert main(["quant", "--bundle", str(src), "--to", str(tmp_path / "c"), "--scheme", "int4", "--block-size", "24"]) == 1
    assert "--block-size" in capsys.readouterr().err and not (tmp_path / "c").exists()
    with pytest.raises(QuantError, match="no component"):
        quantize_bundle(src, tmp_path / "d", "int8", overrides={"compressor": "int8"})


def _external_embed(root: Path) -> None:
    """Move the demo copy's embed weights into embed.onnx.data (external data), manifest re-hashed."""
    model = onnx.load(str(root / "embed.onnx"))
    onnx.save_model(model, str(root / "embed.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="embed.onnx.data", size_threshold=0)
    m = json.loads((root / "manifest.json").read_text())
    comp = m["components"]["embed"]
    comp["sha256"] = hashlib.sha256((root / "embed.onnx").read_bytes()).hexdigest()
    comp["data_files"] = [{"file": "embed.onnx.data",
                           "sha256": hashlib.sha256((root / "embed.onnx.data").read_bytes()).hexdigest()}]
    (root / "manifest.json").write_text(json.dumps(m))


def test_external_data_is_read_from_the_verified_bytes(tmp_path):
    """A source whose weights sit in a data file — hard-linked elsewhere too (onnx's own loader refuses that) —
    quantizes; a data reference past the end of its (verified, re-hashed) file is a QuantError."""
    import shutil

    from edgevlm.model import DEFAULT_BUNDLE

    src = tmp_path / "src"
    shutil.copytree(DEFAULT_BUNDLE, src)
    _external_embed(src)
    (tmp_path / "elsewhere.data").hardlink_to(src / "embed.onnx.data")
    m = quantize_bundle(src, tmp_path / "q", "int8", calib_n=4)
    assert m.components["embed"].precision == "int8" and not m.components["embed"].data_files
    image, question, *_ = calib.examples(1, 1)[0]
    assert edgevlm.load(tmp_path / "q").generate(image, question, max_tokens=3) == \
        edgevlm.load(src).generate(image, question, max_tokens=3)
    model = onnx.load(str(src / "embed.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "length":
                e.value = str(int(e.value) + 4096)
    (src / "embed.onnx").write_bytes(model.SerializeToString())
    man = json.loads((src / "manifest.json").read_text())
    man["components"]["embed"]["sha256"] = hashlib.sha256((src / "embed.onnx").read_bytes()).hexdigest()
    (src / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(QuantError, match="reads bytes"):
        quantize_bundle(src, tmp_path / "q2", "int8", calib_n=4)
    assert not (tmp_path / "q2").exists()

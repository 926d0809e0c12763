"""CoreML: export verified by reading the specs back (Linux); prediction tests run on macOS only."""

from __future__ import annotations

import json
import platform

import pytest

import coremltools as ct  # (the dev extra installs it: missing, the tests fail)

import edgevlm  # noqa: E402
from edgevlm.errors import BackendError  # noqa: E402
from edgevlm.export.coreml import describe, export_coreml  # noqa: E402

from conftest import scene  # noqa: E402

NAME = "fastvlm-qwen2-gqa"
ON_MAC = platform.system() == "Darwin"


@pytest.fixture(scope="module")
def coreml_bundle(checkpoint, bundle, tmp_path_factory):
    made = {}

    def get(quant: str = "none"):
        if quant not in made:
            out = tmp_path_factory.mktemp(f"coreml-{quant}") / "bundle"
            export_coreml(checkpoint(NAME), out, quant=quant, base_bundle=bundle(NAME), progress=False, context=256)
            made[quant] = out
        return made[quant]

    return get


def test_coreml_export_reads_back_as_fp16_programs_with_kv_state(coreml_bundle, bundle):
    out = coreml_bundle()
    m = json.loads((out / "manifest.json").read_text())
    base = json.loads((bundle(NAME) / "manifest.json").read_text())
    comps = m["components"]
    assert {k: c["backend"] for k, c in comps.items()} == {"vision": "coreml", "embed": "onnx", "decoder": "coreml"}
    assert comps["vision"]["precision"] == comps["decoder"]["precision"] == "fp16"
    assert m["generation"]["context_length"] == 256
    figures = m["source"]["parity"]["coreml"]
    print(f"stateful decoder wrapper vs HF: maxdiff = {figures['decoder_wrapper_max_abs_logit_diff']:.3g}")
    assert figures["decoder_wrapper_max_abs_logit_diff"] < 1e-3

    vis = describe(out / "vision.mlpackage")
    pixel_shape = base["components"]["vision"]["inputs"]["pixel_values"]
    assert vis["inputs"]["pixel_values"]["shape"] == pixel_shape and not vis["inputs"]["pixel_values"]["ranges"]
    assert list(vis["outputs"]) == ["image_embeds"]
    assert vis["op_output_dtypes"].get("FLOAT16", 0) > 10 * vis["op_output_dtypes"].get("FLOAT32", 0)
    assert vis["ops"].get("conv", 0) > 5 and vis["opset"].startswith("CoreML")

    dec = describe(out / "decoder.mlpackage")
    layers, heads, head_dim = comps["decoder"]["num_layers"], comps["decoder"]["kv"]["heads"], comps["decoder"]["kv"]["head_dim"]
    for name in ("k_cache", "v_cache"):
        assert dec["states"][name]["shape"] == [layers, 1, heads, 256, head_dim]
        assert dec["states"][name]["dtype"] == "FLOAT16"
    assert set(dec["inputs"]) == {"inputs_embeds", "position_ids", "causal_mask"}
    assert dec["inputs"]["inputs_embeds"]["ranges"][1] == (1, 256)  # flexible sequence length
    for op in ("read_state", "write_state", "slice_update"):  # the cache is read and written in place, per layer
        assert dec["ops"].get(op, 0) >= 2 * layers, (op, dec["ops"])
    print("vision ops:", vis["ops"], "\ndecoder ops:", dec["ops"])


@pytest.mark.parametrize("quant,op", [("int8", "constexpr_blockwise_shift_scale"), ("palette4", "constexpr_lut_to_dense")])
def test_coreml_compression_shows_in_the_spec(coreml_bundle, quant, op):
    out = coreml_bundle(quant)
    dec, plain = describe(out / "decoder.mlpackage"), describe(coreml_bundle() / "decoder.mlpackage")
    assert dec["ops"].get(op, 0) >= 7 and plain["ops"].get(op, 0) == 0  # 7 matrices per layer
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())  # noqa: E731
    assert size(out / "decoder.mlpackage") < size(coreml_bundle() / "decoder.mlpackage")
    assert json.loads((out / "manifest.json").read_text())["quant"]["scheme"] == f"coreml-{quant}"


@pytest.mark.skipif(ON_MAC, reason="on macOS the bundle runs (see the next test)")
def test_coreml_bundle_says_it_needs_macos(coreml_bundle):
    with pytest.raises(BackendError, match="macOS"):
        edgevlm.load(coreml_bundle())


@pytest.mark.skipif(not ON_MAC, reason="CoreML prediction needs macOS; on Linux the export is verified by its spec")
def test_coreml_bundle_runs_and_follows_onnx(coreml_bundle, bundle):
    ref, vlm = edgevlm.load(bundle(NAME)), edgevlm.load(coreml_bundle())
    a = [r.token for r in ref.stream(scene(0), "describe the image.", max_tokens=8)]
    b = [r.token for r in vlm.stream(scene(0), "describe the image.", max_tokens=8)]
    assert a[:2] == b[:2]  # fp16 end to end: the first tokens agree
    chat = vlm.chat()
    chat.send("what color is the circle?", image=scene(1), max_tokens=4)
    r = list(chat.stream("and the square?", max_tokens=4))[-1]
    assert r.prefilled_tokens < r.prompt_tokens

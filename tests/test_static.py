"""Static-shape (NPU-ready) bundles: `edgevlm export --static`, run by the runtime over a fixed-capacity KV cache,
against the dynamic bundle of the same checkpoint."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import edgevlm
from edgevlm.errors import BundleError, ContextOverflowError
from edgevlm.export.graphs import graph_shapes

from conftest import STATIC_CAPACITY as CAPACITY, STATIC_CHUNK as CHUNK  # noqa: E402,F401

NAME = "fastvlm-qwen2-gqa"


def _all_static(bundle) -> dict:
    m = json.loads((bundle / "manifest.json").read_text())
    for name, c in m["components"].items():
        ins, outs = graph_shapes(bundle / c["file"])
        for t, dims in {**ins, **outs}.items():
            assert all(isinstance(d, int) and d > 0 for d in dims), f"{name}.{t} has dims {dims}"
        assert ins == c["inputs"] and outs == c["outputs"]  # the manifest states what the graph declares
    return m


def test_every_graph_has_fixed_shapes_and_the_manifest_declares_them(static_bundle):
    m = _all_static(static_bundle)
    c = m["components"]
    assert c["decoder"]["static"] == {"chunk": 1, "kv_capacity": CAPACITY}
    assert c["prefill"]["static"] == {"chunk": CHUNK, "kv_capacity": CAPACITY}
    assert c["embed"]["inputs"]["input_ids"] == [1, CHUNK]
    assert c["prefill"]["inputs"]["attention_mask"] == [1, CAPACITY + CHUNK]
    assert c["prefill"]["inputs"]["past_key_values.0.key"][2] == CAPACITY
    assert c["prefill"]["outputs"]["present.0.key"][2] == CHUNK and c["decoder"]["outputs"]["logits"][:2] == [1, 1]
    assert m["generation"]["context_length"] == CAPACITY
    print("parity vs PyTorch:", m["source"]["parity"])
    assert m["source"]["parity"]["greedy_match"] and m["source"]["parity"]["max_abs_logit_diff"] < 1e-4


def test_static_bundle_matches_the_dynamic_one(static_bundle, bundle, images):
    dyn, st = edgevlm.load(bundle(NAME)), edgevlm.load(static_bundle)
    assert type(st.decoder).__name__ == "StaticDecoder" and st.context_length == CAPACITY
    rng = np.random.default_rng(0)
    worst, outs = 0.0, []
    for image in images[:3]:
        for arr in st.decoder.cache.k + st.decoder.cache.v:  # garbage in the free slots: the mask must keep it out
            arr[...] = 100 * rng.standard_normal(arr.shape)
        a, b = dyn.prompt_logits(image, "what is it?"), st.prompt_logits(image, "what is it?")
        worst = max(worst, float(np.abs(a - b).max()))
        ta = [r.token for r in dyn.stream(image, "what is it?", max_tokens=20)]
        tb = [r.token for r in st.stream(image, "what is it?", max_tokens=20)]
        assert ta == tb
        outs.append(tuple(ta))
    print(f"static vs dynamic: logits maxdiff = {worst:.3g}")
    assert worst <= 1e-4
    assert len(set(outs)) >= 2  # the image decides the answer


def test_chat_reuses_the_static_cache_and_overflows_cleanly(static_bundle, bundle, images):
    dyn, st = edgevlm.load(bundle(NAME)), edgevlm.load(static_bundle)
    a, b = dyn.chat(), st.chat()
    assert a.send("what is it?", image=images[0], max_tokens=6) == b.send("what is it?", image=images[0], max_tokens=6)
    r = list(b.stream("and then?", max_tokens=6))
    assert r[-1].prefilled_tokens < r[-1].prompt_tokens  # the first turn came from the cache
    assert "".join(x.text for x in r) == a.send("and then?", max_tokens=6)
    with pytest.raises(ContextOverflowError):
        st.generate(images[1], "tell me " * 80, max_tokens=4)
    assert st.generate(images[1], "what is it?", max_tokens=4) == dyn.generate(images[1], "what is it?", max_tokens=4)


def test_int8_static_qdq_keeps_a_static_bundle_static(static_bundle, tmp_path):
    from edgevlm.quant import quantize_bundle

    m = quantize_bundle(static_bundle, tmp_path / "qdq", "int8-static", calib_n=4)
    assert m.is_static and {m.components[c].precision for c in ("vision", "prefill", "decoder")} == {"int8-static"}
    _all_static(tmp_path / "qdq")
    for name in ("vision", "prefill", "decoder"):
        ops = {n.op_type for n in onnx.load(str(tmp_path / "qdq" / m.components[name].file)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, name
        assert not {n.domain for n in onnx.load(str(tmp_path / "qdq" / m.components[name].file)).graph.node
                    } - {"", "ai.onnx"}, f"{name}: a contrib op in an NPU-target graph"
    assert m.quant.details["options"]["target"] == "npu"  # target auto on a static bundle
    f = m.quant.details["fidelity"]
    print("QDQ static bundle fidelity:", f)
    assert np.isfinite(f["max_abs_logit_diff"]) and f["mean_kl"] < 0.5
    q = edgevlm.load(tmp_path / "qdq")
    rs = list(q.stream(None, "hello", max_tokens=3))
    assert type(q.decoder).__name__ == "StaticDecoder" and rs[-1].finish_reason and len(rs) <= 3
    assert all(0 <= r.token < q.manifest.vocab_size for r in rs)


def test_manifest_rejects_a_static_decoder_without_prefill(static_bundle, tmp_path):
    import shutil

    from edgevlm.bundle import open_bundle

    bad = tmp_path / "bad"
    shutil.copytree(static_bundle, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["components"]["prefill"]["inputs"]["inputs_embeds"] = [1, "seq", 64]
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="dynamic dim"):
        open_bundle(bad)
    del m["components"]["prefill"]
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="components.prefill"):
        open_bundle(bad)

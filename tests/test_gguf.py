"""GGUF: the language model written for llama.cpp, quantized by llama.cpp, run by llama.cpp next to ONNX vision.

Needs the `gguf` package and llama-cpp-python (both in the dev extra)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import gguf  # noqa: E402  (the dev extra installs both: missing, the tests fail)
import llama_cpp  # noqa: E402,F401

import edgevlm  # noqa: E402
from edgevlm.errors import IntegrityError  # noqa: E402
from edgevlm.export.gguf import export_gguf  # noqa: E402

from conftest import scene  # noqa: E402

QUESTIONS = ["what color is the circle?", "how many squares are there?", "describe the image."]


def test_import_edgevlm_loads_no_llama_cpp():
    code = "import sys, edgevlm; sys.exit(1 if 'llama_cpp' in sys.modules or 'gguf' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("name,arch", [("fastvlm-qwen2-gqa", "qwen2"), ("llava-clip-llama", "llama")])
def test_gguf_file_has_what_llama_cpp_expects(gguf_bundle, checkpoint, name, arch):
    from transformers import AutoConfig

    path = gguf_bundle(name) / "decoder.gguf"
    r = gguf.GGUFReader(str(path))
    text = AutoConfig.from_pretrained(checkpoint(name)).text_config

    def field(key):
        f = r.fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()

    assert field("general.architecture") == arch
    assert field(f"{arch}.block_count") == text.num_hidden_layers
    assert field(f"{arch}.embedding_length") == text.hidden_size
    assert field(f"{arch}.attention.head_count_kv") == text.num_key_value_heads
    assert field("tokenizer.ggml.model") == "gpt2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == text.vocab_size and "<image>" in tokens
    assert len(field("tokenizer.ggml.merges")) > 100
    types = field("tokenizer.ggml.token_type")
    assert types[tokens.index("<image>")] == 3  # control
    names = {t.name: t for t in r.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight"} <= set(names)
    assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2")  # Qwen2 has q/k/v biases, Llama none
    q = names["blk.0.attn_q.weight"]
    assert list(q.shape) == [text.hidden_size, text.hidden_size] and q.tensor_type.name == "F32"


@pytest.mark.parametrize("name", ["fastvlm-qwen2-gqa", "llava-clip-llama"])
def test_gguf_f32_greedy_tokens_equal_onnx(gguf_bundle, bundle, name):
    onnx_vlm, gguf_vlm = edgevlm.load(bundle(name)), edgevlm.load(gguf_bundle(name))
    assert gguf_vlm.decoder.backend == "gguf" and "embed" not in gguf_vlm.manifest.components
    maxdiff, answers = 0.0, set()
    for k in range(3):
        img = scene(k)
        maxdiff = max(maxdiff, float(np.abs(onnx_vlm.prompt_logits(img, QUESTIONS[k]) -
                                            gguf_vlm.prompt_logits(img, QUESTIONS[k])).max()))
        a = [r.token for r in onnx_vlm.stream(img, QUESTIONS[k], max_tokens=12)]
        b = [r.token for r in gguf_vlm.stream(img, QUESTIONS[k], max_tokens=12)]
        assert a == b, (k, a, b)
        answers.add(tuple(a))
    print(f"GGUF f32 vs ONNX ({name}): logits maxdiff = {maxdiff:.3g}")
    assert maxdiff < 1e-3
    # the image decides the answer: different images, different tokens (a broken image path would not show)
    same_q = {tuple(r.token for r in gguf_vlm.stream(scene(k), QUESTIONS[0], max_tokens=8)) for k in range(4)}
    assert len(same_q) > 1
    recorded = json.loads((gguf_bundle(name) / "manifest.json").read_text())["source"]["parity"]["gguf_vs_onnx"]
    assert recorded["greedy_match"] is True


def test_gguf_chat_reuses_the_kv_cache_across_turns(gguf_bundle):
    vlm = edgevlm.load(gguf_bundle("fastvlm-qwen2-gqa"))
    chat = vlm.chat()
    a1 = list(chat.stream("what color is the circle?", image=scene(0), max_tokens=6))
    a2 = list(chat.stream("and the square?", max_tokens=6))
    assert a1[-1].prefilled_tokens == a1[-1].prompt_tokens
    assert a2[-1].prefilled_tokens < a2[-1].prompt_tokens - 16  # only the new turn ran, not the image
    # the same conversation from scratch, in a new chat, gives the same tokens
    fresh = vlm.chat()
    fresh.messages, fresh._items = chat.messages[:2], list(chat._items[:1])
    vlm.decoder.reset()  # nothing cached: the whole prompt runs again
    vlm.caches.clear()  # (the prefix cache would restore the first turn's llama state)
    b2 = list(fresh.stream("and the square?", max_tokens=6))
    assert b2[-1].prefilled_tokens == b2[-1].prompt_tokens
    assert [r.token for r in a2] == [r.token for r in b2]
    # two chats interleaved on one llama context still give each its own answer
    c1, c2 = vlm.chat(), vlm.chat()
    ref1 = [r.token for r in vlm.stream(scene(1), "describe the image.", max_tokens=6)]
    ref2 = [r.token for r in vlm.stream(scene(2), "describe the image.", max_tokens=6)]
    s1, s2 = c1.stream("describe the image.", image=scene(1), max_tokens=6), c2.stream(
        "describe the image.", image=scene(2), max_tokens=6)
    got1, got2 = [], []
    for r1, r2 in zip(s1, s2):
        got1.append(r1.token)
        got2.append(r2.token)
    assert got1 == ref1[:len(got1)] and got2 == ref2[:len(got2)]


def test_gguf_chat_prepare_runs_the_next_turns_header_in_llama_cpp(gguf_bundle):
    vlm = edgevlm.load(gguf_bundle("fastvlm-qwen2-gqa"))
    runs = []
    for prepared in (False, True):
        vlm.decoder.reset()
        vlm.caches.clear()
        chat = vlm.chat()
        list(chat.stream("what color is the circle?", image=scene(3), max_tokens=6))
        n = chat.prepare() if prepared else 0
        runs.append((n, list(chat.stream("and the square?", max_tokens=6))))
    (_, plain), (n, prep) = runs
    assert n > 0 and prep[0].prefilled_tokens == plain[0].prefilled_tokens - n
    assert [r.token for r in prep] == [r.token for r in plain]


def test_a_new_chat_with_the_same_prefix_hits_the_cache(gguf_bundle, bundle):
    vlm = edgevlm.load(gguf_bundle("fastvlm-qwen2-gqa"))
    first = list(vlm.stream(scene(3), "what color is the circle?", max_tokens=3))[-1]
    again = list(vlm.stream(scene(3), "how many squares are there?", max_tokens=3))[-1]
    assert again.prefilled_tokens < again.prompt_tokens - 16 and first.prefilled_tokens == first.prompt_tokens
    assert again.prefix_cache_source == "decoder" and again.image_cache_source == "ram" and again.warm
    assert again.prefix_cache_hit_tokens == again.prompt_tokens - again.prefilled_tokens
    onnx = list(edgevlm.load(bundle("fastvlm-qwen2-gqa")).stream(scene(3), "hi", max_tokens=2))[-1]
    assert set(again.profile) == set(onnx.profile) and again.profile["backend"] == "gguf"  # one profile, every backend
    assert again.profile["prefill_s"] > 0 and again.peak_rss_bytes > 0


def test_gguf_prefix_cache_restores_llama_states_from_ram_and_disk(gguf_bundle, tmp_path):
    path, q1, q2 = gguf_bundle("fastvlm-qwen2-gqa"), QUESTIONS[0], QUESTIONS[1]
    want = [r.token for r in edgevlm.load(path).stream(scene(0), q2, max_tokens=6)]  # no cache at all
    vlm = edgevlm.load(path, cache_dir=tmp_path)
    list(vlm.stream(scene(0), q1, max_tokens=6))
    list(vlm.stream(scene(1), q1, max_tokens=6))  # another image takes over the llama context
    r = list(vlm.stream(scene(0), q2, max_tokens=6))
    assert r[-1].prefix_cache_source == "ram" and r[-1].prefilled_tokens < r[-1].prompt_tokens - 16
    assert [x.token for x in r] == want
    fresh = edgevlm.load(path, cache_dir=tmp_path)  # a new process: a new llama context, RAM empty
    r = list(fresh.stream(scene(0), q2, max_tokens=6))
    print(f"GGUF from disk: prompt {r[-1].prompt_tokens}, prefilled {r[-1].prefilled_tokens}")
    assert r[-1].prefix_cache_source == "disk" and r[-1].image_cache_source == "disk"
    assert r[-1].prefilled_tokens <= 2 and [x.token for x in r] == want  # q2 was asked: all but its end cached
    for p in tmp_path.rglob("kv-*.evc"):  # a state from another llama.cpp build or KV type is stale
        from edgevlm import diskcache

        name = p.name[:-len(diskcache.SUFFIX)]
        meta, arrays = diskcache.decode_entry(p.read_bytes(), fresh.bundle.sha256, "prefix", name)
        p.write_bytes(diskcache.encode_entry(fresh.bundle.sha256, "prefix", name, {**meta, "variant": "other"}, arrays))
    again = edgevlm.load(path, cache_dir=tmp_path)
    r = list(again.stream(scene(0), q2, max_tokens=6))
    assert r[-1].prefix_cache_source == "" and again.caches.disk.rejected >= 1 and [x.token for x in r] == want


CORRELATION = {"Q8_0": 0.99, "Q4_0": 0.93, "Q4_K_M": 0.97}  # first-token logits vs fp32, tiny random-weight model


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0", "Q4_K_M"])
def test_quantized_gguf_runs_and_records_llama_cpp_fallbacks(gguf_bundle, bundle, quant):
    name = "fastvlm-qwen2-gqa"
    path = gguf_bundle(name, quant)
    m = json.loads((path / "manifest.json").read_text())
    dec = m["components"]["decoder"]
    assert dec["backend"] == "gguf" and dec["precision"] == quant.lower() and m["quant"]["scheme"] == f"gguf-{quant.lower()}"
    details = dec["quant"]
    print(quant, details["tensor_types"], details["other_matrix_types"])
    if quant == "Q4_K_M":  # rows of 64/128 are no multiple of 256: llama.cpp falls back from Q4_K/Q6_K
        assert not {"Q4_K", "Q6_K"} & set(details["tensor_types"])
        assert {"Q5_0", "Q8_0"} & set(details["tensor_types"])
    else:
        assert details["main_type"] == quant
    assert details["tensor_types"]["F32"] >= 2  # norms stay f32
    assert (path / "decoder.gguf").stat().st_size < (gguf_bundle(name) / "decoder.gguf").stat().st_size
    vlm, ref = edgevlm.load(path), edgevlm.load(bundle(name))
    agree = []
    for k in range(3):
        rs = list(vlm.stream(scene(k), QUESTIONS[k], max_tokens=10))
        assert rs[-1].finish_reason in ("stop", "length") and all(0 <= r.token < vlm.decoder.n_vocab for r in rs)
        want = [r.token for r in ref.stream(scene(k), QUESTIONS[k], max_tokens=10)]
        agree.append(next((i for i, (x, y) in enumerate(zip(want, rs)) if x != y.token), len(want)))
    corr = [float(np.corrcoef(vlm.prompt_logits(scene(k), QUESTIONS[k]), ref.prompt_logits(scene(k), QUESTIONS[k]))[0, 1])
            for k in range(3)]
    print(f"{quant}: greedy tokens agreeing with ONNX before the first difference: {agree}; first-token logits "
          f"correlation with ONNX fp32: {[round(c, 4) for c in corr]}")
    assert min(corr) > CORRELATION[quant]  # the quantized model computes the same function, roughly
    if quant == "Q8_0":
        assert min(agree) >= 1


def test_tampered_gguf_is_rejected_before_llama_cpp_sees_it(gguf_bundle, tmp_path, monkeypatch):
    import shutil

    from edgevlm.decoders import gguf as backend

    src = gguf_bundle("fastvlm-qwen2-gqa")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    blob = bytearray((bad / "decoder.gguf").read_bytes())
    blob[len(blob) // 2] ^= 1
    (bad / "decoder.gguf").write_bytes(bytes(blob))
    seen = []
    monkeypatch.setattr(backend.GgufDecoder, "__init__", lambda self, *a, **k: seen.append(a))
    with pytest.raises(IntegrityError, match="decoder.gguf"):
        edgevlm.load(bad)
    assert seen == []


def test_cli_exports_gguf(checkpoint, bundle, tmp_path, capsys):
    from edgevlm.apps.cli import main

    out = tmp_path / "q8"
    name = "llava-clip-llama"
    rc = main(["export", "--from", str(checkpoint(name)), "--to", str(out), "--format", "gguf",
               "--gguf-quant", "Q8_0", "--bundle", str(bundle(name))])
    assert rc == 0, capsys.readouterr().err
    assert "gguf-q8_0" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["components"]["vision"]["backend"] == "onnx" and m["components"]["decoder"]["backend"] == "gguf"
    rs = list(edgevlm.load(out).stream(scene(0), "hi", max_tokens=4))
    assert rs[-1].finish_reason and len(rs) <= 4 and rs[-1].backend == "gguf"

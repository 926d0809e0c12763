"""The torch-free runtime: samplers, stop rules, chat with KV reuse, context overflow, providers, import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import edgevlm
from edgevlm import make_sampler, pipeline
from edgevlm.sampling import make_logits_processors
from edgevlm.backends.onnx import OnnxGraph
from edgevlm.errors import BackendError, ContextOverflowError, TemplateError
from edgevlm.template import render

NAME = "fastvlm-qwen2-gqa"


@pytest.fixture(scope="module")
def vlm(bundle):
    return edgevlm.load(bundle(NAME))


def test_import_edgevlm_loads_no_torch():
    code = ("import sys, edgevlm; heavy = [m for m in ('torch', 'transformers', 'coremltools', 'timm') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_samplers():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=100).astype(np.float32)
    assert make_sampler()(logits) == int(np.argmax(logits))
    assert make_sampler(temperature=1.0, top_k=1, seed=1)(logits) == int(np.argmax(logits))
    assert make_sampler(temperature=1.0, top_p=1e-6, seed=1)(logits) == int(np.argmax(logits))
    a = [make_sampler(temperature=1.0, seed=7)(logits) for _ in range(5)]
    draw = make_sampler(temperature=1.0, seed=7)
    assert a[0] == draw(logits) and len({draw(logits) for _ in range(50)}) > 5  # seeded, yet random
    top3 = set(np.argsort(-logits)[:3].tolist())
    s = make_sampler(temperature=2.0, top_k=3, seed=0)
    assert {s(logits) for _ in range(200)} <= top3
    with pytest.raises(ValueError):
        make_sampler(top_p=0.0)


def choose(logits, history=(), sampler=None, **processing):
    for p in make_logits_processors(**processing):
        logits = p(logits, history)
    return (sampler or make_sampler())(logits)


def test_logit_bias_moves_and_bans_tokens():
    logits = np.array([2.0, 1.8, -1.0, 0.5], np.float32)
    before = logits.copy()
    assert choose(logits, logit_bias={0: -100}) == 1  # banned: the runner-up wins
    assert choose(logits, logit_bias={2: 3.5}) == 2   # 2.5 beats 2.0
    s = make_sampler(temperature=1.0, seed=0)
    assert {choose(logits, sampler=s, logit_bias={0: -100, 1: -100}) for _ in range(200)} <= {2, 3}
    assert np.array_equal(logits, before)  # the caller's logits are not modified
    for bad in ({0: 101}, {-1: 1}, {"a": 1}, {0: float("nan")}, [0, 1], {2**63: 1}):
        with pytest.raises(ValueError):
            make_logits_processors(logit_bias=bad)
    with pytest.raises(ValueError):  # a token the vocabulary does not have
        choose(logits, logit_bias={4: 1.0})
    with pytest.raises(ValueError):
        make_logits_processors(logit_bias={4: 1.0}, vocab=4)


def test_repetition_penalty_matches_transformers():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = np.array([2.0, 1.8, -1.0, 0.5, -0.1], np.float32)
    for hist, penalty in [([0], 1.3), ([0, 1], 1.3), ([3, 4], 8.0), ([], 2.0), ([0, 1, 3], 0.5)]:
        ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([hist or [2]])[:, :len(hist)],
                                                         torch.tensor(logits)[None])[0].numpy()
        (proc,) = make_logits_processors(repetition_penalty=penalty)
        got = proc(logits, hist)
        print(f"penalty {penalty}, history {hist}: max |diff| vs transformers {np.abs(got - ref).max():.1e}")
        assert np.allclose(got, ref, atol=1e-6), (hist, penalty)
    assert choose(logits, [0], repetition_penalty=1.3) == 1  # the penalty moved the argmax


def test_generate_equals_stream_and_reports_timings(vlm, images):
    rs = list(vlm.stream(images[0], "what color is the circle?", max_tokens=10))
    assert "".join(r.text for r in rs) == vlm.generate(images[0], "what color is the circle?", max_tokens=10)
    last = rs[-1]
    assert last.finish_reason in ("stop", "length") and all(r.finish_reason is None for r in rs[:-1])
    assert last.generated_tokens == len(rs) and last.ttft_s > 0 and last.prompt_tokens > 16
    assert {"preprocess", "encode", "embed", "prefill"} <= set(last.stages)
    assert last.prompt_tps > 0 and (len(rs) == 1 or last.decode_tps > 0)


def test_max_tokens_and_stop_strings(vlm, images):
    rs = list(vlm.stream(images[1], "describe the image.", max_tokens=7))
    assert len(rs) <= 7
    if len(rs) == 7:
        assert rs[-1].finish_reason == "length"
    full = vlm.generate(images[1], "describe the image.", max_tokens=20)
    stop = full[3:5]
    if stop.strip():
        cut = vlm.generate(images[1], "describe the image.", max_tokens=20, stop=[stop])
        assert cut == full[: full.find(stop)]


def test_eos_ends_with_stop(vlm, images, monkeypatch):
    # make whatever greedy picks first an EOS: generation must end there with "stop"
    first = next(iter(vlm.stream(images[0], "hi", max_tokens=1))).token
    import dataclasses

    gen = vlm.manifest.generation
    m2 = dataclasses.replace(vlm.manifest, generation=dataclasses.replace(gen, eos_token_ids=(first,)))
    monkeypatch.setattr(vlm, "manifest", m2)
    rs = list(vlm.stream(images[0], "hi", max_tokens=5))
    assert len(rs) == 1 and rs[0].finish_reason == "stop" and rs[0].token == first


def test_chat_reuses_kv_and_matches_a_fresh_computation(vlm, images):
    vlm.caches.clear()  # earlier tests asked the same question: their prefix would serve the first turn
    chat = vlm.chat()
    a1 = list(chat.stream("what color is the circle?", image=images[0], max_tokens=6))
    a2 = list(chat.stream("and the square?", max_tokens=6))
    assert a2[-1].prefilled_tokens < a2[-1].prompt_tokens  # only the new turn ran
    assert "encode" not in a2[-1].stages  # the image was encoded once
    # the same conversation computed from scratch gives the same tokens
    vlm.caches.clear()  # (else the prefix cache would serve the first turn's KV to the new chat too)
    fresh = vlm.chat()
    fresh.messages = chat.messages[:2]
    fresh._items = list(chat._items[:1])
    b2 = list(fresh.stream("and the square?", max_tokens=6))
    assert b2[-1].prefilled_tokens == b2[-1].prompt_tokens
    assert [r.token for r in a2] == [r.token for r in b2]
    assert a1[-1].prefilled_tokens == a1[-1].prompt_tokens
    chat.reset()
    assert chat.messages == [] and chat._state.keys == []


def test_chat_prepare_prefills_the_next_turns_header(vlm, images):
    """chat.prepare() runs what the template fixes of the next turn (end of the answer, turn separator, user
    header); the next turn then prefills that many positions fewer and answers the same."""
    runs = {}
    for prepared in (False, True):
        vlm.caches.clear()  # each conversation starts from nothing
        chat = vlm.chat()
        list(chat.stream("what color is the circle?", image=images[1], max_tokens=6))
        messages = list(chat.messages)
        n = chat.prepare() if prepared else 0
        assert chat.messages == messages  # the conversation itself is unchanged
        if prepared:
            assert n > 0 and chat.prepare() == 0  # a second call finds nothing left to run
        runs[prepared] = (n, list(chat.stream("and the square?", max_tokens=6)))
    (_, plain), (n, prep) = runs[False], runs[True]
    print(f"second turn prefilled {plain[0].prefilled_tokens} positions; after prepare() ran {n}: "
          f"{prep[0].prefilled_tokens}")
    assert prep[0].prefilled_tokens == plain[0].prefilled_tokens - n
    assert prep[0].prompt_tokens == plain[0].prompt_tokens
    assert [r.token for r in prep] == [r.token for r in plain]
    fresh = vlm.chat(system="be brief")  # a new chat: the system prompt and the user header
    assert fresh.prepare() > 0 and fresh.messages == [{"role": "system", "content": "be brief"}]


def test_same_image_twice_hits_the_image_cache(vlm, images):
    vlm.prepare(images[2])
    r = list(vlm.stream(images[2], "hi", max_tokens=2))[-1]
    assert r.image_cache_hits == 1 and "encode" not in r.stages


def test_prompt_longer_than_the_context_is_refused(vlm):
    ctx = vlm.manifest.generation.context_length
    with pytest.raises(ContextOverflowError, match="context holds"):
        vlm.generate(None, "one two three " * ctx, max_tokens=4)


def test_generation_stops_at_the_context_edge(vlm):
    """A context cut by the KV memory cap (edgevlm.Limits.kv_bytes) to the prompt + 3 positions: the answer stops
    there with finish_reason "length", and a prompt that does not fit is refused."""
    from edgevlm.limits import kv_position_bytes

    probe = vlm.prompt_ids([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    per = kv_position_bytes(vlm.manifest)
    small = edgevlm.load(vlm.bundle.root, limits=edgevlm.Limits(kv_bytes=per * (len(probe) + 3)))
    assert small.context_length == len(probe) + 3
    rs = list(small.stream(None, "hi", max_tokens=50, logit_bias={t: -100 for t in vlm.manifest.generation.eos_token_ids}))
    assert len(rs) == 3 and rs[-1].finish_reason == "length"
    with pytest.raises(edgevlm.ContextOverflowError):
        small.generate(None, "hi " * 10)


def test_templates_render_in_a_sandbox():
    msgs = [{"role": "user", "content": "hi"}]
    assert render("{{ messages[0]['content'] }}!", msgs) == "hi!"
    for evil in ["{{ ''.__class__.__mro__[1].__subclasses__() }}",
                 "{{ messages.__class__.__init__.__globals__ }}",
                 "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
                 "{{ raise_exception('no') }}", "{% for %}"]:
        with pytest.raises(TemplateError):
            render(evil, msgs)


def test_providers_fall_back_to_cpu_and_are_reported(bundle):
    v = edgevlm.load(bundle(NAME), providers=["NoSuchExecutionProvider", "CPUExecutionProvider"])
    assert all(p == ["CPUExecutionProvider"] for p in v.providers.values())


def test_chat_prepare_on_a_prefusion_bundle():
    """LLaVA-Mini pre-fusion: the text positions depend on the image; prepare() prefills them the same way."""
    from conftest import scene
    from edgevlm.model import DEFAULT_BUNDLE

    runs = []
    for prepared in (False, True):
        vlm = edgevlm.load(DEFAULT_BUNDLE.parent / "shapes-fastvlm-mini")
        chat = vlm.chat()
        chat.send("What color is the star?", image=scene(1), max_tokens=4)
        n = chat.prepare() if prepared else 0
        runs.append((n, list(chat.stream("What shape is it?", max_tokens=4))))
    (_, plain), (n, prep) = runs
    assert n > 0 and prep[0].prefilled_tokens == plain[0].prefilled_tokens - n
    assert [r.token for r in prep] == [r.token for r in plain]


def _tokens(vlm, n: int) -> np.ndarray:
    return pipeline.embed(vlm.embedder, (np.arange(n, dtype=np.int64) * 7 + 3) % vlm.tokenizer.get_vocab_size())


def test_kv_buffer_is_extended_in_place_and_matches_plain_arrays(vlm):
    """A GroupQueryAttention decoder runs on a KVBuffer (past and present bound to the same memory): a prompt,
    a chunk after a past, single steps, growth past the capacity and a rewind give the plain path's logits."""
    assert vlm.decoder.inplace
    spec, layers, graph = vlm.decoder.spec, vlm.decoder.num_layers, vlm.decoder.graph
    x = _tokens(vlm, 40)
    buf, plain = pipeline.KVBuffer(spec, layers, 4, vlm.context_length), pipeline.empty_kv(spec, layers)
    diffs, pairs = [], []
    for a, b in [(0, 7), (7, 20), (20, 21), (21, 22)]:
        got, buf = pipeline.forward(graph, spec, x[a:b], buf)
        want, plain = pipeline.forward(graph, spec, x[a:b], plain)
        diffs.append(float(np.abs(got - want).max()))
        pairs.append((got, want))
    # the logits handed out are the caller's: later runs (which reuse the bound output array) leave them be
    assert all(np.abs(g - w).max() == d for (g, w), d in zip(pairs, diffs))
    assert len({id(g) for g, _ in pairs}) == len(pairs)
    assert buf.length == 22 and buf.capacity >= 22  # grew from 4 while holding positions
    diffs.append(max(float(np.abs(g - w).max()) for gw in zip(buf.view(), plain) for g, w in zip(*gw)))
    buf.length = 10  # rewind: positions 10.. are overwritten
    got, buf = pipeline.forward(graph, spec, x[10:30], buf)
    want, _ = pipeline.forward(graph, spec, x[10:30], pipeline.trim_kv(plain, 10))
    diffs.append(float(np.abs(got - want).max()))
    print("KVBuffer vs plain arrays, max |diff| per run (logits, logits, logits, logits, kv, logits after rewind):",
          diffs)
    assert max(diffs) <= 1e-5 and buf.length == 30


def test_kv_buffer_keeps_its_positions_when_a_run_fails(vlm):
    spec, layers, graph = vlm.decoder.spec, vlm.decoder.num_layers, vlm.decoder.graph
    x = _tokens(vlm, 6)
    buf = pipeline.KVBuffer(spec, layers, 8, vlm.context_length)
    pipeline.forward(graph, spec, x[:5], buf)
    with pytest.raises(BackendError):
        pipeline.forward(graph, spec, np.zeros((1, x.shape[1] + 1), np.float32), buf)  # wrong width
    assert buf.length == 5
    got, _ = pipeline.forward(graph, spec, x[5:], buf)
    want, _ = pipeline.forward(graph, spec, x, pipeline.empty_kv(spec, layers))
    print("after a failed run, max |diff| from a fresh computation:", float(np.abs(got - want).max()))
    assert np.abs(got - want).max() <= 1e-5


def test_kv_buffer_refuses_to_grow_past_the_context(vlm):
    spec, layers, graph = vlm.decoder.spec, vlm.decoder.num_layers, vlm.decoder.graph
    x = _tokens(vlm, 8)
    buf = pipeline.KVBuffer(spec, layers, 4, 6)  # a context of 6 positions
    pipeline.forward(graph, spec, x[:5], buf)
    with pytest.raises(ContextOverflowError, match="8 positions do not fit in the context of 6"):
        pipeline.forward(graph, spec, x[5:8], buf)
    assert buf.length == 5 and buf.capacity == 6
    got, _ = pipeline.forward(graph, spec, x[5:6], buf)  # the last position that fits still runs
    want, _ = pipeline.forward(graph, spec, x[:6], pipeline.empty_kv(spec, layers))
    assert buf.length == 6 and np.abs(got - want).max() <= 1e-5


def test_sessions_keep_no_copy_of_their_graphs_bytes(vlm, images):
    """onnxruntime's Python session keeps the model bytes it was built from (the graph's size once more in RAM,
    benchmarks/load_memory.py); the runtime lets go of them and still answers."""
    graphs = [g for g in vlm.graphs.values() if isinstance(g, OnnxGraph)]
    # whatever onnxruntime names the attribute: no session object holds a bytes copy of a graph
    held = [(g.name, k) for g in graphs for k, v in vars(g.session).items()
            if isinstance(v, (bytes, bytearray, memoryview)) and len(v) > 1024]
    assert graphs and not held, held
    assert not any(g.session._enable_fallback for g in graphs)  # nothing left to rebuild a session from
    assert list(vlm.stream(images[0], "what color is the circle?", max_tokens=2))[-1].generated_tokens >= 1


def test_prefix_cache_entries_are_copies_of_a_chats_kv_buffer(vlm, images):
    """The chat's buffer runs on (and rewinds); what it gave the prefix cache must not change with it."""
    vlm.caches.clear()
    chat = vlm.chat()
    list(chat.stream("what color is the circle?", image=images[0], max_tokens=4))
    assert isinstance(chat._state.kv, pipeline.KVBuffer)
    keys = list(chat._state.keys)
    n, arrays, where, _ = vlm.caches.lookup_prefix(keys + [0])
    assert n == len(keys) and where == "ram"
    snapshot = {k: a.copy() for k, a in arrays.items()}
    assert not any(np.shares_memory(a, b) for a in arrays.values() for pair in chat._state.kv.arrays for b in pair)
    chat.messages, chat._items = [], []  # another first turn on the same buffer: it rewinds
    r = list(chat.stream("is there a square?", image=images[1], max_tokens=4))
    assert 0 < r[0].prompt_tokens - r[0].prefilled_tokens < n and r[0].prefix_cache_source == "chat"
    assert all(np.array_equal(arrays[k], snapshot[k]) for k in arrays)


def test_a_graph_that_concatenates_its_kv_refuses_the_buffer():
    """A decoder whose present is Concat(past, new) (torch.onnx's form) cannot extend a KVBuffer: the run fails
    with a BackendError (that is how load() picks the plain path for it) and the buffer is left as it was."""
    import onnx
    from onnx import TensorProto, helper

    from edgevlm.backends.onnx import OnnxGraph
    from edgevlm.manifest import KVSpec

    d, heads, hd = 8, 1, 8
    nodes = [helper.make_node("Reshape", ["inputs_embeds", "shape"], ["new"]),
             helper.make_node("Concat", ["past_key_values.0.key", "new"], ["present.0.key"], axis=2),
             helper.make_node("Concat", ["past_key_values.0.value", "new"], ["present.0.value"], axis=2),
             helper.make_node("ReduceSum", ["inputs_embeds", "axes"], ["logits"], keepdims=1)]
    kv = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, heads, None, hd])  # noqa: E731
    graph = helper.make_graph(
        nodes, "concat-kv",
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [1, None, d]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, None]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, None]),
         kv("past_key_values.0.key"), kv("past_key_values.0.value")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, d]), kv("present.0.key"),
         kv("present.0.value")],
        [helper.make_tensor("shape", TensorProto.INT64, [4], [1, heads, -1, hd]),
         helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    g = OnnxGraph("decoder", model.SerializeToString())
    spec = KVSpec(past="past_key_values.%d.%s", present="present.%d.%s", heads=heads, head_dim=hd)
    x = np.ones((2, d), np.float32)
    plain = pipeline.forward(g, spec, x, pipeline.empty_kv(spec, 1))[1]
    assert plain[0][0].shape == (1, 1, 2, hd)  # the graph itself works
    buf = pipeline.KVBuffer(spec, 1, 8, 64)
    with pytest.raises(BackendError, match="failed"):  # the run itself refuses (the logits shape is fixed)
        pipeline.forward(g, spec, x, buf, quiet=True)
    assert buf.length == 0


def test_a_deadline_interrupts_a_python_loop_and_withdraws_cleanly():
    """edgevlm.deadline: the body gets Expired at its next bytecode once the time passes; a body that ends in
    time never sees it, and nothing fires after the block (the code after it runs undisturbed)."""
    from edgevlm.deadline import Expired, deadline

    spins = 0
    with pytest.raises(Expired):
        with deadline(0.2):
            while True:  # would never end on its own
                spins += 1
    assert spins > 0
    for _ in range(200):  # many short bodies ending just before or after their deadline: none leaks Expired
        try:
            with deadline(0.001):
                sum(range(2000))
        except Expired:
            pass
    total = sum(range(10**6))  # the code after the blocks runs to its end
    assert total == 10**6 * (10**6 - 1) // 2

"""The hand-written decoder graph (export/gqa.py) computes what transformers computes: logits and KV over a prompt,
a continued prompt after a cached prefix, and single decode steps, for Qwen2 (q/k/v biases) and Llama (llama3 rope
scaling), and as LLaVA-Mini's pre-fusion head. Also: what it refuses, and that the torch.onnx decoder and this one
give the runtime the same answers."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from edgevlm.export import gqa

SPLITS = [(0, 7), (7, 8), (8, 15), (15, 16), (16, 20)]  # prompt, decode, continued prompt, decode, continued


def _model(kind: str, **kw):
    torch.manual_seed(0)
    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                  vocab_size=100, max_position_embeddings=256, **kw)
    if kind == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=3, **common))
    else:
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 10000.0}
        m = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, rope_parameters=rope, **common))
    for p in m.parameters():  # large enough that a wrong rotation, mask or norm shows
        torch.nn.init.normal_(p, std=0.2)
    return m.eval()


def _feeds(emb, a, b, kv):
    feeds = {"inputs_embeds": emb[None, a:b], "attention_mask": np.ones((1, b), np.int64),
             "position_ids": np.arange(a, b)[None]}
    for i, (k, v) in enumerate(kv):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = k, v
    return feeds


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_logits_and_cache_match_transformers(kind):
    m = _model(kind)
    cfg = m.config
    assert gqa.supported(m.model, cfg) is None
    proto = gqa.build(m.model, m.lm_head, cfg)
    assert "GroupQueryAttention" in {n.op_type for n in proto.graph.node}
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 100, (1, 20))
    with torch.no_grad():
        out = m(ids, use_cache=True)
    ref, ref_kv = out.logits[0].numpy(), out.past_key_values.layers
    emb = m.model.embed_tokens(ids)[0].detach().numpy()
    n, hd = cfg.num_hidden_layers, cfg.hidden_size // cfg.num_attention_heads
    kv = [(np.zeros((1, cfg.num_key_value_heads, 0, hd), np.float32),) * 2 for _ in range(n)]
    worst = 0.0
    for a, b in SPLITS:
        got = sess.run(None, _feeds(emb, a, b, kv))
        kv = [(got[1 + 2 * i], got[2 + 2 * i]) for i in range(n)]
        assert got[0].shape == (1, 1, cfg.vocab_size) and kv[0][0].shape[2] == b
        worst = max(worst, float(np.abs(got[0][0, -1] - ref[b - 1]).max()))
    kv_diff = max(float(np.abs(k - r.keys.numpy()).max()) for (k, _), r in zip(kv, ref_kv))
    print(f"{kind}: logits maxdiff {worst:.3g} (|logits| up to {np.abs(ref).max():.3g}), rotated keys {kv_diff:.3g}")
    assert worst < 1e-4 and kv_diff < 1e-4


def test_prefusion_head_matches_torch():
    from torch import nn

    m = _model("qwen2")
    fuse = nn.Linear(64, 64)
    torch.nn.init.normal_(fuse.weight, std=0.2)
    sess = ort.InferenceSession(gqa.build(m.model, fuse, m.config, output="fused").SerializeToString(),
                                providers=["CPUExecutionProvider"])
    x = torch.randn(1, 12, 64)
    with torch.no_grad():
        ref = (x + fuse(m.model(inputs_embeds=x).last_hidden_state))[0].numpy()
    kv = [(np.zeros((1, 2, 0, 16), np.float32),) * 2 for _ in range(3)]
    first = sess.run(None, _feeds(x[0].numpy(), 0, 5, kv))  # an image prefix, then the text after it
    kv = [(first[1 + 2 * i], first[2 + 2 * i]) for i in range(3)]
    rest = sess.run(None, _feeds(x[0].numpy(), 5, 12, kv))[0][0]
    diff = float(np.abs(np.concatenate([first[0][0], rest]) - ref).max())
    print("pre-fusion head maxdiff", diff)
    assert rest.shape == (7, 64) and diff < 1e-4


def test_refuses_what_it_cannot_write():
    m = _model("qwen2")
    cfg = m.config
    cfg_bad = Qwen2Config(**{**cfg.to_dict(), "hidden_act": "gelu"})
    assert "activation" in gqa.supported(m.model, cfg_bad)
    small = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=48, vocab_size=50))
    assert "head" in gqa.supported(small.model, small.config)  # head_dim 8: the kernel wants multiples of 16
    assert gqa.export_decoder(small.model, small.lm_head, small.config, None) is None
    assert "decoder body" in gqa.supported(torch.nn.Linear(2, 2), cfg)


def _ops(bundle) -> set[str]:
    import json

    import onnx

    m = json.loads((bundle / "manifest.json").read_text())
    return {n.op_type for n in onnx.load(str(bundle / m["components"]["decoder"]["file"])).graph.node}


def test_exporter_takes_the_gqa_graph_and_torch_on_request(checkpoint, bundle, tmp_path):
    """A family's default export writes the GroupQueryAttention decoder; `--decoder torch` the torch.onnx one;
    both pass the exporter's parity check against transformers and answer alike through the runtime."""
    import edgevlm
    from edgevlm.apps.cli import main
    from edgevlm.export import parity

    name = "llava-clip-llama"  # Llama, one KV head for four query heads
    default = bundle(name)
    assert "GroupQueryAttention" in _ops(default)
    out = tmp_path / "torch"
    assert main(["export", "--from", str(checkpoint(name)), "--to", str(out), "--decoder", "torch"]) == 0
    assert "GroupQueryAttention" not in _ops(out) and "Softmax" in _ops(out)
    a, b = edgevlm.load(default), edgevlm.load(out)
    image = parity.probe_image()
    diff = float(np.abs(a.prompt_logits(image, "what is this?") - b.prompt_logits(image, "what is this?")).max())
    print("gqa vs torch.onnx decoder, first logits maxdiff", diff)
    assert diff < 1e-4
    assert a.generate(image, "describe it", max_tokens=12) == b.generate(image, "describe it", max_tokens=12)
    assert main(["export", "--from", str(checkpoint(name)), "--to", str(tmp_path / "s"), "--static",
                 "--decoder", "gqa"]) != 0  # the static export has its own decoder graphs
    assert not (tmp_path / "s").exists()

"""The three graphs of a bundle as plain nn.Modules over the HF model, and their ONNX export.

Wrappers call the HF modules and return plain tensors; nothing is monkeypatched.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

PAST, PRESENT = "past_key_values.%d.%s", "present.%d.%s"
INLINE_LIMIT = 1_800_000_000  # protobuf caps a graph file at 2 GB; beyond this, weights stay external


class VisionGraph(nn.Module):  # pixel_values [1, 3, H, W] -> image_embeds [1, N, D]
    def __init__(self, adapter, model):
        super().__init__()
        self.adapter, self.model = adapter, model

    def forward(self, pixel_values):
        return self.adapter.image_features(self.model, pixel_values)


class EmbedGraph(nn.Module):  # input_ids [1, S] -> inputs_embeds [1, S, D]
    def __init__(self, embed_tokens):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


class LastLogits(nn.Module):  # hidden [1, S, D] -> logits of the last position [1, 1, V]
    def __init__(self, lm_head):
        super().__init__()
        self.lm_head = lm_head

    def forward(self, hidden, inputs_embeds):
        return self.lm_head(hidden[:, -1:])


class DecoderGraph(nn.Module):
    """inputs_embeds [1, S, D], attention_mask [1, P+S], position_ids [1, S], past k/v [1, H, P, d] per layer
    -> head(hidden, inputs_embeds), present k/v [1, H, P+S, d] per layer."""

    def __init__(self, body, head, text_config):
        super().__init__()
        self.body, self.head, self.config = body, head, text_config
        self.num_layers = text_config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        hidden, layers = self.run_body(inputs_embeds, attention_mask, position_ids, past)
        present = []
        for layer in layers:
            present += [layer.keys, layer.values]
        return (self.head(hidden, inputs_embeds), *present)

    def run_body(self, inputs_embeds, attention_mask, position_ids, past):  # -> hidden [1, S, D], cache layers
        cache = DynamicCache(config=self.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.body(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=cache, use_cache=True, return_dict=True)
        return out.last_hidden_state, out.past_key_values.layers


class StaticDecoderGraph(nn.Module):
    """Fixed shapes for NPU providers (edgevlm/backends/static_kv.py runs it): inputs_embeds [1, C, D],
    attention_mask [1, L + C], position_ids [1, C], logits_index [1] (only with `pick`), past k/v [1, H, L, d]
    -> head(hidden, inputs_embeds) at row logits_index (or at every row), the chunk's own k/v [1, H, C, d]."""

    def __init__(self, body, head, text_config, pick: bool):
        super().__init__()
        self.inner, self.pick = DecoderGraph(body, head, text_config), pick

    def forward(self, inputs_embeds, attention_mask, position_ids, *rest):
        index, past = (rest[0], rest[1:]) if self.pick else (None, rest)
        hidden, layers = self.inner.run_body(inputs_embeds, attention_mask, position_ids, past)
        c = inputs_embeds.shape[1]
        if self.pick:  # the last real row of a right-padded chunk
            hidden, inputs_embeds = hidden.index_select(1, index), inputs_embeds.index_select(1, index)
        present = []
        for layer in layers:
            present += [layer.keys[:, :, -c:], layer.values[:, :, -c:]]
        return (self.inner.head(hidden, inputs_embeds), *present)


def kv_dims(text_config) -> tuple[int, int]:
    heads = text_config.num_key_value_heads or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return heads, head_dim


def export_graph(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_shapes) -> list[str]:
    """Export with torch.onnx (dynamo); returns the files written (the graph first, then external data)."""
    before = set(os.listdir(path.parent))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=True, input_names=input_names, output_names=output_names,
                          dynamic_shapes=dynamic_shapes, optimize=True, verbose=False, report=False)
    written = sorted(set(os.listdir(path.parent)) - before - {path.name})
    size = sum((path.parent / f).stat().st_size for f in written)
    inline = bool(written) and size < INLINE_LIMIT  # one self-contained file: the runtime loads it from verified bytes
    import onnx

    proto = onnx.load(str(path), load_external_data=inline)
    strip_metadata(proto)
    onnx.save(proto, str(path), save_as_external_data=False)  # external tensors keep their references
    if inline:
        for f in written:
            (path.parent / f).unlink()
        written = []
    return [path.name] + written


def strip_metadata(proto) -> None:
    """Drop the exporter's per-node metadata (Python stack traces with the exporting machine's file paths,
    module scopes): nothing reads it at run time, and a bundle should not carry where it was built."""
    def graph(g):
        for node in g.node:
            del node.metadata_props[:]
            for a in node.attribute:
                if a.HasField("g"):
                    graph(a.g)
                for sub in a.graphs:
                    graph(sub)
        del g.metadata_props[:]

    graph(proto.graph)
    for f in proto.functions:
        for node in f.node:
            del node.metadata_props[:]


def export_vision(adapter, model, pixel_shape, path: Path) -> list[str]:
    x = torch.zeros(pixel_shape, dtype=torch.float32)
    outputs = list(getattr(adapter, "vision_outputs", ("image_embeds",)))
    with torch.no_grad():  # one eager call first: an adapter may compute constants of its graph there
        adapter.image_features(model, x)
    return export_graph(VisionGraph(adapter, model).eval(), (x,), path, ["pixel_values"], outputs, None)


def export_embed(embed_tokens, path: Path, static_len: int | None = None) -> list[str]:
    """Dynamic sequence length, or a fixed one (`static_len`: static bundles)."""
    ids = torch.zeros((1, static_len or 5), dtype=torch.int64)
    dyn = None if static_len else ({1: torch.export.Dim.DYNAMIC},)
    return export_graph(EmbedGraph(embed_tokens).eval(), (ids,), path, ["input_ids"], ["inputs_embeds"], dyn)


def export_decoder(body, head, text_config, path: Path, output: str = "logits") -> list[str]:
    """A decoder with KV cache; `head` maps (hidden, inputs_embeds) to the graph's first output."""
    heads, head_dim = kv_dims(text_config)
    n, d = text_config.num_hidden_layers, text_config.hidden_size
    s, p = 5, 3  # example lengths; both dims stay dynamic (0 past works at run time)
    args = [torch.randn(1, s, d), torch.ones(1, p + s, dtype=torch.int64), torch.arange(p, p + s)[None]]
    args += [torch.randn(1, heads, p, head_dim) for _ in range(2 * n)]
    names_in = ["inputs_embeds", "attention_mask", "position_ids"]
    names_in += [PAST % (i, kv) for i in range(n) for kv in ("key", "value")]
    names_out = [output] + [PRESENT % (i, kv) for i in range(n) for kv in ("key", "value")]
    dyn = torch.export.Dim.DYNAMIC
    shapes = ({1: dyn}, {1: dyn}, {1: dyn}, tuple({2: dyn} for _ in range(2 * n)))  # *past is one tuple
    return export_graph(DecoderGraph(body, head, text_config).eval(), tuple(args), path, names_in, names_out, shapes)


def export_static_decoder(body, head, text_config, path: Path, *, capacity: int, chunk: int,
                          output: str = "logits", pick: bool = True) -> list[str]:
    """A fixed-shape decoder over a KV cache of `capacity` slots, `chunk` positions per call (no dynamic dim)."""
    heads, head_dim = kv_dims(text_config)
    n, d = text_config.num_hidden_layers, text_config.hidden_size
    args = [torch.randn(1, chunk, d), torch.ones(1, capacity + chunk, dtype=torch.int64),
            torch.arange(chunk)[None]]
    names_in = ["inputs_embeds", "attention_mask", "position_ids"]
    if pick:
        args.append(torch.tensor([chunk - 1]))
        names_in.append("logits_index")
    args += [torch.randn(1, heads, capacity, head_dim) for _ in range(2 * n)]
    names_in += [PAST % (i, kv) for i in range(n) for kv in ("key", "value")]
    names_out = [output] + [PRESENT % (i, kv) for i in range(n) for kv in ("key", "value")]
    module = StaticDecoderGraph(body, head, text_config, pick).eval()
    return export_graph(module, tuple(args), path, names_in, names_out, None)


def graph_shapes(path: Path) -> tuple[dict[str, list], dict[str, list]]:
    """Inputs and outputs of an exported graph file with their dims (ints; strings where a dim is symbolic)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph

    def dims(v):
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in v.type.tensor_type.shape.dim]

    inits = {i.name for i in g.initializer}
    return ({v.name: dims(v) for v in g.input if v.name not in inits}, {v.name: dims(v) for v in g.output})

"""Static-shape bundles (`edgevlm export --static`): every graph has fixed input and output shapes, as
providers that compile a graph ahead of time (QNN, NNAPI, the CoreML EP) require.

The decoder attends over a fixed-capacity KV cache held here, per layer k/v [1, H, L, d] (L = kv_capacity):
    feeds  inputs_embeds [1, C, D], attention_mask [1, L + C] (1 = filled cache slot, or a row of this chunk),
           position_ids [1, C], logits_index [1] (the row the head reads), past k/v [1, H, L, d]
    output logits [1, 1, V], present k/v [1, H, C, d]: the chunk's own keys/values, written into slots p..p+n
The prompt runs in chunks of C (the `prefill` graph), the last one padded on the right: padded rows come after
every real row, so causal attention already hides them from the real ones and no row is ever fully masked.
Generated tokens run one at a time (the `decoder` graph, C = 1). Slots beyond the filled ones are masked out,
so trimming the cache is forgetting a count, and a later call overwrites them.
"""

from __future__ import annotations


import numpy as np

from ..contract import EMBEDS, MASK, POSITIONS
from ..errors import ContextOverflowError
from ..manifest import KVSpec


class StaticCache:
    """Per layer key and value [1, H, L, d], preallocated; `length` slots are filled."""

    def __init__(self, spec: KVSpec, num_layers: int, capacity: int, dtype=np.float32):
        shape = (1, spec.heads, capacity, spec.head_dim)
        self.k = [np.zeros(shape, dtype) for _ in range(num_layers)]
        self.v = [np.zeros(shape, dtype) for _ in range(num_layers)]
        self.capacity, self.length = capacity, 0

    def load(self, kv: list[tuple[np.ndarray, np.ndarray]]) -> None:  # from dynamic-style kv [1, H, P, d]
        self.length = kv[0][0].shape[2] if kv else 0
        for i, (k, v) in enumerate(kv):
            self.k[i][:, :, :self.length], self.v[i][:, :, :self.length] = k, v

    def view(self) -> list[tuple[np.ndarray, np.ndarray]]:  # -> dynamic-style kv of the filled slots
        return [(k[:, :, :self.length].copy(), v[:, :, :self.length].copy()) for k, v in zip(self.k, self.v)]


def run_chunks(graph, spec: KVSpec, cache: StaticCache, chunk: int, x: np.ndarray, out: str,
               all_rows: bool) -> np.ndarray:
    """Run a static KV graph over embeds x [S, D] after the cache's filled slots, C = chunk rows per call.
    -> the head's rows for every position [S, ...] (all_rows) or its output for the last position."""
    s, d = x.shape
    if cache.length + s > cache.capacity:
        raise ContextOverflowError(f"{cache.length + s} positions, the static KV cache holds {cache.capacity}: "
                                   "start a new chat, or export with a larger --kv-capacity")
    rows, L = [], cache.capacity
    for a in range(0, s, chunk):
        n = min(chunk, s - a)
        p = cache.length
        emb = np.zeros((1, chunk, d), np.float32)
        emb[0, :n] = x[a:a + n]
        mask = np.zeros((1, L + chunk), np.int64)
        mask[0, :p] = 1
        mask[0, L:] = 1  # the chunk's rows, padding included: causality keeps padding out of the real rows
        feeds = {EMBEDS: emb, MASK: mask, POSITIONS: np.arange(p, p + chunk, dtype=np.int64)[None]}
        if "logits_index" in graph.input_names:
            feeds["logits_index"] = np.asarray([n - 1], np.int64)
        for i in range(len(cache.k)):
            feeds[spec.past % (i, "key")], feeds[spec.past % (i, "value")] = cache.k[i], cache.v[i]
        result = graph.run(feeds)
        for i in range(len(cache.k)):
            cache.k[i][:, :, p:p + n] = result[spec.present % (i, "key")][:, :, :n]
            cache.v[i][:, :, p:p + n] = result[spec.present % (i, "value")][:, :, :n]
        cache.length = p + n
        rows.append(result[out][0, :n] if all_rows else result[out][0, -1])
    return np.concatenate(rows) if all_rows else rows[-1]


class StaticKVGraph:
    """A static KV graph behind the dynamic graphs' run(feeds) (past k/v [1, H, P, d] in, present k/v
    [1, H, P + S, d] out): lets pipeline.run drive the pre-fusion layers, which run once per prompt."""

    def __init__(self, graph, spec: KVSpec, num_layers: int, static, out: str):
        self.graph, self.spec, self.num_layers, self.static, self.out = graph, spec, num_layers, static, out
        self.name, self.input_names, self.output_names = graph.name, graph.input_names, graph.output_names

    @property
    def providers(self) -> list[str]:
        return self.graph.providers

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cache = StaticCache(self.spec, self.num_layers, self.static.kv_capacity)
        cache.load([(feeds[self.spec.past % (i, "key")], feeds[self.spec.past % (i, "value")])
                    for i in range(self.num_layers)])
        rows = run_chunks(self.graph, self.spec, cache, self.static.chunk, feeds[EMBEDS][0], self.out,
                          all_rows=True)
        result = {self.out: rows[None]}
        for i, (k, v) in enumerate(cache.view()):
            result[self.spec.present % (i, "key")], result[self.spec.present % (i, "value")] = k, v
        return result


class StaticEmbed:
    """The token-embedding graph at a fixed length: ids are padded to whole chunks, the rows cut back."""

    def __init__(self, graph, chunk: int):
        self.graph, self.chunk = graph, chunk
        self.name, self.input_names, self.output_names = graph.name, graph.input_names, graph.output_names

    @property
    def providers(self) -> list[str]:
        return self.graph.providers

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = feeds[self.input_names[0]][0]
        s = ids.shape[0]
        padded = np.zeros(-(-max(s, 1) // self.chunk) * self.chunk, np.int64)
        padded[:s] = ids
        parts = [self.graph.run({self.input_names[0]: padded[None, a:a + self.chunk]})[self.output_names[0]][0]
                 for a in range(0, padded.shape[0], self.chunk)]
        return {self.output_names[0]: np.concatenate(parts)[None, :s]}

"""The static-shape ONNX decoder (`edgevlm export --static`, for NPU providers): the language model over a
fixed-capacity KV cache (edgevlm/backends/static_kv.py), the prompt in chunks of the prefill graph's size and
generated tokens one at a time through the decoder graph. The cache is one per model, shared by the chats."""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..backends.static_kv import StaticCache, run_chunks
from ..contract import LOGITS
from ..manifest import KVSpec
from .base import ContextDecoder


class StaticDecoder(ContextDecoder):
    backend = "onnx"
    takes_embeds = True  # a whole prompt (text + image rows) goes in as one run of embeds: fewer padded chunks

    def __init__(self, prefill_graph, step_graph, embed_ids: Callable[[np.ndarray], np.ndarray], spec: KVSpec,
                 num_layers: int, capacity: int, chunk: int):
        super().__init__(capacity)
        self.prefill_graph, self.step_graph, self.embed_ids = prefill_graph, step_graph, embed_ids
        self.spec, self.chunk = spec, chunk
        self.cache = StaticCache(spec, num_layers, capacity)
        self._logits: np.ndarray | None = None

    @classmethod
    def from_bundle(cls, m, bundle, graphs: dict, embed_ids, threads: int, n_ctx: int) -> "StaticDecoder":
        dec, pre = m.components["decoder"], m.components["prefill"]
        return cls(graphs["prefill"], graphs["decoder"], embed_ids, dec.kv, dec.num_layers, dec.static.kv_capacity,
                   pre.static.chunk)

    def trim(self, n: int) -> None:  # slots from n on are masked out, then overwritten
        super().trim(n)
        self.cache.length = len(self.keys)

    def eval_tokens(self, ids: np.ndarray, keys) -> None:  # ids: [S] int
        self.eval_embeds(self.embed_ids(np.asarray(ids, np.int64)), keys)

    def eval_embeds(self, x: np.ndarray, keys) -> None:  # x: [S, D]
        graph, chunk = (self.step_graph, 1) if x.shape[0] == 1 else (self.prefill_graph, self.chunk)
        self._logits = run_chunks(graph, self.spec, self.cache, chunk, x, LOGITS, all_rows=False)
        self.keys.extend(keys)

    def logits(self) -> np.ndarray:  # -> [V] of the last evaluated position
        return self._logits.copy()

"""The ONNX Runtime decoder: each chat owns its KV (plain arrays, or a KVBuffer the graph extends in place).

The prefix cache's entries are the KV arrays themselves (`k.0`, `v.0`, ...: [1, kv_heads, positions,
head_dim]), trimmed to the shared prefix on use. A prompt runs on plain arrays (a prefix-cache hit is used as
it is, nothing copied before the first token); the KV moves into a KVBuffer at the first decode step, when the
graph can extend one in place (GroupQueryAttention, export/gqa.py: checked at load against the plain path).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .. import pipeline
from ..cache import kv_arrays, kv_from_arrays
from ..errors import EdgeVLMError
from ..manifest import KVSpec
from .base import Prompt, State, reuse_from_chat


class OnnxDecoder:
    backend = "onnx"
    entry_variant = "onnx-kv"
    shared = False  # each chat owns its KV: chats may run at once

    def __init__(self, graph, embed_ids: Callable[[np.ndarray], np.ndarray], spec: KVSpec, num_layers: int,
                 n_ctx: int):
        self.graph, self.embed_ids, self.spec, self.num_layers, self.n_ctx = graph, embed_ids, spec, num_layers, n_ctx
        self.inplace = self._inplace_works()  # (also runs the decoder once each way: its warm-up)

    @classmethod
    def from_bundle(cls, m, bundle, graphs: dict, embed_ids, threads: int, n_ctx: int) -> "OnnxDecoder":
        comp = m.components["decoder"]
        return cls(graphs["decoder"], embed_ids, comp.kv, comp.num_layers, n_ctx)

    def new_state(self) -> State:
        return State(kv=pipeline.empty_kv(self.spec, self.num_layers))

    def reset(self) -> None:  # nothing shared between chats
        pass

    def warmup(self) -> None:  # the in-place probe ran the graph each way at construction
        pass

    def reuse(self, state: State, keys: list, lookup) -> tuple[State, int, str]:
        own = reuse_from_chat(state, keys)
        own = min(own, pipeline.kv_length(state.kv))  # a failed run leaves a KVBuffer valid up to where it began
        n, arrays, where, _ = lookup(keys, own)
        if arrays is not None:  # the cached entry shares more than this chat's own KV
            return State(list(keys[:n]), kv_from_arrays(arrays)), n, where
        return state, own, "chat" if own else ""

    def prefill(self, state: State, prompt: Prompt, start: int) -> np.ndarray:
        x = prompt.embeds(start)
        logits, state.kv = pipeline.forward(self.graph, self.spec, x, _cut(state.kv, start))
        state.keys = list(prompt.keys)
        return logits

    def step(self, state: State, token: int, prompt: Prompt | None = None) -> np.ndarray:
        logits, state.kv = pipeline.forward(self.graph, self.spec, self.embed_ids(np.asarray([token], np.int64)),
                                            self._as_buffer(state.kv))
        state.keys.append(token)
        return logits

    def entry(self, state: State) -> dict[str, np.ndarray] | None:
        if not state.keys:
            return None
        kv = state.kv.copy() if isinstance(state.kv, pipeline.KVBuffer) else state.kv  # a buffer runs on: copy
        return kv_arrays(kv)

    def entry_fits(self, arrays: dict[str, np.ndarray], length: int) -> bool:
        kv = kv_from_arrays(arrays)
        return kv is not None and len(kv) == self.num_layers and pipeline.kv_ok(kv, self.spec, length)

    def _as_buffer(self, kv):
        """Plain KV arrays -> a KVBuffer holding them, with room to grow (the decoder extends it in place)."""
        if not self.inplace or isinstance(kv, pipeline.KVBuffer):
            return kv
        n = pipeline.kv_length(kv)
        buf = pipeline.KVBuffer(self.spec, self.num_layers, max(256, n * 3 // 2), self.n_ctx)
        buf.load(kv, n)
        return buf

    def _inplace_works(self) -> bool:
        """Whether the graph extends a KVBuffer in place (GroupQueryAttention) and answers as with plain past /
        present arrays: two prompt positions, then one step, each way."""
        x = self.embed_ids(np.asarray([1, 2, 3], np.int64))
        buf = pipeline.KVBuffer(self.spec, self.num_layers, 4, self.n_ctx)
        try:
            got = [pipeline.forward(self.graph, self.spec, x[:2], buf, quiet=True)[0]]
            got.append(pipeline.forward(self.graph, self.spec, x[2:], buf, quiet=True)[0])
        except EdgeVLMError:
            return False  # e.g. a torch.onnx graph's present is past + new: it refuses the bound buffer
        want, kv = pipeline.forward(self.graph, self.spec, x[:2], pipeline.empty_kv(self.spec, self.num_layers))
        want = [want, pipeline.forward(self.graph, self.spec, x[2:], kv)[0]]
        return all(np.allclose(g, w, rtol=1e-4, atol=1e-4) for g, w in zip(got, want))


def _cut(kv, reuse: int):
    """The KV with its first `reuse` positions kept: a chat's own KVBuffer is cut back in place (it is that
    chat's alone); plain arrays (a prefix-cache hit, a new chat) are sliced."""
    if isinstance(kv, pipeline.KVBuffer):
        kv.length = min(kv.length, reuse)
        return kv
    return pipeline.trim_kv(kv, reuse)

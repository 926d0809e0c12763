"""The ONNX pipeline stages, each a function of arrays (batch size 1 throughout), and the KV cache they extend.

    ids --embed--> text embeds     splice(text embeds, image rows) --forward--> logits, kv
    text embeds --prefuse (LLaVA-Mini, after the image's cached prefix)--> fused embeds
    image rows --compress (LLaVA-Mini)--> one token
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .backends.onnx import OnnxGraph
from .contract import EMBEDS, LOGITS, MASK, POSITIONS
from .errors import BackendError, ContextOverflowError
from .manifest import KVSpec

KV = list[tuple[np.ndarray, np.ndarray]]  # per layer (key, value), each [1, kv_heads, past, head_dim]


def embed(embedder: OnnxGraph, ids: np.ndarray) -> np.ndarray:  # ids: [S] int64 -> [S, D]
    return embedder.run({embedder.input_names[0]: ids[None].astype(np.int64)})[embedder.output_names[0]][0]


def splice(text: np.ndarray, image_rows: np.ndarray, image_embeds: np.ndarray) -> np.ndarray:
    """Put image embeds [K, D] into the rows of text embeds [S, D] where the image placeholders are."""
    out = text.copy()
    out[image_rows] = image_embeds.astype(text.dtype, copy=False)
    return out


def empty_kv(spec: KVSpec, num_layers: int, dtype=np.float32) -> KV:
    z = np.zeros((1, spec.heads, 0, spec.head_dim), dtype)
    return [(z, z) for _ in range(num_layers)]


def kv_ok(kv, spec, length: int | None) -> bool:
    """Each (k, v): float32 [1, heads, length, head_dim] (any length when None, but equal across layers)."""
    n = kv[0][0].shape[2] if length is None and kv[0][0].ndim == 4 else length
    want = (1, spec.heads, n, spec.head_dim)
    return all(a is not None and a.dtype == np.float32 and a.shape == want for pair in kv for a in pair)


def trim_kv(kv: KV, length: int) -> KV:
    return [(k[:, :, :length], v[:, :, :length]) for k, v in kv]


class KVBuffer:
    """A decoder's KV cache that the graph extends in place: per layer (key, value) arrays [1, H, capacity, d]
    bound as both past and present (GroupQueryAttention then writes only the new positions, as
    onnxruntime-genai runs it); the first `length` positions are valid. The plain path copies the whole cache
    into new present arrays at every step instead (benchmarks/kv_inplace.py, 0.5B-shaped int4 decoder: a step
    in place takes 0.89-0.94x as long at 300 positions, 0.62-0.64x at 2,000). A buffer belongs to one chat:
    what leaves it (`copy`) is copied."""

    def __init__(self, spec: KVSpec, num_layers: int, capacity: int, limit: int):
        self.spec, self.num_layers, self.limit, self.length = spec, num_layers, limit, 0
        self._allocate(min(capacity, limit))

    def _allocate(self, capacity: int) -> None:
        shape = (1, self.spec.heads, capacity, self.spec.head_dim)
        self.arrays = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(self.num_layers)]
        self.values = [tuple(ort.OrtValue.ortvalue_from_numpy(a) for a in pair) for pair in self.arrays]
        self._bound = None  # (graph, its IOBinding over these arrays, the logits array it writes)

    def bound(self, graph: OnnxGraph):
        """The IOBinding that runs `graph` on this buffer, made once per graph and allocation (binding the
        cache's 2 x layers arrays afresh each step cost more than a small decoder's step)."""
        if self._bound is None or self._bound[0] is not graph:
            shape = graph.output_shapes.get(LOGITS, [])
            if not shape or not all(isinstance(d, int) for d in shape):
                raise BackendError(f"graph {graph.name!r}: logits of no fixed shape ({shape}); no in-place KV")
            spec, logits = self.spec, np.empty(shape, np.float32)
            inplace = {}
            for i, (k, v) in enumerate(self.values):
                inplace[spec.past % (i, "key")] = (spec.present % (i, "key"), k)
                inplace[spec.past % (i, "value")] = (spec.present % (i, "value"), v)
            self._bound = (graph, graph.bind_inplace(inplace, LOGITS, logits), logits)
        return self._bound[1:]

    @property
    def capacity(self) -> int:
        return self.arrays[0][0].shape[2]

    def reserve(self, n: int) -> None:
        """Room for n positions (grown 1.5x at a time, up to the context length; the valid ones move along)."""
        if n <= self.capacity:
            return
        if n > self.limit:  # checked here: onnxruntime would only refuse the run, in its own words, on stderr
            raise ContextOverflowError(f"{n} positions do not fit in the context of {self.limit}")
        old, length = self.view(), self.length
        self._allocate(min(max(n, self.capacity * 3 // 2, 256), self.limit))
        self.length = 0
        self.load(old, length)

    def load(self, kv: KV, length: int) -> None:
        """Hold the first `length` positions of a plain KV (copied in)."""
        self.reserve(length)
        for (k, v), (src_k, src_v) in zip(self.arrays, kv):
            k[:, :, :length] = src_k[:, :, :length]
            v[:, :, :length] = src_v[:, :, :length]
        self.length = length

    def view(self) -> KV:  # the valid positions, as views: read them before the buffer runs again
        return [(k[:, :, :self.length], v[:, :, :self.length]) for k, v in self.arrays]

    def copy(self) -> KV:
        return [(k.copy(), v.copy()) for k, v in self.view()]


def kv_length(kv: KV | KVBuffer) -> int:
    """Positions a KV holds."""
    return kv.length if isinstance(kv, KVBuffer) else kv[0][0].shape[2]


def _step_feeds(embeds: np.ndarray, past: int) -> dict[str, np.ndarray]:
    """The per-run inputs of a decoder-with-KV graph: embeds [S, D] at positions past .. past + S - 1."""
    s = embeds.shape[0]
    return {
        EMBEDS: np.ascontiguousarray(embeds[None], np.float32),
        MASK: np.ones((1, past + s), np.int64),
        POSITIONS: np.arange(past, past + s, dtype=np.int64)[None],
    }


def run(graph: OnnxGraph, spec: KVSpec, embeds: np.ndarray, kv: KV) -> tuple[dict[str, np.ndarray], KV]:
    """Run a decoder-with-KV graph on embeds [S, D] after the `past` positions held in kv."""
    feeds = _step_feeds(embeds, kv[0][0].shape[2])
    for i, (k, v) in enumerate(kv):
        feeds[spec.past % (i, "key")] = k
        feeds[spec.past % (i, "value")] = v
    out = graph.run(feeds)
    return out, [(out[spec.present % (i, "key")], out[spec.present % (i, "value")]) for i in range(len(kv))]


def forward(decoder: OnnxGraph, spec: KVSpec, embeds: np.ndarray, kv: KV | KVBuffer,
            quiet: bool = False) -> tuple[np.ndarray, KV | KVBuffer]:
    """The language model on embeds [S, D] -> (logits of the last position [V], kv). A KVBuffer is extended
    in place (and returned); its length moves only once the run succeeded."""
    if not isinstance(kv, KVBuffer):
        out, kv = run(decoder, spec, embeds, kv)
        return out[LOGITS][0, -1], kv
    past, s = kv.length, embeds.shape[0]
    kv.reserve(past + s)
    io, logits = kv.bound(decoder)
    decoder.run_bound(io, _step_feeds(embeds, past), quiet=quiet)
    kv.length = past + s
    return logits[0, -1].copy(), kv  # (the array is written again by the next run)


def compress(compressor: OnnxGraph, image_embeds: np.ndarray) -> np.ndarray:  # [N, D] -> [1, D]
    return compressor.run({compressor.input_names[0]: image_embeds[None]})[compressor.output_names[0]][0]


def prefuse(prefusion: OnnxGraph, spec: KVSpec, text: np.ndarray, image_kv: KV) -> np.ndarray:
    """Pre-fusion: text embeds [S, D] attend (causally) after the image's cached prefix -> fused [S, D]."""
    out, _ = run(prefusion, spec, text, image_kv)
    return out["fused"][0]

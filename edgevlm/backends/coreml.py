"""CoreML ML programs through coremltools (macOS only; imported lazily, only by bundles that place a
component on CoreML).

A graph (the vision encoder) runs like an ONNX graph: named feeds in, named outputs out. The decoder is a
stateful program: its KV cache lives in CoreML state, written at the positions each call covers, so the
cache is trimmed by simply writing over it; like the GGUF decoder it remembers what it holds as keys.
Not run on Linux (coremltools cannot predict there); the export side is verified by reading specs back.
"""

from __future__ import annotations

import platform
from typing import Callable, Sequence

import numpy as np

from ..errors import BackendError, ContextOverflowError
from ..pipeline import common_prefix


def _coremltools():
    if platform.system() != "Darwin":
        raise BackendError("this bundle places a component on CoreML, which predicts on macOS only: "
                           "run it on a Mac, or use the ONNX/GGUF bundle of the same model")
    try:
        import coremltools as ct
    except ImportError:
        raise BackendError("this bundle needs coremltools (pip install 'edgevlm[coreml]')") from None
    return ct


def _package(bundle, comp) -> str:
    """The .mlpackage directory holding a component's spec file (every file in it was verified)."""
    rel = comp.file.split(".mlpackage/")[0] + ".mlpackage"
    for ref in [comp.file] + [r.file for r in comp.data_files]:
        bundle.read(ref)  # verified already: release the in-memory copy; coremltools reads by path
    return str(bundle.path(rel))


class CoremlGraph:
    """One ML program: run(feeds) -> outputs, like OnnxGraph."""

    def __init__(self, name: str, bundle, comp, compute_units: str = "ALL"):
        ct = _coremltools()
        try:
            self.model = ct.models.MLModel(_package(bundle, comp), compute_units=ct.ComputeUnit[compute_units])
        except Exception as e:
            raise BackendError(f"CoreML cannot load {name!r}: {str(e).splitlines()[0][:300]}") from None
        spec = self.model.get_spec()
        self.name = name
        self.input_names = [i.name for i in spec.description.input]
        self.output_names = [o.name for o in spec.description.output]
        self.providers = [f"CoreML:{compute_units}"]

    def run(self, feeds: dict[str, np.ndarray], state=None) -> dict[str, np.ndarray]:
        try:
            out = self.model.predict(feeds, state=state) if state is not None else self.model.predict(feeds)
        except Exception as e:
            raise BackendError(f"CoreML graph {self.name!r} failed: {str(e).splitlines()[0][:300]}") from None
        return {k: np.asarray(v, np.float32) for k, v in out.items()}


class CoremlDecoder:
    """The stateful decoder program, with the GgufDecoder interface (keys, trim, eval_*, logits)."""

    def __init__(self, graph: CoremlGraph, embed: Callable[[np.ndarray], np.ndarray], n_ctx: int, n_vocab: int):
        self.graph, self.embed = graph, embed
        self.state = graph.model.make_state()
        self.n_ctx, self.n_vocab = n_ctx, n_vocab
        self.keys: list = []
        self._logits = np.zeros(n_vocab, np.float32)

    def common_prefix(self, keys: Sequence) -> int:
        return common_prefix(self.keys, keys)

    def trim(self, n: int) -> None:  # later positions are masked out, then overwritten
        del self.keys[n:]

    def eval_tokens(self, ids: np.ndarray, keys: Sequence) -> None:
        self.eval_embeds(self.embed(np.asarray(ids, np.int64)), keys)

    def eval_embeds(self, x: np.ndarray, keys: Sequence) -> None:  # x: [S, D]
        past, s = len(self.keys), x.shape[0]
        if past + s > self.n_ctx:
            raise ContextOverflowError(f"{past + s} positions, the CoreML decoder's state holds {self.n_ctx}")
        mask = np.triu(np.full((s, past + s), -np.inf, np.float32), k=past + 1)[None, None]
        feeds = {"inputs_embeds": x[None].astype(np.float16), "position_ids": np.arange(past, past + s, dtype=np.int32)[None],
                 "causal_mask": mask.astype(np.float16)}
        self._logits = self.graph.run(feeds, state=self.state)["logits"].reshape(-1)
        self.keys.extend(keys)

    def logits(self) -> np.ndarray:
        return self._logits.copy()

"""The CoreML decoder: a stateful ML program whose KV cache lives in CoreML state, written at the positions
each call covers, so trimming is forgetting a count. macOS only (coremltools predicts there); on Linux the
export is verified by reading specs back (tests/test_coreml.py)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..backends.coreml import CoremlGraph
from ..contract import EMBEDS, LOGITS, POSITIONS
from ..errors import ContextOverflowError
from .base import ContextDecoder


class CoremlDecoder(ContextDecoder):
    backend = "coreml"
    takes_embeds = True

    def __init__(self, graph: CoremlGraph, embed_ids: Callable[[np.ndarray], np.ndarray], n_ctx: int, n_vocab: int):
        super().__init__(n_ctx)
        self.graph, self.embed_ids = graph, embed_ids
        self.state = graph.model.make_state()
        self.n_vocab = n_vocab
        self._logits = np.zeros(n_vocab, np.float32)

    @classmethod
    def from_bundle(cls, m, bundle, graphs: dict, embed_ids, threads: int, n_ctx: int) -> "CoremlDecoder":
        return cls(graphs["decoder"], embed_ids, n_ctx, m.vocab_size)

    def eval_tokens(self, ids: np.ndarray, keys: Sequence) -> None:
        self.eval_embeds(self.embed_ids(np.asarray(ids, np.int64)), keys)

    def eval_embeds(self, x: np.ndarray, keys: Sequence) -> None:  # x: [S, D]
        past, s = len(self.keys), x.shape[0]
        if past + s > self.n_ctx:
            raise ContextOverflowError(f"{past + s} positions, the CoreML decoder's state holds {self.n_ctx}")
        mask = np.triu(np.full((s, past + s), -np.inf, np.float32), k=past + 1)[None, None]
        feeds = {EMBEDS: x[None].astype(np.float16), POSITIONS: np.arange(past, past + s, dtype=np.int32)[None],
                 "causal_mask": mask.astype(np.float16)}
        self._logits = self.graph.run(feeds, state=self.state)[LOGITS].reshape(-1)
        self.keys.extend(keys)

    def logits(self) -> np.ndarray:
        return self._logits.copy()

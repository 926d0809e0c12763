"""The decoder interface: every language-model backend (ONNX, static ONNX, llama.cpp, CoreML) implements it.

A chat keeps a `State`: the cache keys of the positions its KV holds (a token id, or (image key, row) for an
image row, or ("fused", image key, id) for LLaVA-Mini's fused text) and, where the backend gives each chat its
own KV (ONNX), the arrays. Backends whose KV lives in one context shared by every chat (llama.cpp, CoreML
state, the static cache) derive from `ContextDecoder`: the context remembers which keys it holds, a chat
reuses the longest prefix it shares with them, and a chat that finds another chat's prefix there runs its own
again. The prefix cache's entries are each backend's own format (`entry_variant`, `entry`, `restore`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from ..errors import BackendError

Key = object  # int | (image key, row) | ("fused", image key, id) | None (never reused)


def common_prefix(a: Sequence, b: Sequence) -> int:
    """How many leading positions two cache-key lists share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class State:
    """A chat's KV cache: the keys of its positions, and the backend's arrays (None: the context holds them)."""

    keys: list = field(default_factory=list)
    kv: object = None


@dataclass(frozen=True)
class Prompt:
    """What a decoder may need of a prompt: ids [S] and their cache keys; from a position on, the input
    embeddings (text, fused text and image rows: [S - start, D]); or the image rows of positions a..b."""

    ids: np.ndarray
    keys: list
    embed: Callable[[np.ndarray, list, int], np.ndarray]  # (ids, keys, start) -> [S - start, D]
    rows: Callable[[list], np.ndarray]  # image keys [(image key, row), ...] -> [n, D]

    def embeds(self, start: int) -> np.ndarray:
        return self.embed(self.ids, self.keys, start)

    def image_rows(self, a: int, b: int) -> np.ndarray:
        return self.rows(self.keys[a:b])

    @property
    def is_image(self) -> np.ndarray:  # [S] bool: the positions holding an image row
        return np.asarray([isinstance(k, tuple) and len(k) == 2 for k in self.keys], bool)

    def extended(self, tokens: list[int]) -> "Prompt":
        """The prompt followed by generated tokens (text positions)."""
        return Prompt(np.concatenate([self.ids, np.asarray(tokens, np.int64)]), self.keys + list(tokens),
                      self.embed, self.rows)


class Decoder(Protocol):
    backend: str  # "onnx" | "gguf" | "coreml": what Response.backend reports
    n_ctx: int  # positions its KV holds at most
    entry_variant: str  # the prefix-cache entry format ("" when it keeps none)
    shared: bool  # one context for every chat (llama.cpp, CoreML, static): chats take turns, never run at once

    def new_state(self) -> State: ...

    def reuse(self, state: State, keys: list, lookup) -> tuple[State, int, str]:
        """Where the prompt `keys` can start: (the state to run on, positions reused, from where: "chat",
        "ram"/"disk" (lookup(keys, at_least) -> (n, arrays, where, stored keys)), "decoder" or "")."""

    def prefill(self, state: State, prompt: Prompt, start: int) -> np.ndarray:
        """Run the prompt from position `start` -> logits [V]; state.keys become prompt.keys."""

    def step(self, state: State, token: int, prompt: Prompt | None = None) -> np.ndarray:
        """One generated token after state.keys -> logits [V]. `prompt` (the last prefill's, for a decoder whose
        shared context another chat used meanwhile) lets it rebuild the cache."""

    def entry(self, state: State) -> dict[str, np.ndarray] | None:
        """The state as prefix-cache arrays (copies), or None."""

    def entry_fits(self, arrays: dict[str, np.ndarray], length: int) -> bool: ...

    def reset(self) -> None:
        """Forget what a shared context holds (the next prompt runs whole)."""

    def warmup(self) -> None:
        """Run once each way it runs (runtimes allocate on a graph's first run), keeping nothing."""


def reuse_from_chat(state: State, keys: list) -> int:
    """Positions of `keys` a chat's own state holds (at least one position always runs: its logits)."""
    return min(common_prefix(state.keys, keys), len(keys) - 1)


class ContextDecoder:
    """A decoder whose KV lives in one context that every chat shares: `keys` says what it holds.
    Subclasses give eval_tokens(ids, keys), eval_embeds(x [S, D], keys), logits() and, for the prefix cache,
    may override entry_variant / entry / restore."""

    backend = "onnx"
    takes_embeds = True  # the whole prompt goes in as embeds (else: text as tokens, image rows as embeds)
    entry_variant = ""
    shared = True

    def __init__(self, n_ctx: int):
        self.n_ctx = n_ctx
        self.keys: list = []

    def new_state(self) -> State:
        return State()

    def common_prefix(self, keys: Sequence) -> int:
        return common_prefix(self.keys, keys)

    def trim(self, n: int) -> None:  # keep the first n cached positions
        del self.keys[n:]

    def reset(self) -> None:
        self.trim(0)

    def warmup(self) -> None:  # a two-position prompt, then one more (keys None: never reused)
        self.trim(0)
        self.eval_tokens(np.zeros(2, np.int64), [None, None])
        self.eval_tokens(np.zeros(1, np.int64), [None])
        self.trim(0)

    def reuse(self, state: State, keys: list, lookup) -> tuple[State, int, str]:
        own = reuse_from_chat(state, keys)
        held = min(self.common_prefix(keys), len(keys) - 1)
        if self.entry_variant:
            n, arrays, where, stored = lookup(keys, max(own, held))
            if arrays is not None and self.restore(arrays, stored):
                self.trim(n)
                return state, n, where
        if held > own:
            return state, held, "decoder"  # another chat's prefix, still in the context
        return state, own, "chat" if own else ""

    def prefill(self, state: State, prompt: Prompt, start: int) -> np.ndarray:
        start = min(start, self.common_prefix(prompt.keys), len(prompt.keys) - 1)
        self.trim(start)
        if self.takes_embeds:
            self.eval_embeds(prompt.embeds(start), prompt.keys[start:])
        else:  # text runs as tokens (the model's own embedding table), image runs as embedding rows
            img = prompt.is_image
            edges = [start] + [i for i in range(start + 1, len(img)) if img[i] != img[i - 1]] + [len(img)]
            for a, b in zip(edges, edges[1:]):
                if img[a]:
                    self.eval_embeds(prompt.image_rows(a, b), prompt.keys[a:b])
                else:
                    self.eval_tokens(prompt.ids[a:b], prompt.keys[a:b])
        state.keys = list(prompt.keys)
        return self.logits()

    def step(self, state: State, token: int, prompt: Prompt | None = None) -> np.ndarray:
        if self.keys != state.keys:  # another chat used the context meanwhile: rebuild this chat's cache
            if prompt is None or state.keys[:len(prompt.keys)] != prompt.keys:
                raise BackendError("the shared decoder context was used by another chat: ask again")
            grown = prompt.extended(state.keys[len(prompt.keys):] + [token])
            return self.prefill(state, grown, self.common_prefix(grown.keys))
        self.eval_tokens(np.asarray([token], np.int64), [token])
        state.keys.append(token)
        return self.logits()

    def entry(self, state: State) -> dict[str, np.ndarray] | None:
        return None

    def entry_fits(self, arrays: dict[str, np.ndarray], length: int) -> bool:
        return False

    def restore(self, arrays: dict[str, np.ndarray], keys: Sequence) -> bool:
        return False

"""The generation loop: a Chat holds messages and the KV cache; `stream` yields one Response per token."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from .errors import ArgumentError, ContextOverflowError
from .pipeline import common_prefix
from .profile import STAGES, peak_rss_bytes
from .sampling import make_sampler

if TYPE_CHECKING:
    from .model import VLM


@dataclass(frozen=True)
class Response:
    """One generated token. The CLI, the server and the benchmarks read these fields; nothing re-times."""

    text: str  # new text since the previous Response (may be "" while a stop string is pending)
    token: int
    finish_reason: str | None  # None while generating, then "stop" (EOS or stop string) or "length"
    ttft_s: float  # call start -> first token sampled
    stages: dict[str, float] = field(default_factory=dict)  # seconds of the stages that ran (profile.STAGES)
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually run (the rest came from a KV cache)
    prompt_tps: float = 0.0
    generated_tokens: int = 0
    decode_tps: float = 0.0
    image_cache_hits: int = 0  # images of this call found cached (not encoded)
    image_cache_source: str = ""  # "ram", "disk", or "" (encoded now, or no image)
    prefix_cache_hit_tokens: int = 0  # prompt positions whose KV came from the prefix cache (not this chat)
    prefix_cache_source: str = ""  # where the reused KV came from: "chat", "ram", "disk", "decoder", or ""
    cache_bytes: dict[str, int] = field(default_factory=dict)  # entries and bytes per cache tier (Caches.stats)
    peak_rss_bytes: int = 0  # the process's peak resident memory at the first token
    backend: str = ""  # the decoder's backend: onnx, gguf, coreml

    @property
    def warm(self) -> bool:
        """Did any cache serve this call (an image, or part of the prompt's KV)?"""
        return self.image_cache_hits > 0 or self.prefilled_tokens < self.prompt_tokens

    @property
    def profile(self) -> dict:
        """One flat, JSON-ready record of this call's first-token path: every stage of profile.STAGES (0.0
        when it did not run), cold/warm, cache hits and sizes, peak RSS. The CLI, the server's /stats and
        `edgevlm bench` all read this."""
        return {"ttft_s": self.ttft_s, "warm": self.warm, "backend": self.backend,
                **{f"{s}_s": self.stages.get(s, 0.0) for s in STAGES},
                "prompt_tokens": self.prompt_tokens, "prefilled_tokens": self.prefilled_tokens,
                "image_cache_hits": self.image_cache_hits, "image_cache_source": self.image_cache_source,
                "prefix_cache_hit_tokens": self.prefix_cache_hit_tokens,
                "prefix_cache_source": self.prefix_cache_source, "prompt_tps": self.prompt_tps,
                "decode_tps": self.decode_tps, "generated_tokens": self.generated_tokens,
                "peak_rss_bytes": self.peak_rss_bytes, **{f"cache_{k}": v for k, v in self.cache_bytes.items()}}


def _pending_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _strings(x) -> bool:
    return x is None or (isinstance(x, (list, tuple)) and all(isinstance(s, str) for s in x))


class Chat:
    """A multi-turn conversation. The KV cache is kept between turns; each image is encoded once."""

    def __init__(self, vlm: "VLM", system: str | None = None):
        self.vlm = vlm
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self._images: list[str] = []  # image keys in prompt order
        self._states: dict[str, dict] = {}  # image key -> what depends only on that image
        self._keys: list = []  # what the KV cache holds: token ids, or (image key, row) at image positions
        self._kv = self.vlm._empty_kv()

    def add_turn(self, text: str, answer: str, image=None, max_image_tokens: int | None = None) -> None:
        """Record a past exchange without generating (e.g. the history an API request carries); the next
        `stream` prefills it, reusing cached image embeds and KV where it can."""
        content = [{"type": "text", "text": text}]
        if image is not None:
            key, state, _, _ = self.vlm._image_embeds(image, max_image_tokens)
            self._states[key] = state
            self._images = self._images + [key]
            content.insert(0, {"type": "image"})
        self.messages = self.messages + [{"role": "user", "content": content},
                                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]

    def prepare(self, share: bool = False) -> int:
        """Prefill what the chat template already fixes of the next user turn (the end of the last answer, the
        turn separator, the user header; on a new chat, the system prompt), e.g. while the user reads and types,
        so the next `stream` prefills only the new message. Returns how many positions it ran (0: nothing to
        run). The conversation itself does not change; a next turn that renders differently (another template
        branch) simply reuses less. share=True also offers the KV to the prefix cache: for a stateless server,
        whose client sends the whole conversation again as a new chat."""
        vlm = self.vlm
        states = [self._states[k] for k in self._images]
        probes = [vlm._prompt_ids(self.messages + [{"role": "user", "content": [{"type": "text", "text": t}]}],
                                  len(self._images), states).tolist() for t in ("0", "1")]
        n = common_prefix(probes[0], probes[1])  # where the two user messages start to differ
        if n == 0 or n >= vlm.context_length - 1:
            return 0
        ids = np.asarray(probes[0][:n], np.int64)
        keys = vlm._keys_for(ids, self._images, states)
        if common_prefix(self._keys, keys) >= n:
            return 0
        reuse, kv, _ = vlm._find_prefix(keys, self._keys, self._kv)
        _, kv, got = vlm._prefill(ids, keys, self._states, reuse, kv, {})
        self._keys, self._kv = keys, kv
        if share:
            vlm._remember(self._keys, self._kv)
        return n - got

    def send(self, text: str, image=None, **kwargs) -> str:
        return "".join(r.text for r in self.stream(text, image=image, **kwargs))

    def stream(
        self,
        text: str,
        image=None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        max_image_tokens: int | None = None,
        logit_bias: dict[int, float] | None = None,
    ) -> Iterator[Response]:
        vlm, m = self.vlm, self.vlm.manifest
        t0 = time.perf_counter()
        stages: dict[str, float] = {}
        hits, image_source = 0, ""
        if image is not None:
            key, state, image_source, img_stages = vlm._image_embeds(image, max_image_tokens)
            stages.update(img_stages)
            hits += bool(image_source)
            self._states[key] = state
        sampler = make_sampler(temperature, top_k, top_p, repetition_penalty, seed, logit_bias)
        vocab = int(m.components["decoder"].outputs["logits"][-1])
        if logit_bias and max(logit_bias) >= vocab:  # keys are checked to be ints by make_sampler
            raise ArgumentError(f"logit_bias names token {max(logit_bias)}; the vocabulary has {vocab}")
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s] if _strings(stop) else None
        if stops is None:
            raise ArgumentError("stop must be a string or a list of strings")
        try:
            max_tokens = m.generation.max_new_tokens if max_tokens is None else int(max_tokens)
        except (TypeError, ValueError, OverflowError):
            raise ArgumentError(f"max_tokens must be an integer, got {max_tokens!r}") from None
        if max_tokens < 1:
            raise ArgumentError("max_tokens must be at least 1")

        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
        messages = self.messages + [{"role": "user", "content": content}]
        images = self._images + ([key] if image is not None else [])
        t = time.perf_counter()
        image_states = [self._states[k] for k in images]
        ids = vlm._prompt_ids(messages, len(images), image_states)
        ctx = vlm.context_length
        if len(ids) >= ctx:
            raise ContextOverflowError(
                f"the prompt is {len(ids)} tokens but the context holds {ctx}: shorten the prompt, "
                "start a new chat, or use fewer images"
            )
        keys = vlm._keys_for(ids, images, image_states)
        t_ids = time.perf_counter() - t  # template + tokenizer: counted in the embed stage
        t = time.perf_counter()
        reuse, kv, source = vlm._find_prefix(keys, self._keys, self._kv)  # at least one position runs (logits)
        stages["cache"] = stages.get("cache", 0.0) + time.perf_counter() - t
        logits, kv, got = vlm._prefill(ids, keys, self._states, reuse, kv, stages)
        stages["embed"] += t_ids
        if got > reuse:  # a GGUF/CoreML decoder still held a longer prefix from another call
            source = "decoder"
        reuse = got
        source = source if reuse else ""
        suffix = ids[reuse:]
        profile = dict(image_cache_hits=hits, image_cache_source=image_source, prefix_cache_source=source,
                       prefix_cache_hit_tokens=reuse if source in ("ram", "disk", "decoder") else 0,
                       backend=m.components["decoder"].backend)
        # commit the prompt now: even if the caller stops iterating, the chat stays consistent
        self.messages, self._images = messages, images
        self._keys, self._kv = keys, kv

        generated: list[int] = []
        emitted = 0
        ttft = 0.0
        t_first = 0.0
        eos = set(m.generation.eos_token_ids)
        finish = None
        answer = ""
        try:
            while True:
                tok = sampler(logits, generated)
                generated.append(tok)
                now = time.perf_counter()
                if len(generated) == 1:
                    ttft, t_first = now - t0, now
                    profile.update(peak_rss_bytes=peak_rss_bytes(), cache_bytes=vlm.caches.stats())
                full = vlm.tokenizer.decode(generated, skip_special_tokens=True)
                if tok in eos:
                    finish = "stop"
                cut = min((full.find(s) for s in stops if s in full), default=-1)
                if cut >= 0:
                    full, finish = full[:cut], "stop"
                if finish is None and (len(generated) >= max_tokens or len(self._keys) + 1 >= ctx):
                    finish = "length"
                safe = len(full) if finish else len(full) - _pending_stop(full, stops)
                while safe > emitted and full[safe - 1] == "\ufffd" and not finish:
                    safe -= 1  # an incomplete UTF-8 sequence: wait for the next token
                delta, emitted, answer = full[emitted:safe], max(emitted, safe), full
                n = len(generated)
                yield Response(
                    text=delta, token=tok, finish_reason=finish, ttft_s=ttft, stages=dict(stages),
                    prompt_tokens=len(ids), prefilled_tokens=len(suffix),
                    prompt_tps=len(suffix) / max(stages["prefill"], 1e-9), generated_tokens=n,
                    decode_tps=(n - 1) / max(now - t_first, 1e-9) if n > 1 else 0.0, **profile,
                )
                if finish:
                    break
                t = time.perf_counter()
                logits, self._kv = vlm._decode(tok, self._kv, self._keys, self._states)
                self._keys.append(tok)
                if n == 1:
                    stages["first_decode"] = time.perf_counter() - t
        finally:
            self.messages = self.messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
            vlm._remember(self._keys, self._kv)  # prefix cache; disk writes happen here, after the first token

"""The generation loop: a Chat holds messages and the KV cache; `stream` yields one Response per token."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence


from .errors import ArgumentError, ContextOverflowError
from .pipeline import common_prefix
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
    stages: dict[str, float] = field(default_factory=dict)  # seconds: preprocess, encode, embed, prefill, ...
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually run (the rest came from the KV cache)
    prompt_tps: float = 0.0
    generated_tokens: int = 0
    decode_tps: float = 0.0
    image_cache_hits: int = 0


def _pending_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


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
    ) -> Iterator[Response]:
        vlm, m = self.vlm, self.vlm.manifest
        t0 = time.perf_counter()
        stages: dict[str, float] = {}
        hits = 0
        if image is not None:
            key, state, hit, img_stages = vlm._image_embeds(image)
            stages.update(img_stages)
            hits += hit
            self._states[key] = state
        sampler = make_sampler(temperature, top_k, top_p, repetition_penalty, seed)
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        max_tokens = m.generation.max_new_tokens if max_tokens is None else int(max_tokens)
        if max_tokens < 1:
            raise ArgumentError("max_tokens must be at least 1")

        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
        messages = self.messages + [{"role": "user", "content": content}]
        images = self._images + ([key] if image is not None else [])
        t = time.perf_counter()
        ids = vlm._prompt_ids(messages, len(images))
        ctx = vlm.context_length
        if len(ids) >= ctx:
            raise ContextOverflowError(
                f"the prompt is {len(ids)} tokens but the context holds {ctx}: shorten the prompt, "
                "start a new chat, or use fewer images"
            )
        keys = vlm._keys_for(ids, images)
        reuse = min(common_prefix(self._keys, keys), len(keys) - 1)  # at least one token must run to give logits
        t_ids = time.perf_counter() - t  # template + tokenizer: counted in the embed stage
        logits, kv, reuse = vlm._prefill(ids, keys, self._states, reuse, self._kv, stages)
        stages["embed"] += t_ids
        suffix = ids[reuse:]
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
                    decode_tps=(n - 1) / max(now - t_first, 1e-9) if n > 1 else 0.0, image_cache_hits=hits,
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

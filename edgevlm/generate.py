"""The generation loop, in three layers (as mlx-lm's generate_step -> stream_generate -> generate):

    token_steps(decoder, state, ...)   sample a token, process, stop (EOS, length, context end), decode one more
    Chat.stream(text, image, ...)      a turn: the prompt, its prefill, token_steps, text (incremental), Responses
    Chat.send / VLM.generate           the joined text of stream

A Chat holds the messages and its decoder State (the KV cache and what it holds) between turns.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
from tokenizers.decoders import DecodeStream

from . import media
from .constrain import grammar_of
from .decoders import Decoder, Prompt, State, common_prefix
from .errors import ArgumentError, ContextOverflowError, EdgeVLMError
from .profile import STAGES, peak_rss_bytes
from .sampling import Processor, Sampler, make_logits_processors, make_sampler


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
    logprob: float | None = None  # with logprobs=True: log p(token) under the model's raw logits
    top_logprobs: tuple[tuple[int, float], ...] = ()  # with top_logprobs=k: the k likeliest (token, log p)

    @property
    def warm(self) -> bool:
        """Did any cache serve this call (an image, or part of the prompt's KV)?"""
        return self.image_cache_hits > 0 or self.prefilled_tokens < self.prompt_tokens

    def figures(self) -> dict:
        """Every field but the token and its text, and `warm`: what the chat command's /stats and /save and the
        server's `edgevlm` reply field report."""
        d = dataclasses.asdict(self)
        skip = ("text", "token", "finish_reason", "logprob", "top_logprobs")
        return {**{k: v for k, v in d.items() if k not in skip}, "warm": self.warm}

    @property
    def profile(self) -> dict:
        """One flat, JSON-ready record of this call's first-token path: every stage of profile.STAGES (0.0
        when it did not run), cold/warm, cache hits and sizes, peak RSS. `edgevlm bench` and the benchmarks read
        this; the chat command and the server report `figures()`, the same fields unflattened."""
        return {"ttft_s": self.ttft_s, "warm": self.warm, "backend": self.backend,
                **{f"{s}_s": self.stages.get(s, 0.0) for s in STAGES},
                "prompt_tokens": self.prompt_tokens, "prefilled_tokens": self.prefilled_tokens,
                "image_cache_hits": self.image_cache_hits, "image_cache_source": self.image_cache_source,
                "prefix_cache_hit_tokens": self.prefix_cache_hit_tokens,
                "prefix_cache_source": self.prefix_cache_source, "prompt_tps": self.prompt_tps,
                "decode_tps": self.decode_tps, "generated_tokens": self.generated_tokens,
                "peak_rss_bytes": self.peak_rss_bytes, **{f"cache_{k}": v for k, v in self.cache_bytes.items()}}


def token_steps(decoder: Decoder, state: State, prompt: Prompt, logits: np.ndarray, sample: Sampler,
                processors: Sequence[Processor], max_tokens: int, eos: set[int],
                timings: dict | None = None) -> Iterator[tuple[int, str | None, np.ndarray]]:
    """(token, finish reason, the model's logits it was sampled from [V]) per generated token. The reason is
    None while generating, then "stop" (an end-of-turn token) or "length" (max_tokens, or the context's end).
    The first decode step's seconds go to timings["first_decode"]."""
    history: list[int] = []
    while True:
        raw = logits
        for p in processors:
            logits = p(logits, history)
        tok = sample(logits)
        history.append(tok)
        finish = "stop" if tok in eos else None
        if finish is None and (len(history) >= max_tokens or len(state.keys) + 1 >= decoder.n_ctx):
            finish = "length"
        yield tok, finish, raw
        if finish:
            return
        t = time.perf_counter()
        logits = decoder.step(state, tok, prompt)
        if timings is not None and len(history) == 1:
            timings["first_decode"] = time.perf_counter() - t


def log_probs(logits: np.ndarray, token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The model's log-probability of `token` and its `top` most likely tokens with theirs, from raw logits [V]."""
    x = logits.astype(np.float64)
    x = x - x.max()
    lp = x - np.log(np.exp(x).sum())
    best = np.argpartition(-lp, top - 1)[:top] if top else np.zeros(0, np.int64)
    best = best[np.argsort(-lp[best], kind="stable")]
    return float(lp[token]), tuple((int(i), float(lp[i])) for i in best)


class Detokenizer:
    """Token ids -> text, incrementally (tokenizers' DecodeStream: each token costs its own bytes, not a decode of
    the whole answer), held back at stop strings that may be forming. `add` -> the text that can be shown now."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer, self.stops = tokenizer, list(stops)
        self._stream = DecodeStream(skip_special_tokens=True)
        self.text, self.shown, self.stopped, self.ids = "", 0, False, []

    def add(self, token: int, last: bool) -> str:
        piece = self._stream.step(self.tokenizer, token)
        self.text += piece or ""
        self.ids.append(token)
        if last:  # bytes of an unfinished character are held back by the stream: show them as the full decode does
            full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            if full.startswith(self.text):
                self.text = full
        cut = min((self.text.find(s) for s in self.stops if s in self.text), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
        safe = len(self.text) if (last or self.stopped) else len(self.text) - _pending_stop(self.text, self.stops)
        delta, self.shown = self.text[self.shown:max(safe, self.shown)], max(self.shown, safe)
        return delta


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

    def __init__(self, vlm, system: str | None = None):  # vlm: edgevlm.model.VLM
        self.vlm = vlm
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self._items: list[media.Item] = []  # the conversation's images and videos, in the messages' order
        self._state = self.vlm.decoder.new_state()  # the KV cache and the keys of its positions
        self._prompt: Prompt | None = None  # the last prefill's (a shared decoder context may need it again)

    @property
    def images(self) -> list[str]:
        """Cache keys of the conversation's images and videos, in the messages' order."""
        return [it.key for it in self._items]

    def add_turn(self, text, answer: str, image=None, max_image_tokens: int | None = None, images=None,
                 video=None) -> None:
        """Record a past exchange without generating (e.g. the history an API request carries); the next
        `stream` prefills it, reusing cached image embeds and KV where it can. text, image, images, video: as
        `stream` takes them."""
        items, content, _, _ = self._media(media.parts_of(text, image, images, video), max_image_tokens, {})
        self._items = items
        self.messages = self.messages + [{"role": "user", "content": content},
                                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]

    def _media(self, parts: list, max_image_tokens: int | None, stages: dict) -> tuple[list, list, int, str]:
        """The conversation's media with this turn's parts added -> (items, the new message's content, how many
        came from a cache, where the first of them was). Earlier images re-encode when the prompt starts to hold
        several under a layout that takes several differently (LLaVA-OneVision)."""
        vlm, limits = self.vlm, self.vlm.limits
        new = [(k, v) for k, v in parts if k != "text"]
        if len(new) > limits.images:
            raise ArgumentError(f"{len(new)} images or videos in one message; the limit is {limits.images} "
                                "(edgevlm.Limits.images)")
        if vlm.manifest.fusion == "prefusion" and len(self._items) + len(new) > 1:
            raise EdgeVLMError(media.ONE_FOR_PREFUSION)
        is_multi = media.multi(vlm, sum(it.kind == "image" for it in self._items) + sum(k == "image" for k, _ in new))
        items = [it if it.kind != "image" or it.multi == is_multi else
                 media.image_item(vlm, it.source, it.budget, is_multi, None, {})[0] for it in self._items]
        spend, content, hits, where = media.PixelBudget(limits.request_pixels), [], 0, ""
        for kind, value in parts:
            if kind == "text":
                content.append({"type": "text", "text": value})
                continue
            if kind == "image":
                item, found = media.image_item(vlm, value, max_image_tokens, is_multi, spend, stages)
            else:
                item, found = media.video_item(vlm, value, max_image_tokens, spend, stages)
            items.append(item)
            content += item.content
            hits, where = hits + bool(found), where or found
        return items, content, hits, where

    def prepare(self, share: bool = False) -> int:
        """Prefill what the chat template already fixes of the next user turn (the end of the last answer, the
        turn separator, the user header; on a new chat, the system prompt), e.g. while the user reads and types,
        so the next `stream` prefills only the new message. Returns how many positions it ran (0: nothing to
        run). The conversation itself does not change; a next turn that renders differently (another template
        branch) simply reuses less. share=True also offers the KV to the prefix cache: for a stateless server,
        whose client sends the whole conversation again as a new chat."""
        vlm, items = self.vlm, self._items
        probes = [vlm.render(self.messages + [{"role": "user", "content": [{"type": "text", "text": t}]}],
                             [it.state for it in items]) for t in ("0", "1")]
        n = common_prefix(probes[0][0].tolist(), probes[1][0].tolist())  # where the two user messages differ
        if n == 0 or n >= vlm.context_length - 1:
            return 0
        ids, ordered = probes[0][0][:n], [items[i] for i in probes[0][1]]
        keys = vlm.cache_keys(ids, [it.key for it in ordered], [it.state for it in ordered])
        if common_prefix(self._state.keys, keys) >= n:
            return 0
        state, reuse, _ = vlm.decoder.reuse(self._state, keys, vlm.caches.lookup_prefix)
        self._prompt = vlm.prompt(ids, keys, {it.key: it.state for it in items})
        vlm.decoder.prefill(state, self._prompt, reuse)
        self._state = state
        if share:
            vlm.remember(self._state)
        return n - reuse

    def send(self, text, image=None, **kwargs) -> str:
        return "".join(r.text for r in self.stream(text, image=image, **kwargs))

    def stream(self, text, image=None, max_tokens: int | None = None, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: Sequence[str] | str | None = None, max_image_tokens: int | None = None,
               logit_bias: dict[int, float] | None = None, response_format: dict | None = None,
               json_schema: dict | None = None, logprobs: bool = False, top_logprobs: int = 0, images=None,
               video=None) -> Iterator[Response]:
        """One turn: a Response per generated token (the last one carries finish_reason). text: a string (then
        image, images and video come before it, in that order) or a list of parts in order: strings, images,
        edgevlm.Video (or {"type": "text"|"image"|"video", ...} dicts). response_format / json_schema constrain
        the answer (edgevlm.constrain); logprobs / top_logprobs add the model's log-probabilities to each
        Response."""
        vlm, m = self.vlm, self.vlm.manifest
        t0 = time.perf_counter()
        stages: dict[str, float] = {}
        sample = make_sampler(temperature, top_k, top_p, seed)
        processors = make_logits_processors(repetition_penalty, logit_bias, m.vocab_size)
        if json_schema is not None:
            response_format = {"type": "json_schema", "json_schema": {"schema": json_schema}}
        grammar = grammar_of(response_format)
        if grammar is not None:  # the mask goes last: nothing after it may lift a banned token
            processors.append(vlm.token_table().processor(grammar))
        top = _top_logprobs(logprobs, top_logprobs)
        detok = Detokenizer(vlm.tokenizer, _stop_strings(stop))
        max_tokens = _max_tokens(max_tokens, m.generation.max_new_tokens)
        logits, profile = self._begin(media.parts_of(text, image, images, video), max_image_tokens, stages)
        steps = token_steps(vlm.decoder, self._state, self._prompt, logits, sample, processors, max_tokens,
                            set(m.generation.eos_token_ids), stages)
        n, t_first = 0, 0.0
        try:
            for tok, finish, raw in steps:
                n, now = n + 1, time.perf_counter()
                if top is not None:
                    profile["logprob"], profile["top_logprobs"] = log_probs(raw, tok, top)
                if n == 1:
                    t_first = now
                    profile.update(peak_rss_bytes=peak_rss_bytes(), cache_bytes=vlm.caches.stats(), ttft_s=now - t0)
                delta = detok.add(tok, last=finish is not None)
                finish = "stop" if detok.stopped else finish
                yield Response(text=delta, token=tok, finish_reason=finish, stages=dict(stages), generated_tokens=n,
                               decode_tps=(n - 1) / max(now - t_first, 1e-9) if n > 1 else 0.0, **profile)
                if finish:
                    break
        finally:
            steps.close()
            self.messages = self.messages + [{"role": "assistant", "content": [{"type": "text", "text": detok.text}]}]
            self.vlm.remember(self._state)  # prefix cache; disk writes happen here, after the first token

    def _begin(self, parts: list, max_image_tokens: int | None, stages: dict,
               reuse: bool = True) -> tuple[np.ndarray, dict]:
        """The turn up to its first logits: its media's states, the prompt (reused where a cache holds it, unless
        reuse=False), its prefill, committed to the chat. -> (logits [V], the Response fields known now)."""
        vlm = self.vlm
        items, content, hits, image_source = self._media(parts, max_image_tokens, stages)
        messages = self.messages + [{"role": "user", "content": content}]
        t = time.perf_counter()
        ids, order = vlm.render(messages, [it.state for it in items])
        if len(ids) >= vlm.context_length:
            raise ContextOverflowError(f"the prompt is {len(ids)} tokens but the context holds {vlm.context_length}: "
                                       "shorten the prompt, start a new chat, or use fewer images")
        ordered = [items[i] for i in order]
        keys = vlm.cache_keys(ids, [it.key for it in ordered], [it.state for it in ordered])
        stages["embed"] = time.perf_counter() - t  # template + tokenizer (+ the embedding graph, below)
        t = time.perf_counter()
        if reuse:
            state, reused, source = vlm.decoder.reuse(self._state, keys, vlm.caches.lookup_prefix)
        else:
            state, reused, source = vlm.decoder.new_state(), 0, ""
        stages["cache"] = stages.get("cache", 0.0) + time.perf_counter() - t
        prompt = vlm.prompt(ids, keys, {it.key: it.state for it in items}, stages)
        t, inner = time.perf_counter(), stages["embed"] + stages.get("prefusion", 0.0)
        logits = vlm.decoder.prefill(state, prompt, reused)
        stages["prefill"] = time.perf_counter() - t - (stages["embed"] + stages.get("prefusion", 0.0) - inner)
        # commit the prompt now: even if the caller stops iterating, the chat stays consistent
        self.messages, self._items, self._state, self._prompt = messages, items, state, prompt
        return logits, dict(image_cache_hits=hits, image_cache_source=image_source, prefix_cache_source=source,
                            prefix_cache_hit_tokens=reused if source in ("ram", "disk", "decoder") else 0,
                            backend=vlm.decoder.backend, prompt_tokens=len(ids), prefilled_tokens=len(ids) - reused,
                            prompt_tps=(len(ids) - reused) / max(stages["prefill"], 1e-9))


def _stop_strings(stop) -> list[str]:
    if isinstance(stop, str):
        return [stop] if stop else []
    if stop is None or (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)):
        return [s for s in (stop or []) if s]
    raise ArgumentError("stop must be a string or a list of strings")


def _top_logprobs(logprobs, top) -> int | None:
    """None: no log-probabilities; else how many alternatives per token (0-20, as OpenAI)."""
    if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20:
        raise ArgumentError("top_logprobs must be an integer from 0 to 20")
    if top and not logprobs:
        raise ArgumentError("top_logprobs needs logprobs=True")
    return top if logprobs else None


def _max_tokens(value, default: int) -> int:
    try:
        n = default if value is None else int(value)
    except (TypeError, ValueError, OverflowError):
        raise ArgumentError(f"max_tokens must be an integer, got {value!r:.40}") from None
    if n < 1:
        raise ArgumentError("max_tokens must be at least 1")
    return n

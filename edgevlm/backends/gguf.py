"""llama.cpp as the language model, through llama-cpp-python's low-level API (imported only here, lazily).

One llama context holds one KV cache (sequence 0). The decoder remembers what that cache holds as a list
of keys (token ids, or (image key, row) for image rows), so every caller reuses the longest common prefix
and runs only the rest: chat turns, and new chats that start like an earlier one (a prefix-cache hit).
Prompt text enters as token batches; image rows enter as embedding batches (`llama_batch.embd`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from typing import Iterator, Sequence

import numpy as np

from ..errors import ArgumentError, BackendError, ContextOverflowError, IntegrityError
from ..pipeline import common_prefix

log = logging.getLogger("edgevlm")


def _llama():
    try:
        import llama_cpp
    except ImportError:
        raise BackendError("this bundle's decoder is GGUF: install llama-cpp-python (pip install 'edgevlm[gguf]')") from None
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load chatter
    return llama_cpp


class _VerifiedFile:
    """The verified bytes as a file llama.cpp can open by path. On Linux an anonymous memfd: the bytes
    llama.cpp reads are exactly the bytes that were hashed, whatever happens to the bundle directory."""

    def __init__(self, blob: bytes | None, fallback: str):
        self.fd = None
        self.path = fallback
        if blob is not None and hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            self.fd = os.memfd_create("edgevlm-gguf", os.MFD_CLOEXEC)
            with os.fdopen(os.dup(self.fd), "wb") as f:
                f.write(blob)
            self.path = f"/proc/self/fd/{self.fd}"

    def close(self) -> None:  # llama.cpp keeps its own mapping of the file
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class GgufDecoder:
    """A GGUF language model in a llama context: eval token runs and embedding runs after a cached prefix."""

    def __init__(self, name: str, blob: bytes | None, path: str, *, n_ctx: int, threads: int = 0,
                 kv_f32: bool = False, n_batch: int = 512):
        L = self._L = _llama()
        L.llama_backend_init()
        src = _VerifiedFile(blob, path)
        try:
            mp = L.llama_model_default_params()
            mp.n_gpu_layers = 0
            self.model = L.llama_model_load_from_file(src.path.encode(), mp)
        finally:
            src.close()
        if not self.model:
            raise BackendError(f"llama.cpp cannot load the GGUF file of {name!r}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, 1
        cp.n_threads = cp.n_threads_batch = threads or min(4, os.cpu_count() or 1)
        if kv_f32:  # an f32 model keeps an f32 cache, and no flash attention (its CPU kernel rounds Q to f16:
            cp.type_k = cp.type_v = L.GGML_TYPE_F32  # logits then differ by ~1e-3 instead of ~1e-6)
            cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.no_perf = True
        cp.swa_full = True  # sliding-window layers keep every position, so any cached prefix stays reusable
        self.kv_type = "f32" if kv_f32 else "f16"
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise BackendError(f"llama.cpp cannot create a context for {name!r} (n_ctx={n_ctx})")
        self.name, self.n_batch = name, n_batch
        self.mem = L.llama_get_memory(self.ctx)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_embd = int(L.llama_model_n_embd(self.model))
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.n_ctx = int(L.llama_n_ctx(self.ctx))
        self.keys: list = []  # what the KV cache holds, position by position

    def __del__(self):
        L = getattr(self, "_L", None)
        if L is not None and getattr(self, "ctx", None):
            L.llama_free(self.ctx)
            L.llama_model_free(self.model)
            self.ctx = None

    # ---- the cache ----------------------------------------------------------------------------------

    def common_prefix(self, keys: Sequence) -> int:
        return common_prefix(self.keys, keys)

    def trim(self, n: int) -> None:
        """Keep the first n cached positions."""
        if n < len(self.keys):
            if not self._L.llama_memory_seq_rm(self.mem, 0, n, -1):
                self._L.llama_memory_clear(self.mem, True)
                n = 0
            del self.keys[n:]

    # ---- the sequence state, for the prefix cache (RAM and disk) ---------------------------------------

    @property
    def state_variant(self) -> str:
        """What a saved state depends on besides the bundle: llama.cpp's build and this context's KV type."""
        return f"llama.cpp-seq-state {getattr(self._L, '__version__', '?')} ctx={self.n_ctx} kv={self.kv_type}"

    def state(self) -> np.ndarray:
        """The KV cache of sequence 0 (what `keys` describe) as bytes [n] uint8."""
        L = self._L
        n = L.llama_state_seq_get_size(self.ctx, 0)
        buf = (ctypes.c_uint8 * n)()
        got = L.llama_state_seq_get_data(self.ctx, buf, n, 0)
        return np.frombuffer(buf, np.uint8, got).copy()

    def restore(self, state: np.ndarray, keys: Sequence) -> bool:
        """Replace the cache with a saved state of `keys`; False (and an empty cache) if llama.cpp refuses it."""
        L = self._L
        L.llama_memory_clear(self.mem, True)
        self.keys = []
        data = np.ascontiguousarray(state, np.uint8)
        if L.llama_state_seq_set_data(self.ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), data.size, 0) == 0:
            L.llama_memory_clear(self.mem, True)
            return False
        self.keys = list(keys)
        return True

    # ---- evaluation ---------------------------------------------------------------------------------

    def eval_tokens(self, ids: np.ndarray, keys: Sequence) -> None:  # ids: [S] int
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        for a in range(0, len(ids), self.n_batch):
            part = ids[a:a + self.n_batch]
            self._decode(self._L.llama_batch_get_one(part.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), len(part)),
                         keys[a:a + len(part)])

    def eval_embeds(self, x: np.ndarray, keys: Sequence) -> None:  # x: [S, n_embd]
        if x.ndim != 2 or x.shape[1] != self.n_embd:
            raise BackendError(f"{self.name}: embeddings of shape {x.shape}, the model takes [S, {self.n_embd}]")
        x = np.ascontiguousarray(x, dtype=np.float32)
        for a in range(0, len(x), self.n_batch):
            part = x[a:a + self.n_batch]
            batch = self._L.llama_batch()  # NULL pos/seq/logits: llama.cpp continues sequence 0, outputs the last
            batch.n_tokens = len(part)
            batch.embd = part.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            self._decode(batch, keys[a:a + len(part)])

    def _decode(self, batch, keys: Sequence) -> None:
        if len(self.keys) + len(keys) > self.n_ctx:
            raise ContextOverflowError(f"{self.name}: {len(self.keys) + len(keys)} positions, the context holds {self.n_ctx}")
        rc = self._L.llama_decode(self.ctx, batch)
        if rc != 0:
            self.trim(0)  # a failed batch may leave part of it in the cache
            raise BackendError(f"llama_decode failed in {self.name!r} (code {rc})")
        self.keys.extend(keys)

    def logits(self) -> np.ndarray:  # -> [vocab] of the last evaluated position
        ptr = self._L.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()


# ---- the text path: a plain GGUF chat model (its own tokenizer), e.g. a downloaded Gemma --------------


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
        from ..generate import Response
        from ..profile import peak_rss_bytes
        from ..sampling import make_sampler
        from ..template import render

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
        sampler = make_sampler(temperature, top_k, top_p, 1.0, seed)
        generated: list[int] = []
        out = b""
        t_first = 0.0
        while True:
            tok = sampler(dec.logits(), generated)
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

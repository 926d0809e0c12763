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
from typing import Sequence

import numpy as np

from ..errors import BackendError, ContextOverflowError
from .base import ContextDecoder

log = logging.getLogger("edgevlm")
MAX_CONTEXT = 8192  # llama.cpp allocates the whole KV cache up front: cap what a long-context model asks


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


class GgufDecoder(ContextDecoder):
    """A GGUF language model in a llama context: eval token runs and embedding runs after a cached prefix.
    Text positions run as tokens through llama.cpp's own embedding table; image rows as embeddings. The prefix
    cache holds llama.cpp's sequence state (llama_state_seq_get_data), tagged with what it depends on."""

    backend = "gguf"
    takes_embeds = False

    def __init__(self, name: str, blob: bytes | None, path: str, *, n_ctx: int, threads: int = 0,
                 kv_f32: bool = False, n_batch: int = 512, prefusion: bool = False):
        super().__init__(n_ctx)
        self.takes_embeds = prefusion  # LLaVA-Mini's fused text is no token: it goes in as embeddings
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

    @classmethod
    def from_bundle(cls, m, bundle, graphs: dict, embed_ids, threads: int, n_ctx: int) -> "GgufDecoder":
        comp = m.components["decoder"]
        return cls("decoder", bundle.read(comp.file), str(bundle.path(comp.file)), n_ctx=min(n_ctx, MAX_CONTEXT),
                   threads=threads, kv_f32=comp.precision == "fp32", prefusion=m.fusion == "prefusion")

    def __del__(self):
        L = getattr(self, "_L", None)
        if L is not None and getattr(self, "ctx", None):
            L.llama_free(self.ctx)
            L.llama_model_free(self.model)
            self.ctx = None

    # ---- the cache ----------------------------------------------------------------------------------

    def trim(self, n: int) -> None:
        """Keep the first n cached positions."""
        if n < len(self.keys):
            if not self._L.llama_memory_seq_rm(self.mem, 0, n, -1):
                self._L.llama_memory_clear(self.mem, True)
                n = 0
            del self.keys[n:]

    # ---- the sequence state, for the prefix cache (RAM and disk) ---------------------------------------

    @property
    def entry_variant(self) -> str:
        """What a saved state depends on besides the bundle: llama.cpp's build and this context's KV type."""
        return f"llama.cpp-seq-state {getattr(self._L, '__version__', '?')} ctx={self.n_ctx} kv={self.kv_type}"

    def entry(self, state) -> dict[str, np.ndarray] | None:
        """The KV cache of sequence 0 as bytes [n] uint8, when it is this chat's."""
        if not state.keys or self.keys != state.keys:
            return None
        L = self._L
        n = L.llama_state_seq_get_size(self.ctx, 0)
        buf = (ctypes.c_uint8 * n)()
        got = L.llama_state_seq_get_data(self.ctx, buf, n, 0)
        return {"state": np.frombuffer(buf, np.uint8, got).copy()}

    def entry_fits(self, arrays: dict[str, np.ndarray], length: int) -> bool:
        state = arrays.get("state")
        return len(arrays) == 1 and state is not None and state.dtype == np.uint8 and state.ndim == 1

    def restore(self, arrays: dict[str, np.ndarray], keys: Sequence) -> bool:
        """Replace the cache with a saved state of `keys`; False (and an empty cache) if llama.cpp refuses it."""
        L = self._L
        L.llama_memory_clear(self.mem, True)
        self.keys = []
        data = np.ascontiguousarray(arrays["state"], np.uint8)
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

"""One measured session of one runtime, in a process of its own (benchmarks/peers_mtmd.py starts these).

    python benchmarks/peers_mtmd_run.py SPEC_JSON    ->  one JSON line on stdout

A session: load the model (timed), one untimed turn on a warm-up image (first-call costs of both runtimes),
then a **cold** turn (an image neither runtime has seen, a new conversation), a **warm** turn (the same image
file, a new question, a new conversation: whatever reuse the runtime has), and **decode**: `decode_tokens`
greedy tokens after the warm turn's prompt (end-of-turn tokens banned, so every run decodes as many). Then the
process's peak resident memory. Its own process: the peak is this runtime's alone, and neither runtime's thread
pool or allocator is left behind for the other.

SPEC: {"runtime": "edgevlm" | "llama.cpp", "threads": T, "warmup_image": path, "image": path,
       "prompt": str, "question": str, "decode_tokens": N, "logits_out": path or null,
       edgevlm: "bundle": dir;  llama.cpp: "text": gguf, "mmproj": gguf, "chat_template": str,
       "special_tokens": {...}, "image_token": str}

Stages (seconds) of a turn, the same names for both runtimes:
  preprocess  image file -> pixels (decode, resize, tiles, normalize); llama.cpp: bitmap from the file +
              mtmd_tokenize (which preprocesses the image and tokenizes the text)
  encode      the vision tower + projector, every tile
  prefill     the language model over the prompt (text and image rows); edgevlm: template + tokenizer + token
              embedding ("embed"), cache lookups and the prefill itself
  sample      the first token from the last logits
  first_decode  the decode step after the first token (not part of TTFT)
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys
import time

import numpy as np


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak() -> int:
    """This process's peak resident memory (VmHWM: its own address space's high-water mark; getrusage's
    ru_maxrss would carry the parent's size at fork)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def messages(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


# ---- edgevlm -------------------------------------------------------------------------------------------------


def edgevlm_session(spec: dict) -> dict:
    import edgevlm

    t = time.perf_counter()
    vlm = edgevlm.load(spec["bundle"], threads=spec["threads"])
    out = {"load_s": time.perf_counter() - t, "rss_after_load": rss()}
    eos = {int(e): -100.0 for e in vlm.manifest.generation.eos_token_ids}
    list(vlm.chat().stream(spec["prompt"], image=spec["warmup_image"], max_tokens=2))
    out["cold"] = edgevlm_turn(vlm, spec["image"], spec["prompt"], 2)
    if spec.get("logits_out"):
        np.save(spec["logits_out"], edgevlm_logits(vlm, spec["image"], spec["prompt"]))
    out["warm"] = edgevlm_turn(vlm, spec["image"], spec["question"], 2)
    n = spec["decode_tokens"]
    rs = list(vlm.chat().stream(spec["question"], image=spec["image"], max_tokens=n, logit_bias=eos))
    out["decode"] = {"tps": rs[-1].decode_tps, "tokens": len(rs), "context": rs[0].prompt_tokens + len(rs),
                     "first_tokens": [r.token for r in rs[:8]]}
    out["prompt_ids"] = prompt_ids(vlm, spec["image"], spec["prompt"])
    out["peak_rss"] = peak()
    return out


def edgevlm_turn(vlm, image: str, text: str, n: int) -> dict:
    rs = list(vlm.chat().stream(text, image=image, max_tokens=n))
    r = rs[0]
    s = r.stages
    stages = {"preprocess": s.get("preprocess", 0.0), "encode": s.get("encode", 0.0),
              "prefill": s.get("cache", 0.0) + s.get("embed", 0.0) + s.get("prefill", 0.0)}
    stages["sample"] = max(0.0, r.ttft_s - sum(stages.values()))  # what no stage timed: sampling, bookkeeping
    stages["first_decode"] = s.get("first_decode", 0.0)
    return {"ttft_s": r.ttft_s, "stages": stages, "stages_raw": dict(s), "prompt_tokens": r.prompt_tokens,
            "prefilled_tokens": r.prefilled_tokens, "image_cache_hits": r.image_cache_hits,
            "prefix_cache_hit_tokens": r.prefix_cache_hit_tokens, "first_token": r.token}


def edgevlm_logits(vlm, image: str, text: str) -> np.ndarray:
    """The first token's logits [V] of a new conversation, through the stages Chat.stream runs (model.py)."""
    key, state, _, _ = vlm.image_state(image)
    ids = vlm.prompt_ids(messages(text), [state])
    keys = vlm.cache_keys(ids, [key], [state])
    logits = vlm.decoder.prefill(vlm.decoder.new_state(), vlm.prompt(ids, keys, {key: state}), 0)
    return np.asarray(logits, np.float32)


def prompt_ids(vlm, image: str, text: str) -> list[int]:
    """The prompt's token ids, image rows as -1."""
    key, state, _, _ = vlm.image_state(image)
    ids = vlm.prompt_ids(messages(text), [state])
    return [-1 if i == vlm.manifest.image_token_id else int(i) for i in ids]


# ---- llama.cpp (libmtmd) -------------------------------------------------------------------------------------


class Mtmd:
    """llama.cpp's multimodal library as llama-server drives it: a text model + mmproj, one sequence, the KV cache
    of the previous prompt reused for the longest common prefix (text tokens, and whole images by content id)."""

    def __init__(self, spec: dict):
        import llama_cpp as L
        import llama_cpp.mtmd_cpp as M

        self.L, self.M, self.spec = L, M, spec
        L.llama_backend_init()
        L.llama_log_set(_QUIET, ctypes.c_void_p(0))
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(spec["text"].encode(), mp)
        cp = L.llama_context_default_params()  # llama.cpp's defaults: n_batch 2048, n_ubatch 512, KV f16, FA auto
        cp.n_ctx = 4096
        cp.n_threads = cp.n_threads_batch = spec["threads"]
        self.ctx = L.llama_init_from_model(self.model, cp)
        mcp = M.mtmd_context_params_default()
        mcp.use_gpu, mcp.print_timings, mcp.n_threads = False, False, spec["threads"]
        self.mctx = M.mtmd_init_from_file(spec["mmproj"].encode(), self.model, mcp)
        if not (self.model and self.ctx and self.mctx):
            raise RuntimeError("llama.cpp could not load the model, context or mmproj")
        self.mem = L.llama_get_memory(self.ctx)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.sampler = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        L.llama_sampler_chain_add(self.sampler, L.llama_sampler_init_greedy())
        self.cached: list = []  # what the KV cache holds, per position: token id or (image id, row)
        self.batch = spec.get("n_batch", 2048)

    def render(self, text: str) -> tuple[str, bool]:
        """The chat template as edgevlm renders it, the image marker replaced by libmtmd's."""
        from edgevlm import template

        s = self.spec
        out = template.render(s["chat_template"], messages(text), add_generation_prompt=True, **s["special_tokens"])
        out = out.replace(s["image_token"], self.M.mtmd_default_marker().decode(), 1)
        bos = s["special_tokens"].get("bos_token")
        return out, not (bos and out.startswith(bos))  # add BOS as the HF tokenizer (and edgevlm) would

    def tokenize(self, image: str, text: str):
        M = self.M
        bitmap = M.mtmd_helper_bitmap_init_from_file(self.mctx, image.encode(), False)
        with open(image, "rb") as f:  # llama-server ids an image by a hash of its bytes (reuse across prompts)
            M.mtmd_bitmap_set_id(bitmap, hashlib.sha256(f.read()).hexdigest()[:32].encode())
        prompt, add_special = self.render(text)
        raw = prompt.encode()
        inp = M.mtmd_input_text(raw, len(raw), add_special, True)
        chunks = M.mtmd_input_chunks_init()
        bitmaps = (M.mtmd_bitmap_p_ctypes * 1)(bitmap)
        rc = M.mtmd_tokenize(self.mctx, chunks, ctypes.byref(inp), bitmaps, 1)
        M.mtmd_bitmap_free(bitmap)
        if rc != 0:
            raise RuntimeError(f"mtmd_tokenize failed ({rc})")
        return chunks

    def chunk_keys(self, chunk) -> list:
        M = self.M
        if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t()
            p = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            return [int(p[i]) for i in range(n.value)]
        cid = M.mtmd_input_chunk_get_id(chunk)
        return [(cid, i) for i in range(M.mtmd_input_chunk_get_n_tokens(chunk))]

    def turn(self, image: str, text: str, keep_logits: bool = False) -> dict:
        """One prompt up to its first token; the KV cache keeps the common prefix with the previous prompt."""
        L, M = self.L, self.M
        t0 = time.perf_counter()
        chunks = self.tokenize(image, text)
        stages = {"preprocess": time.perf_counter() - t0, "encode": 0.0, "prefill": 0.0}
        parts = [M.mtmd_input_chunks_get(chunks, i) for i in range(M.mtmd_input_chunks_size(chunks))]
        keys = [self.chunk_keys(c) for c in parts]
        flat = [k for ks in keys for k in ks]
        common = 0
        while common < min(len(flat), len(self.cached)) and flat[common] == self.cached[common]:
            common += 1
        common = min(common, len(flat) - 1)  # the last position always runs: its logits are needed
        start = 0
        for ks in keys:  # an image is reused whole or not at all
            if isinstance(ks[0], tuple) and start < common < start + len(ks):
                common = start
            start += len(ks)
        L.llama_memory_seq_rm(self.mem, 0, common, -1)
        self.cached = flat[:common]
        start = 0
        for chunk, ks in zip(parts, keys):
            end, begin = start + len(ks), max(start, common)
            if end > common:
                self._eval(chunk, ks[begin - start:], begin, isinstance(ks[0], tuple), stages)
                self.cached = flat[:end]
            start = end
        M.mtmd_input_chunks_free(chunks)
        t = time.perf_counter()
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,)).copy() \
            if keep_logits else None
        self.tok = int(L.llama_sampler_sample(self.sampler, self.ctx, -1))
        now = time.perf_counter()
        stages["sample"] = now - t
        out = {"ttft_s": now - t0, "stages": stages, "prompt_tokens": len(flat), "prefilled_tokens": len(flat) - common,
               "first_token": self.tok, "prompt_ids": [k if isinstance(k, int) else -1 for k in flat]}
        if logits is not None:
            out["logits"] = logits
        return out

    def _eval(self, chunk, keys: list, pos: int, image: bool, stages: dict) -> None:
        """A chunk's positions from `pos` on: an image is encoded (mtmd_encode_chunk) and its embeddings decoded
        (mtmd_helper_decode_image_chunk, as mtmd_helper_eval_chunks does); text is decoded in n_batch pieces."""
        L, M = self.L, self.M
        t = time.perf_counter()
        if image:
            if M.mtmd_encode_chunk(self.mctx, chunk) != 0:
                raise RuntimeError("mtmd_encode_chunk failed")
            t2 = time.perf_counter()
            stages["encode"] += t2 - t
            new_pos = L.llama_pos(0)
            if M.mtmd_helper_decode_image_chunk(self.mctx, self.ctx, chunk, M.mtmd_get_output_embd(self.mctx), pos,
                                                0, self.batch, ctypes.byref(new_pos), M.mtmd_helper_post_decode_callback(),
                                                None) != 0:
                raise RuntimeError("mtmd_helper_decode_image_chunk failed")
            stages["prefill"] += time.perf_counter() - t2
            return
        for a in range(0, len(keys), self.batch):
            part = keys[a:a + self.batch]
            toks = (L.llama_token * len(part))(*part)
            if L.llama_decode(self.ctx, L.llama_batch_get_one(toks, len(part))) != 0:
                raise RuntimeError("llama_decode failed")
        stages["prefill"] += time.perf_counter() - t

    def step(self, tok: int) -> int:
        L = self.L
        one = (L.llama_token * 1)(tok)
        if L.llama_decode(self.ctx, L.llama_batch_get_one(one, 1)) != 0:
            raise RuntimeError("llama_decode failed")
        self.cached.append(tok)
        return int(L.llama_sampler_sample(self.sampler, self.ctx, -1))

    def decode(self, first: int, n: int) -> dict:
        """n - 1 greedy steps after the first token (tokens/s as edgevlm counts: (n - 1) / time after the first)."""
        toks, t = [first], time.perf_counter()
        for _ in range(n - 1):
            toks.append(self.step(toks[-1]))
        return {"tps": (n - 1) / (time.perf_counter() - t), "tokens": n, "first_tokens": toks[:8]}


_QUIET = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(lambda level, text, data: None)


def llama_session(spec: dict) -> dict:
    t = time.perf_counter()
    mt = Mtmd(spec)
    out = {"load_s": time.perf_counter() - t, "rss_after_load": rss()}
    mt.turn(spec["warmup_image"], spec["prompt"])
    mt.step(mt.tok)
    cold = mt.turn(spec["image"], spec["prompt"], keep_logits=bool(spec.get("logits_out")))
    t = time.perf_counter()
    mt.step(cold["first_token"])
    cold["stages"]["first_decode"] = time.perf_counter() - t
    if spec.get("logits_out"):
        np.save(spec["logits_out"], cold.pop("logits"))
    out["prompt_ids"] = cold.pop("prompt_ids")
    out["cold"] = cold
    warm = mt.turn(spec["image"], spec["question"])
    warm.pop("prompt_ids")
    out["warm"] = warm
    out["decode"] = mt.decode(warm["first_token"], spec["decode_tokens"])
    out["decode"]["context"] = warm["prompt_tokens"] + spec["decode_tokens"]
    out["peak_rss"] = peak()
    return out


def main() -> None:
    spec = json.loads(sys.argv[1])
    session = {"edgevlm": edgevlm_session, "llama.cpp": llama_session}[spec["runtime"]]
    print(json.dumps(session(spec)))


if __name__ == "__main__":
    main()

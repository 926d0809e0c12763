"""edgevlm against its peers, side by side in one run, on a FastVLM-0.5B-shaped model with RANDOM weights.

    python benchmarks/peers.py [--reps 3] [--decode-tokens 16] [--out benchmarks/results/peers]

Builds (once; cached in a gitignored work directory, see benchmarks/peers_build.py) a random-weight
checkpoint of FastVLM-0.5B's shape — timm `fastvit_mci3` tower + Qwen2-0.5B dimensions — and its bundles:
ONNX fp32 (`edgevlm export`), int8 / int4 language model (onnxruntime's quantizers with `edgevlm quant`'s
settings) with the vision tower int8-static (`edgevlm quant --vision int8-static`: edgevlm's own quantizer,
target cpu: the Gelus between quantized convolutions in uint8), one vision graph per resolution, and the
language model as GGUF
(`edgevlm export --format gguf`: Q4_K_M, Q8_0, F32). Then, in one process:

1. memory read bandwidth (numpy streaming reads of a 1 GiB buffer, 1 and 2 threads, each kept up for 0.3 s;
   the best), read before the TTFT phase, after the run, and between every two decode generations. A
   generation's bound = the higher of the readings right before and after it / the bytes a decode step reads
   (weights + KV cache); a decoder's fraction of the bound (the goal's figure) is the median over its
   generations -- the machine's bandwidth drifts like its speed, so this is a ratio taken in the same minute,
   like every other ratio here. Beside it, the fraction of the best reading of the whole run;
2. cold TTFT at 256/512/768/1024 px, 2 threads: transformers (PyTorch eager, fp32, sdpa attention,
   logits_to_keep=1) vs our fp32/int8/int4 bundles, same new images and prompt; then transformers and our
   fp32 at 1 thread each (on an oversubscribed machine a second spinning thread can cost more than it gives);
3. warm TTFT on the fp32 and int8 bundles: the same image with a new question (new chat), and a chat's
   second turn, as is and after `chat.prepare()` (what `edgevlm chat` runs while the user types);
4. decode tokens/s after the same ~300-token prompt (same token ids), each decoder at 1 and 2 threads, the two
   decoders of a pair taking turns (load, measure, unload) `--reps` times:
   ours fp32/int8/int4 (ONNX Runtime) vs llama.cpp (llama-cpp-python, greedy) on Q4_K_M / Q8_0 / F32 GGUF
   of the same weights, and transformers eager fp32 (its fraction: of the run's best reading only).

Writes JSON, a markdown table and a PNG. Random weights: only speed is meant.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import peers_build  # noqa: E402

THREADS = int(__import__("os").environ.get("PEERS_THREADS", "2"))
PROMPT = "What is in the image?"
QUESTIONS = ["How many objects are there?", "What colour is the largest shape?"]
WARM = ("fp32", "int8")  # bundles whose warm TTFT is measured
GOALS = {"cold_ttft_1024_vs_transformers": 0.25, "decode_vs_llama_cpp": 1.0, "decode_fraction_of_bound": 0.70,
         "warm_over_cold": 0.05}


def med(xs):
    return statistics.median(xs) if xs else float("nan")


# ---- the machine ---------------------------------------------------------------------------------------


def read_bandwidth(gib: float = 1.0, seconds: float = 0.3) -> dict:
    """Streaming read GB/s of a buffer far larger than the caches: max-reduce and 64-bit or-reduce, 1 and 2
    threads (numpy releases the GIL in both), each kept up for `seconds`; the best sustained figure is the bound.

    Sustained, not the best single pass: on this shared VM the second core's share comes and goes within a
    second (single 30 ms passes at 2 threads read 30 or 55 GB/s a moment apart, 1 thread a steady ~28), and a
    decode figure is an average over a second or so -- a bound for it has to be an average over a like window.
    The best single pass is kept too (`burst_GBps`)."""
    a = np.ones(int(gib * (1 << 30)) // 8, np.uint64)
    kernels = {"max": lambda c: c.view(np.float32).max(), "or": lambda c: np.bitwise_or.reduce(c)}
    out, burst = {}, 0.0
    for name, f in kernels.items():
        for parts in (1, THREADS):
            chunks = np.array_split(a, parts)
            passes, t0 = 0, time.perf_counter()
            while True:
                ts = [threading.Thread(target=f, args=(c,)) for c in chunks]
                t = time.perf_counter()
                for th in ts:
                    th.start()
                for th in ts:
                    th.join()
                now = time.perf_counter()
                passes += 1
                burst = max(burst, a.nbytes / (now - t) / 1e9)
                if now - t0 >= seconds:
                    break
            out[f"{name}_{parts}t"] = round(passes * a.nbytes / (now - t0) / 1e9, 2)
    out["best_GBps"] = max(out.values())
    out["burst_GBps"] = round(burst, 2)
    return out


def gemm_gflops(n: int = 1024, reps: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ a
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return round(best, 1)


# ---- bytes a decode step reads -------------------------------------------------------------------------


def onnx_weight_bytes(bundle: Path) -> int:
    """Bytes of the decoder graph's initializers (weights, scales, zero points), external data included."""
    import onnx

    from edgevlm.bundle import open_bundle

    comp = open_bundle(bundle).manifest.components["decoder"]
    model = onnx.load(str(bundle / comp.file), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in t.external_data}["length"])
        else:
            total += onnx.numpy_helper.to_array(t).nbytes
    return total


def gguf_weight_bytes(bundle: Path) -> int:
    """Bytes of the GGUF's tensors read per token: all but the token embedding, which is read as the output
    matrix too when there is no `output.weight` (tied, as Qwen2-0.5B)."""
    import gguf

    r = gguf.GGUFReader(str(bundle / "decoder.gguf"))
    names = {t.name: int(t.n_bytes) for t in r.tensors}
    return sum(v for k, v in names.items() if k != "token_embd.weight" or "output.weight" not in names)


def kv_bytes(context: int, bytes_per: int) -> int:  # the KV cache read per decode step
    s = peers_build.spec().text
    return 2 * s.layers * s.kv_heads * (s.hidden // s.heads) * context * bytes_per


# ---- transformers --------------------------------------------------------------------------------------


class Transformers:
    """The peer: transformers `fast_vlm` on the same checkpoint, PyTorch eager fp32."""

    def __init__(self, ckpts: dict[int, Path]):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        torch.set_num_threads(THREADS)
        self.torch = torch
        self.model = AutoModelForImageTextToText.from_pretrained(ckpts[min(ckpts)], dtype=torch.float32).eval()
        self.processors = {r: AutoProcessor.from_pretrained(d) for r, d in ckpts.items()}
        self.marks = {}
        mm = self.model.model
        mm.vision_tower.register_forward_pre_hook(lambda *a: self.marks.__setitem__("v0", time.perf_counter()))
        mm.multi_modal_projector.register_forward_hook(lambda *a: self.marks.__setitem__("v1", time.perf_counter()))

    def ttft(self, image, prompt: str, res: int) -> dict:
        from edgevlm.export.parity import hf_inputs

        t0 = time.perf_counter()
        inputs = hf_inputs(self.processors[res], image, prompt)
        t1 = time.perf_counter()
        with self.torch.no_grad():
            logits = self.model(**inputs, logits_to_keep=1).logits
            int(logits[0, -1].argmax())
        t2 = time.perf_counter()
        v = self.marks["v1"] - self.marks["v0"]
        return {"ttft_s": t2 - t0, "stages": {"preprocess": t1 - t0, "encode": v, "prefill": t2 - t1 - v},
                "prompt_tokens": int(inputs["input_ids"].shape[1])}

    def decode_tps(self, ids: list[int], n: int) -> float:
        torch = self.torch
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            t = time.perf_counter()
            for _ in range(n - 1):
                out = self.model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
        return (n - 1) / (time.perf_counter() - t)


# ---- ours ----------------------------------------------------------------------------------------------


def our_ttft(vlm, image, prompt: str) -> dict:
    r = next(iter(vlm.chat().stream(prompt, image=image, max_tokens=1)))
    return {"ttft_s": r.ttft_s, "stages": dict(r.stages), "prompt_tokens": r.prompt_tokens,
            "prefilled_tokens": r.prefilled_tokens}


WARM_KINDS = ("new_question", "second_turn", "second_turn_prepared")


def warm(vlm, image) -> dict:
    """Cold (new image, new chat), same image with a new question (new chat), second turn of the first chat;
    and the second turn of a chat that ran `chat.prepare()` after its first answer (what `edgevlm chat` does
    while the user types: the turn separator and user header run before the question arrives)."""
    def fields(r):
        return {"ttft_s": r.ttft_s, "stages": dict(r.stages), "prefilled_tokens": r.prefilled_tokens,
                "image_cache_hits": r.image_cache_hits, "prefix_cache_hit_tokens": r.prefix_cache_hit_tokens,
                "prefix_cache_source": r.prefix_cache_source, "peak_rss_bytes": r.peak_rss_bytes}

    chat = vlm.chat()
    rs = list(chat.stream(PROMPT, image=image, max_tokens=4))
    out = {"cold": fields(rs[0])}
    out["new_question"] = fields(next(iter(vlm.chat().stream(QUESTIONS[0], image=image, max_tokens=1))))
    out["second_turn"] = fields(next(iter(chat.stream(QUESTIONS[1], max_tokens=1))))
    chat = vlm.chat()
    list(chat.stream(PROMPT, image=image, max_tokens=4))
    vlm.caches.clear()  # the first chat's second turn is in the prefix cache: this one must run on its own KV
    out["prepared_positions"] = chat.prepare()
    out["second_turn_prepared"] = fields(next(iter(chat.stream(QUESTIONS[1], max_tokens=1))))
    return out


def our_decode(vlm, prompt: str, n: int) -> dict:
    rs = list(vlm.chat().stream(prompt, max_tokens=n))
    return {"tps": rs[-1].decode_tps, "tokens": rs[-1].generated_tokens, "context": rs[-1].prompt_tokens + n}


# ---- llama.cpp -----------------------------------------------------------------------------------------


class LlamaCpp:
    def __init__(self, bundle: Path, n_ctx: int = 1024, threads: int = THREADS):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(str(bundle / "decoder.gguf"), n_ctx=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)

    def decode(self, ids: list[int], n: int) -> dict:
        """Greedy generation after the prompt: wall-clock tokens/s through llama-cpp-python, and llama.cpp's
        own eval-only figure (llama_perf_context)."""
        lc, llm = self.llama_cpp, self.llm
        llm.reset()
        lc.llama_perf_context_reset(llm._ctx.ctx)
        gen = llm.generate(ids, temp=0.0, top_k=1, reset=True)
        next(gen)  # the prompt is evaluated and the first token sampled
        t = time.perf_counter()
        for _ in range(n - 1):
            next(gen)
        tps = (n - 1) / (time.perf_counter() - t)
        gen.close()
        perf = lc.llama_perf_context(llm._ctx.ctx)
        return {"tps": tps, "eval_only_tps": 1000 * perf.n_eval / max(perf.t_eval_ms, 1e-9), "tokens": n,
                "context": len(ids) + n}


# ---- the run -------------------------------------------------------------------------------------------


def ttft_phase(built: dict, hf: Transformers, reps: int, precisions) -> dict:
    """Per resolution: transformers and each bundle on the same new images (one bundle loaded at a time:
    this shared machine has no room for all of them next to transformers). Every bundle alternates with
    transformers image by image, and its ratio is to the transformers runs interleaved with it: the machine's
    speed drifts by 10-30% over minutes, which a ratio to runs made minutes earlier would carry."""
    import edgevlm
    from edgevlm.export.parity import probe_image

    out = {}
    for res in peers_build.RESOLUTIONS:
        images = [probe_image(640, 480, seed=1000 * res + rep) for rep in range(reps)]  # new: nothing cached
        runs = {"transformers": []}
        paired = {}
        hf.ttft(probe_image(640, 480, seed=999), PROMPT, res)  # first-call overheads, untimed
        warm_runs = {}
        for p in precisions:
            vlm = edgevlm.load(built["onnx"][p][res], threads=THREADS)
            runs[p], paired[p] = [], []
            for image in images:
                paired[p].append(hf.ttft(image, PROMPT, res))
                runs[p].append(our_ttft(vlm, image, PROMPT))
            runs["transformers"] += paired[p]
            if p in WARM:
                warm_runs[p] = [warm(vlm, probe_image(640, 480, seed=5000 * res + rep)) for rep in range(reps)]
            del vlm
            gc.collect()
        row = {}
        for k, rs in runs.items():
            stages = sorted({s for r in rs for s in r["stages"]})
            row[k] = {"ttft_s": med([r["ttft_s"] for r in rs]), "runs": [r["ttft_s"] for r in rs],
                      "stages_s": {s: med([r["stages"].get(s, 0.0) for r in rs]) for s in stages},
                      "prompt_tokens": rs[0]["prompt_tokens"]}
        for p in precisions:
            row[p]["transformers_paired_s"] = med([r["ttft_s"] for r in paired[p]])
            row[p]["vs_transformers"] = row[p]["ttft_s"] / row[p]["transformers_paired_s"]
        for p, wr in warm_runs.items():
            row[f"warm_{p}"] = {kind: {"ttft_s": med([w[kind]["ttft_s"] for w in wr]),
                                       "prefilled_tokens": wr[0][kind]["prefilled_tokens"],
                                       "image_cache_hits": wr[0][kind]["image_cache_hits"],
                                       "prefix_cache": [wr[0][kind]["prefix_cache_source"],
                                                        wr[0][kind]["prefix_cache_hit_tokens"]],
                                       "stages_s": {s: med([w[kind]["stages"].get(s, 0.0) for w in wr])
                                                    for s in wr[0][kind]["stages"]}}
                                for kind in ("cold",) + WARM_KINDS}
            row[f"warm_{p}"]["prepared_positions"] = wr[0]["prepared_positions"]
            for kind in WARM_KINDS:
                w = row[f"warm_{p}"]
                w[kind]["over_cold"] = w[kind]["ttft_s"] / w["cold"]["ttft_s"]
        out[str(res)] = row
        print(f"[peers] TTFT {res} px: " + ", ".join(f"{k} {1000 * v['ttft_s']:.0f} ms" for k, v in row.items()
                                                     if "ttft_s" in v), file=sys.stderr, flush=True)
        for p in warm_runs:
            w = row[f"warm_{p}"]
            print(f"[peers] warm {p} {res} px: cold {1000 * w['cold']['ttft_s']:.0f} ms, new question "
                  f"{w['new_question']['over_cold']:.3f}x, second turn {w['second_turn']['over_cold']:.3f}x, "
                  f"after prepare() {w['second_turn_prepared']['over_cold']:.3f}x",
                  file=sys.stderr, flush=True)
    return out


def threads_phase(built: dict, hf: Transformers, reps: int, resolutions=(256, 1024),
                  precisions=("fp32", "int8")) -> dict:
    """Cold TTFT at 1 thread (transformers and our bundles, same new images): on an oversubscribed machine a
    second intra-op thread can cost more than it gives (OpenMP and ORT threads spin at their barriers)."""
    import edgevlm
    from edgevlm.export.parity import probe_image

    out = {}
    hf.torch.set_num_threads(1)
    try:
        for res in resolutions:
            images = [probe_image(640, 480, seed=7000 * res + rep) for rep in range(reps)]
            h, o = {}, {}
            for p in (p for p in precisions if p in built["onnx"]):  # one bundle at a time, paired as above
                vlm = edgevlm.load(built["onnx"][p][res], threads=1)
                h[p], o[p] = [], []
                for image in images:
                    h[p].append(hf.ttft(image, PROMPT, res)["ttft_s"])
                    o[p].append(our_ttft(vlm, image, PROMPT)["ttft_s"])
                del vlm
                gc.collect()
            row = {"transformers": med([t for ts in h.values() for t in ts]), "load": os.getloadavg()[0]}
            for p, ts in o.items():
                row[p], row[f"ratio_{p}"] = med(ts), med(ts) / med(h[p])
            row["ratio"] = row.get("ratio_fp32")
            out[str(res)] = row
            print(f"[peers] 1-thread TTFT {res} px: transformers {1000 * row['transformers']:.0f} ms, "
                  + ", ".join(f"{p} {1000 * med(ts):.0f} ms" for p, ts in o.items()), file=sys.stderr, flush=True)
    finally:
        hf.torch.set_num_threads(THREADS)
    return out


def prompt_ids(bundle: Path, prompt: str) -> list[int]:
    """The token ids our runtime prefills for a text-only prompt (what every decoder gets)."""
    from tokenizers import Tokenizer

    from edgevlm import template
    from edgevlm.bundle import open_bundle

    m = open_bundle(bundle).manifest
    text = template.render(m.chat_template, [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
                           add_generation_prompt=True, **m.special_tokens)
    return Tokenizer.from_file(str(bundle / m.tokenizer.file)).encode(text).ids


def decode_phase(built: dict, reps: int, n: int, precisions, gguf_quants, thread_counts) -> dict:
    """In groups of like precision — llama.cpp Q4_K_M with our int4 (and int4 with 128-weight blocks), Q8_0
    with int8, F32 with fp32 — at each thread count, the decoders take turns: load, warm up, one measured
    generation, unload, `reps` times each (one decoder loaded at a time: memory, and no idle thread pool
    spinning beside the other). The machine's speed drifts over minutes; alternating puts both sides of a ratio
    in the same minutes. The read bandwidth is read between every two generations. A decoder's figure is its
    best thread count."""
    import edgevlm

    from edgevlm.export.dev.builders import CORPUS

    prompt = (CORPUS * 2)[:760]  # ~300 tokens with the template, like a 1024 px image (256 tokens) + a question
    res = peers_build.RESOLUTIONS[0]
    ids = prompt_ids(built["onnx"]["fp32"][res], prompt)
    out = {"new_tokens": n, "prompt_tokens": len(ids), "ids": ids, "decoders": {}}
    ctx = len(ids) + n // 2  # mean context over the measured tokens

    def bytes_per_token(kind: str, what: str) -> int:  # reads the graph/GGUF: once per decoder, 3-12 s each
        if kind == "edgevlm":
            return onnx_weight_bytes(built["onnx"][what][res]) + kv_bytes(ctx, 4)
        return gguf_weight_bytes(built["gguf"][what]) + kv_bytes(ctx, 4 if what == "F32" else 2)

    def once(kind: str, what: str, t: int) -> dict:
        if kind == "edgevlm":
            vlm = edgevlm.load(built["onnx"][what][res], threads=t)
            our_decode(vlm, prompt, 2)  # warm
            r = our_decode(vlm, prompt, n)
            del vlm
        else:
            lc = LlamaCpp(built["gguf"][what], threads=t)
            lc.decode(ids, 2)
            r = lc.decode(ids, n)
            del lc
        gc.collect()
        return r

    # the bandwidth is read between every two generations, each decoder unloaded (no thread pool left spinning):
    # a generation's bound is the higher of the readings right before and right after it
    out["bandwidth_paired"] = [read_bandwidth()["best_GBps"]]

    def paired(kind: str, what: str, t: int, nbytes: int) -> dict:
        r = once(kind, what, t)
        out["bandwidth_paired"].append(read_bandwidth()["best_GBps"])
        r["bandwidth_GBps"] = max(out["bandwidth_paired"][-2:])
        r["fraction"] = r["tps"] * nbytes / (r["bandwidth_GBps"] * 1e9)
        return r

    for ps, q in ((("int4", "int4-b128"), "Q4_K_M"), (("int8",), "Q8_0"), (("fp32",), "F32")):
        pair = [("llama.cpp", q)] if q in gguf_quants else []
        pair += [("edgevlm", p) for p in ps if p.split("-")[0] in precisions]
        by_threads = {f"{k} {w}": {} for k, w in pair}
        nbytes = {f"{k} {w}": bytes_per_token(k, w) for k, w in pair}
        for t in thread_counts:
            rs = {name: [] for name in by_threads}
            for _ in range(reps):
                for kind, what in pair:
                    rs[f"{kind} {what}"].append(paired(kind, what, t, nbytes[f"{kind} {what}"]))
            for name, runs in rs.items():
                by_threads[name][str(t)] = {"tps": med([r["tps"] for r in runs]), "runs": [r["tps"] for r in runs],
                                            "load": os.getloadavg()[0],
                                            "fraction_paired": med([r["fraction"] for r in runs]),
                                            "fractions_paired": [r["fraction"] for r in runs],
                                            "bandwidth_paired_GBps": [r["bandwidth_GBps"] for r in runs]}
                if "eval_only_tps" in runs[0]:
                    by_threads[name][str(t)]["eval_only_tps"] = med([r["eval_only_tps"] for r in runs])
                print(f"[peers] decode {name}, {t} thread(s): {by_threads[name][str(t)]['tps']:.2f} tok/s "
                      f"(runs {', '.join(f'{r:.1f}' for r in by_threads[name][str(t)]['runs'])}; "
                      f"of the bound read around each: {by_threads[name][str(t)]['fraction_paired']:.2f}; "
                      f"load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
        for name, bt in by_threads.items():
            best = max(bt, key=lambda k: bt[k]["tps"])
            out["decoders"][name] = {**bt[best], "threads": int(best), "by_threads": bt,
                                     "context": len(ids) + n, "bytes_per_token": nbytes[name]}
    return out


def decoder_graph(bundle: Path) -> str:
    """How the bundle's language model graph was written (export --decoder)."""
    import onnx

    from edgevlm.bundle import open_bundle

    comp = open_bundle(bundle).manifest.components["decoder"]
    ops = {n.op_type for n in onnx.load(str(bundle / comp.file), load_external_data=False).graph.node}
    return ("GroupQueryAttention + fused RMSNorm (export/gqa.py)" if "GroupQueryAttention" in ops
            else "torch.onnx export")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path(__file__).parent / ".cache" / "peers",
                   help="where the built checkpoint and bundles are cached (gitignored)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "peers")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--decode-threads", default=f"1,{THREADS}", help="thread counts tried for every decoder")
    p.add_argument("--precisions", default=",".join(peers_build.PRECISIONS))
    p.add_argument("--gguf", default=",".join(peers_build.GGUF_QUANTS))
    p.add_argument("--only-threads", action="store_true",
                   help="add the 1-thread TTFT check to an existing OUT.json and rewrite the report")
    args = p.parse_args()
    if args.only_threads:
        import peers_report

        result = json.loads(args.out.with_suffix(".json").read_text())
        result.pop("goals_measured", None)
        built = peers_build.build(args.work, args.gguf.split(","))
        result["ttft_1_thread"] = threads_phase(built, Transformers(built["ckpt"]), args.reps)
        peers_report.write(result, args.out)
        print(args.out.with_suffix(".md").read_text())
        return
    precisions, gguf_quants = args.precisions.split(","), args.gguf.split(",")
    t_start = time.perf_counter()
    built = peers_build.build(args.work, gguf_quants)
    t_built = time.perf_counter()
    result = {"model": "FastVLM-0.5B shape, RANDOM weights: timm fastvit_mci3 (FastViTHD) tower + Qwen2-0.5B "
                       "dimensions (896 x 24 layers, 14/2 heads, MLP 4864, vocab 151936, tied)",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, TTFT at {THREADS} threads unless said",
              "reps": args.reps, "goals": GOALS}
    result["model"] += (f"; ONNX decoder graph: {decoder_graph(built['onnx']['fp32'][peers_build.RESOLUTIONS[0]])}"
                        "; vision tower fp32 in the fp32 bundles, int8-static (QDQ, `edgevlm quant`'s level, target cpu: "
                        "the Gelus between quantized convolutions in uint8) in the int8 and int4 bundles")
    result["loadavg"] = {"start": os.getloadavg()[0]}
    result["bandwidth_before"] = read_bandwidth()
    result["gemm_fp32_gflops"] = gemm_gflops()
    hf = Transformers(built["ckpt"])
    result["ttft"] = ttft_phase(built, hf, args.reps, precisions)
    result["ttft_1_thread"] = threads_phase(built, hf, args.reps)
    result["loadavg"]["after_ttft"] = os.getloadavg()[0]
    del hf  # memory: decode loads one decoder at a time, transformers' last
    gc.collect()
    result["decode"] = decode_phase(built, args.reps, args.decode_tokens, precisions, gguf_quants,
                                    [int(t) for t in args.decode_threads.split(",")])
    hf = Transformers(built["ckpt"])
    d = result["decode"]
    d["decoders"]["transformers fp32"] = {
        "tps": med([hf.decode_tps(d["ids"], max(8, args.decode_tokens // 4)) for _ in range(args.reps)]),
        "context": d["prompt_tokens"] + args.decode_tokens,
        "bytes_per_token": d["decoders"].get("edgevlm fp32", {}).get("bytes_per_token", 0)}
    d.pop("ids")
    del hf
    gc.collect()
    result["loadavg"]["end"] = os.getloadavg()[0]
    result["bandwidth_after"] = read_bandwidth()
    bw = max([result["bandwidth_before"]["best_GBps"], result["bandwidth_after"]["best_GBps"]]
             + d["bandwidth_paired"])
    result["bandwidth_GBps"] = bw
    for d in result["decode"]["decoders"].values():
        # the best reading of the whole run (minutes apart from most generations), shown beside the goal's figure:
        # the median over a decoder's generations of each one's fraction of the bandwidth read right around it
        d["bound_tps"] = bw * 1e9 / d["bytes_per_token"]
        d["fraction_of_bound"] = d["tps"] / d["bound_tps"]
    result["seconds"] = {"build": round(t_built - t_start, 1), "measure": round(time.perf_counter() - t_built, 1)}
    import peers_report

    peers_report.write(result, args.out)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

"""A decode step with the KV cache extended in place (pipeline.KVBuffer) vs plain past/present arrays.

    python benchmarks/kv_inplace.py [--contexts 300,1000,2000] [--steps 16] [--reps 3]

The FastVLM-0.5B-shaped language model (Qwen2-0.5B dimensions, RANDOM weights; the peers benchmark's bundles in
benchmarks/.cache/peers, built by peers_build.py) at int4, int8 and fp32, and the embedded demo's small decoder
(trained; its context holds 512 positions, so only the contexts that fit), one bundle loaded at a time. For each
context length both forms hold the same prompt (the same embeddings), then run `--steps` decode steps through
`pipeline.forward`, the two forms taking turns `--reps` times; a step's time is the median over all of them.
Plain arrays: onnxruntime writes new present arrays [1, 2, past + 1, 64] per layer each step (GroupQueryAttention
copies the past into them); in place: past and present are the same preallocated buffer and a step writes its
one new position. The logits of the two forms are compared as well. Writes JSON, a markdown table and a PNG.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
BUNDLES = {"int4": "lm-int4-{v}", "int8": "lm-int8-{v}", "fp32": "onnx-fp32-256", "demo": None}  # None: embedded


def steps(vlm, kv, x: np.ndarray, n: int) -> tuple[float, np.ndarray]:
    """n decode steps on kv (which holds the prompt) -> (median seconds a step, the last logits)."""
    from edgevlm import pipeline

    ts = []
    for i in range(n):
        t = time.perf_counter()
        logits, kv = pipeline.forward(vlm.decoder.graph, vlm.decoder.spec, x[i:i + 1], kv)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), logits


def main() -> None:
    import edgevlm
    from edgevlm import pipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="300,1000,2000")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=HERE / ".cache" / "peers")
    p.add_argument("--out", type=Path, default=HERE / "results" / "kv_inplace")
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    import peers_build

    rows = []
    from edgevlm.model import DEFAULT_BUNDLE

    for prec, name in BUNDLES.items():
        path = DEFAULT_BUNDLE if name is None else args.work / name.format(v=peers_build.LM_VERSION)
        if not path.exists():
            raise SystemExit(f"{path} is missing: run benchmarks/peers.py (or peers_build.py) first")
        vlm = edgevlm.load(path, threads=args.threads)
        assert vlm.decoder.inplace, "these decoders are GroupQueryAttention graphs"
        spec, layers = vlm.decoder.spec, vlm.decoder.num_layers
        vocab = vlm.tokenizer.get_vocab_size()
        for ctx in (int(c) for c in args.contexts.split(",") if int(c) + args.steps < vlm.context_length):
            x = pipeline.embed(vlm.embedder, (np.arange(ctx + args.steps, dtype=np.int64) * 7919 + 11) % vocab)
            _, plain = pipeline.forward(vlm.decoder.graph, spec, x[:ctx], pipeline.empty_kv(spec, layers))
            times = {"plain": [], "inplace": []}
            diff = 0.0
            for rep in range(args.reps):
                buf = pipeline.KVBuffer(spec, layers, ctx + args.steps, vlm.context_length)
                buf.load(plain, ctx)  # the same prompt in both forms
                last = {}
                for form in (("plain", "inplace") if rep % 2 == 0 else ("inplace", "plain")):
                    t, last[form] = steps(vlm, plain if form == "plain" else buf, x[ctx:], args.steps)
                    times[form].append(t)
                diff = max(diff, float(np.abs(last["plain"] - last["inplace"]).max()))
            ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
            rows.append({"precision": prec, "context": ctx, "ms_per_step": ms, "ratio": ms["inplace"] / ms["plain"],
                         "max_abs_logit_diff": diff})
            print(rows[-1], flush=True)
        del vlm, plain
        gc.collect()
    result = {"model": "Qwen2-0.5B dimensions (24 layers, 2 KV heads x 64), random weights (the peers benchmark's "
                       "language models); demo: the embedded demo bundle's decoder",
              "threads": args.threads, "steps": args.steps, "reps": args.reps,
              "loadavg": round(os.getloadavg()[0], 2), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"{result['model']}; median ms of a decode step over {args.steps} steps x {args.reps} turns each, "
             f"{args.threads} threads, 1-minute load average {result['loadavg']}. Plain: new present arrays every "
             "step; in place: `pipeline.KVBuffer`, past and present bound to the same memory.", "",
             "| decoder | context | plain ms | in place ms | in place / plain | max abs logit diff |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r['context']} | {r['ms_per_step']['plain']:.2f} | "
              f"{r['ms_per_step']['inplace']:.2f} | {r['ratio']:.2f}x | {r['max_abs_logit_diff']:.1e} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print("\n".join(lines))


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precs = list(dict.fromkeys(r["precision"] for r in rows))
    fig, axes = plt.subplots(1, len(precs), figsize=(4 * len(precs), 3.6), squeeze=False)
    for ax, prec in zip(axes[0], precs):
        rs = [r for r in rows if r["precision"] == prec]
        x = np.arange(len(rs))
        ax.bar(x - 0.2, [r["ms_per_step"]["plain"] for r in rs], 0.4, label="plain arrays")
        ax.bar(x + 0.2, [r["ms_per_step"]["inplace"] for r in rs], 0.4, label="in place")
        ax.set_xticks(x, [str(r["context"]) for r in rs])
        ax.set_xlabel("context (positions)")
        ax.set_title(f"{prec} decoder")
    axes[0][0].set_ylabel("ms per decode step")
    axes[0][0].legend()
    fig.suptitle("Qwen2-0.5B-shaped decoder (random weights): KV in place vs plain arrays")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

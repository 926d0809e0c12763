"""Accuracy vs image-token budget on the demo bundle (16 image tokens), for each reduction method.

    python benchmarks/token_budget.py [--n 400] [--seed 9000017] [--budgets 16,12,8,6,4,2,1]

Every point is `edgevlm eval` (greedy, exact match) on the same n held-out questions with
`max_image_tokens=k`; methods from edgevlm/budget.py. TTFT: median cold first token over --ttft-n questions
(stratified only; the image cache is emptied before each). Writes benchmarks/results/token_budget.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import edgevlm
from edgevlm import budget
from edgevlm.data import shapes
from edgevlm.evaluate import evaluate

UNUSED_SEED = 9_000_017  # not training (< 1e6), validation, the test seed, nor another benchmark's seed


def ttft_ms(vlm, seed: int, n: int, k: int) -> float:
    times = []
    for ex in shapes.examples(seed, n, split="eval"):
        vlm.caches.clear()
        times.append(next(iter(vlm.stream(ex.image, ex.question, max_tokens=1, max_image_tokens=k))).ttft_s)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--seed", type=int, default=UNUSED_SEED)
    p.add_argument("--budgets", default="16,12,8,6,4,2,1")
    p.add_argument("--methods", default=",".join(budget.METHODS))
    p.add_argument("--ttft-n", type=int, default=60)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "token_budget")
    args = p.parse_args()
    ks = [int(k) for k in args.budgets.split(",")]
    vlm = edgevlm.load()
    full = vlm.manifest.image_tokens
    points = []
    for method in args.methods.split(","):
        vlm.budget_method = method
        for k in ks:
            if k >= full and method != budget.METHODS[0]:
                continue  # no reduction: the same point for every method
            t = time.perf_counter()
            r = evaluate(vlm, "shapes", args.seed, args.n, max_image_tokens=k)
            point = {"method": method, "tokens": min(k, full), "accuracy": r["accuracy"], "per_type": r["per_type"],
                     "seconds": round(time.perf_counter() - t, 1)}
            if method == budget.METHODS[0]:
                point["ttft_ms"] = round(ttft_ms(vlm, args.seed + 1, args.ttft_n, k), 3)
            points.append(point)
            print(json.dumps(point), flush=True)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"bundle": "edgevlm/assets/shapes-fastvlm", "image_tokens": full, "seed": args.seed, "n": args.n,
            "ttft_n": args.ttft_n, "ttft_seed": args.seed + 1, "greedy": True, "metric": "exact match"}
    out.with_suffix(".json").write_text(json.dumps({**meta, "points": points}, indent=1) + "\n")
    _table(out, points, meta)
    _plot(out, points, meta)


def _table(out: Path, points, meta) -> None:
    methods = list(dict.fromkeys(p["method"] for p in points))
    ks = sorted({p["tokens"] for p in points}, reverse=True)
    acc = {(p["method"], p["tokens"]): p["accuracy"] for p in points}
    ttft = {p["tokens"]: p.get("ttft_ms") for p in points if "ttft_ms" in p}
    full = meta["image_tokens"]
    lines = ["| image tokens | " + " | ".join(methods) + " | TTFT ms (stratified) |", "|---" * (len(methods) + 2) + "|"]
    for k in ks:
        cells = [f"{acc.get((m, k), acc.get((methods[0], k))):.3f}" if k == full or (m, k) in acc else "" for m in methods]
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {ttft.get(k, float('nan')):.2f} |")
    lines.append(f"\nDemo bundle ({full} image tokens, a 4 x 4 grid), n = {meta['n']} held-out questions, seed "
                 f"{meta['seed']}; greedy; exact match. TTFT: median cold first token of {meta['ttft_n']} questions "
                 "(seed + 1), x86_64, 2 shared cores, onnxruntime CPU.")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _plot(out: Path, points, meta) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    full = meta["image_tokens"]
    top = next(p["accuracy"] for p in points if p["tokens"] == full)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for method in dict.fromkeys(p["method"] for p in points):
        pts = sorted([(p["tokens"], p["accuracy"]) for p in points if p["method"] == method] + [(full, top)])
        pts = sorted(dict(pts).items())
        ax.plot([k for k, _ in pts], [a for _, a in pts], marker="o", label=method)
    ax.set_xlabel("image tokens kept (of 16)")
    ax.set_ylabel("accuracy (exact match)")
    ax.set_title(f"Demo bundle: accuracy vs image-token budget (n={meta['n']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()

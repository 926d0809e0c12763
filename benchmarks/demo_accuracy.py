"""Accuracy of the committed demo bundles on the held-out test split, overall and per question type.

    python benchmarks/demo_accuracy.py [--n 1000] [--seed 2000003]

Greedy, exact match after normalisation (`edgevlm eval`), both bundles on the same questions. Writes
benchmarks/results/demo_accuracy.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import edgevlm
from edgevlm.data import shapes
from edgevlm.evaluate import evaluate

ASSETS = Path(edgevlm.__file__).parent / "assets"
BUNDLES = {"standard": ASSETS / "shapes-fastvlm", "pre-fusion (LLaVA-Mini)": ASSETS / "shapes-fastvlm-mini"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=shapes.TEST_SEED)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo_accuracy")
    args = p.parse_args()
    results = {}
    for name, path in BUNDLES.items():
        if not (path / "manifest.json").is_file():
            continue
        t = time.perf_counter()
        r = evaluate(edgevlm.load(path), "shapes", args.seed, args.n)
        r["bundle"] = path.name
        r["bundle_bytes"] = sum(f.stat().st_size for f in path.iterdir())
        r["seconds"] = round(time.perf_counter() - t, 1)
        results[name] = r
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"seed": args.seed, "n": args.n, "results": results}, indent=1))
    types = list(shapes.QTYPES)
    lines = ["| bundle | overall | " + " | ".join(types) + " | bytes |", "|---" * (len(types) + 3) + "|"]
    for name, r in results.items():
        cells = " | ".join(f"{r['per_type'].get(t, 0):.3f}" for t in types)
        lines.append(f"| {name} | **{r['accuracy']:.3f}** | {cells} | {r['bundle_bytes'] / 1e6:.1f} MB |")
    lines.append(f"\nn = {args.n} questions of the held-out split, seed {args.seed}; greedy; exact match.")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3))
        width = 0.8 / max(1, len(results))
        for i, (name, r) in enumerate(results.items()):
            xs = [j + i * width for j in range(len(types) + 1)]
            ax.bar(xs, [r["accuracy"]] + [r["per_type"].get(t, 0) for t in types], width, label=name)
        ax.set_xticks([j + width / 2 for j in range(len(types) + 1)], ["overall"] + types, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("exact match")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

"""Preprocess resize speed: the runtime's torch-free resize vs torchvision's and Pillow's, side by side.

    python benchmarks/resize.py [--reps 5] [--out benchmarks/results/resize]

The runtime must reproduce the HF processor's pixels bit for bit without torch: for the "torchvision" kernel
it runs torchvision's fixed-point algorithm in numpy; for "pil" it calls Pillow. Each row resizes one random
RGB image to the tower's square input (bicubic, antialiased), median of --reps, all in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from edgevlm.image import resize

CASES = [((128, 128), 512), ((768, 1024), 1024), ((1080, 1920), 1024), ((3000, 4000), 1024)]


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    import torch
    import torchvision.transforms.v2.functional as F

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "resize")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for (h, w), o in CASES:
        img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
        x = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        pil = Image.fromarray(img)
        rows.append({
            "input": f"{w}x{h}", "output": f"{o}x{o}",
            "edgevlm_torchvision_kernel_ms": median_ms(lambda: resize(img, o, o, "bicubic", "torchvision"), args.reps),
            "torchvision_ms": median_ms(lambda: F.resize(x, [o, o], interpolation=F.InterpolationMode.BICUBIC,
                                                         antialias=True), args.reps),
            "edgevlm_pil_kernel_ms": median_ms(lambda: resize(img, o, o, "bicubic", "pil"), args.reps),
            "pillow_ms": median_ms(lambda: pil.resize((o, o), Image.Resampling.BICUBIC), args.reps),
        })
    result = {"rows": rows, "reps": args.reps, "torch_threads": 1,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared: read the ratios)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = ["| input → output | edgevlm (torchvision kernel) | torchvision | ratio | edgevlm (pil kernel) | Pillow |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['input']} → {r['output']} | {r['edgevlm_torchvision_kernel_ms']:.1f} ms | "
                     f"{r['torchvision_ms']:.1f} ms | {r['edgevlm_torchvision_kernel_ms'] / r['torchvision_ms']:.1f}x | "
                     f"{r['edgevlm_pil_kernel_ms']:.1f} ms | {r['pillow_ms']:.1f} ms |")
    lines.append(f"\nmedian of {args.reps}; bicubic, antialiased, uint8 RGB; {result['machine']}.")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    labels = [f"{r['input']}→{r['output']}" for r in rows]
    idx = np.arange(len(rows))
    for k, (key, name) in enumerate((("edgevlm_torchvision_kernel_ms", "edgevlm (torchvision kernel)"),
                                     ("torchvision_ms", "torchvision"), ("edgevlm_pil_kernel_ms", "edgevlm (pil)"),
                                     ("pillow_ms", "Pillow"))):
        ax.bar(idx + 0.2 * k - 0.3, [r[key] for r in rows], 0.2, label=name)
    ax.set_xticks(idx, labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("median ms (log)")
    ax.set_title("Preprocess resize")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

"""The FastVLM-0.5B-shaped vision tower (fastvit_mci3, random weights): fp32 vs int8-static for each target.

    python benchmarks/vision_int8.py [--resolutions 256,512,768,1024] [--reps 3]

Times one encode of three vision graphs at each resolution, interleaved, through edgevlm's own session
settings (benchmarks/.cache/peers/, built by peers_build.py; missing int8 graphs are built here):

    fp32       vision-R/         the exported tower
    int8 npu   vision-R-int8s/   `edgevlm quant`'s int8-static level for target npu: per-channel scales folded
                                 into the convolutions, QDQ with per-channel int8 weights and calibrated uint8
                                 activations, grouped convolutions that mix channels left fp32; plain QDQ
    int8 cpu   vision-R-int8c/   the same for target cpu (the default for a bundle that is not static): the
                                 Gelus between quantized convolutions in uint8 (QLinearSigmoid x QLinearMul)

The weights are random: speed only. Writes JSON, a markdown table and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
GRAPHS = {"fp32": "", "int8 npu": "-int8s", "int8 cpu": "-int8c"}


def main() -> None:
    from edgevlm.backends.onnx import OnnxGraph

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolutions", default="256,512,768,1024")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=HERE / ".cache" / "peers")
    p.add_argument("--out", type=Path, default=HERE / "results" / "vision_int8")
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    import peers_build

    rows = []
    for res in (int(r) for r in args.resolutions.split(",")):
        src = args.work / f"vision-{res}"
        if not (src / "vision.onnx").exists():
            raise SystemExit(f"{src} is missing: run benchmarks/peers.py (or peers_build.py) first")
        for target in ("npu", "cpu"):
            peers_build.vision_int8(src, target)
        metas = {k: json.loads((src.with_name(src.name + suf) / "meta.json").read_text()) for k, suf in GRAPHS.items()}
        graphs = {k: OnnxGraph(k, str(src.with_name(src.name + suf) / "vision.onnx"), threads=args.threads)
                  for k, suf in GRAPHS.items()}
        name = graphs["fp32"].input_names[0]
        feeds = {name: np.random.default_rng(0).random(tuple(metas["fp32"]["pixel_shape"]), dtype=np.float32)}
        for g in graphs.values():
            g.run(feeds)  # first runs allocate
        times = {k: [] for k in graphs}
        for _ in range(args.reps):
            for k, g in graphs.items():
                t = time.perf_counter()
                g.run(feeds)
                times[k].append(time.perf_counter() - t)
        ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
        q = metas["int8 cpu"]["quant"]
        rows.append({"resolution": res, "weight_nodes": q["nodes"].get("int8-static", 0),
                     "left_fp32": len(q["excluded"]),
                     "uint8_gelus": q["ops"].get("QLinearSigmoid", 0), "ms": ms,
                     "npu_vs_fp32": ms["int8 npu"] / ms["fp32"], "cpu_vs_fp32": ms["int8 cpu"] / ms["fp32"],
                     "cpu_vs_npu": ms["int8 cpu"] / ms["int8 npu"]})
        print(rows[-1], flush=True)
        del graphs
    result = {"tower": "timm fastvit_mci3 + projector, random weights (the peers benchmark's)",
              "threads": args.threads, "reps": args.reps, "loadavg": round(os.getloadavg()[0], 2), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"Vision tower: {result['tower']}; one encode, median of {args.reps} interleaved; {args.threads} threads; "
             f"1-minute load average {result['loadavg']}. int8 npu = plain QDQ (`edgevlm quant --target npu`), "
             "int8 cpu = the Gelus between quantized convolutions in uint8 (`--target cpu`).", "",
             "| px | weight nodes int8 / left fp32 | uint8 Gelus | fp32 ms | int8 npu ms | int8 cpu ms | "
             "npu / fp32 | cpu / fp32 | cpu / npu |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['resolution']} | {r['weight_nodes']} / {r['left_fp32']} | {r['uint8_gelus']} | "
              f"{r['ms']['fp32']:.0f} | {r['ms']['int8 npu']:.0f} | {r['ms']['int8 cpu']:.0f} | "
              f"{r['npu_vs_fp32']:.2f}x | {r['cpu_vs_fp32']:.2f}x | {r['cpu_vs_npu']:.2f}x |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print("\n".join(lines))


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(rows))
    for i, k in enumerate(GRAPHS):
        ax.bar(x + (i - 1) * 0.27, [r["ms"][k] for r in rows], 0.27, label=k)
    ax.set_xticks(x, [f"{r['resolution']} px" for r in rows])
    ax.set_ylabel("one encode, ms (2 threads)")
    ax.set_title("FastViTHD-shaped tower (random weights): fp32 vs int8-static per target")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

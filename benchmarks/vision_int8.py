"""The FastVLM-0.5B-shaped vision tower (fastvit_mci3, random weights) fp32 vs int8-static (QDQ), side by side.

    python benchmarks/vision_int8.py [--resolutions 256,512,768,1024] [--reps 3]

Times one encode of the two vision graphs `benchmarks/peers.py` builds at each resolution
(benchmarks/.cache/peers/vision-R/ and vision-R-int8s/: the latter is vision-R through `edgevlm quant`'s
int8-static level — quant.api.resolve + quant.graphs.quantize: per-channel scales folded into the
convolutions, QDQ with per-channel int8 weights and calibrated uint8 activations, grouped convolutions that mix
channels left fp32), interleaved, through edgevlm's own session settings. The weights are random: speed only.
Writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def main() -> None:
    from edgevlm.backends.onnx import OnnxGraph

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolutions", default="256,512,768,1024")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=HERE / ".cache" / "peers")
    p.add_argument("--out", type=Path, default=HERE / "results" / "vision_int8")
    args = p.parse_args()
    rows = []
    for res in (int(r) for r in args.resolutions.split(",")):
        src, q8 = args.work / f"vision-{res}" / "vision.onnx", args.work / f"vision-{res}-int8s" / "vision.onnx"
        if not q8.exists():
            raise SystemExit(f"{q8} is missing: run benchmarks/peers.py (or peers_build.py) first")
        meta = json.loads((q8.parent / "meta.json").read_text())
        g32 = OnnxGraph("fp32", str(src), threads=args.threads)
        g8 = OnnxGraph("int8", str(q8), threads=args.threads)
        name = g32.input_names[0]
        feeds = {name: np.random.default_rng(0).random(tuple(meta["pixel_shape"]), dtype=np.float32)}
        g32.run(feeds), g8.run(feeds)  # first runs allocate
        times = {"fp32": [], "int8-static": []}
        for _ in range(args.reps):
            for k, g in (("fp32", g32), ("int8-static", g8)):
                t = time.perf_counter()
                g.run(feeds)
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"resolution": res, "weight_nodes": meta["quant"]["nodes"].get("int8-static", 0),
                     "left_fp32": len(meta["quant"]["excluded"]),
                     "fp32_ms": 1000 * med["fp32"], "int8_static_ms": 1000 * med["int8-static"],
                     "ratio": med["int8-static"] / med["fp32"]})
        print(rows[-1], flush=True)
    result = {"tower": "timm fastvit_mci3 + projector, random weights (the peers benchmark's)",
              "threads": args.threads, "reps": args.reps, "loadavg": round(os.getloadavg()[0], 2), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"Vision tower: {result['tower']}; one encode, median of {args.reps} interleaved; {args.threads} threads; "
             f"1-minute load average {result['loadavg']}.", "",
             "| px | weight nodes int8-static / left fp32 | fp32 ms | int8-static (QDQ) ms | ratio |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['resolution']} | {r['weight_nodes']} / {r['left_fp32']} | {r['fp32_ms']:.0f} | {r['int8_static_ms']:.0f} | "
              f"{r['ratio']:.2f}x |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

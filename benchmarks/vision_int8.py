"""The FastVLM-0.5B-shaped vision tower (fastvit_mci3, random weights) fp32 vs int8-static (QDQ), side by side.

    python benchmarks/vision_int8.py [--resolutions 512,1024] [--reps 3]

Takes the fp32 vision graphs `benchmarks/peers.py` built (benchmarks/.cache/peers/vision-R/vision.onnx, 512 px
and up), quantizes every Conv and MatMul weight node int8-static with edgevlm's quantizer (`quant.graphs.quantize`,
the settings of `edgevlm quant`'s `int8-static` level: QDQ, per-channel int8 weights, uint8 activations),
calibrated on 3 random images — the weights are random, so only speed is meant — and times one encode of each
graph, interleaved, through edgevlm's own session settings. Writes JSON and a markdown table.
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
    import onnx

    from edgevlm.backends.onnx import OnnxGraph
    from edgevlm.quant.graphs import Options, quantize, weight_nodes

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolutions", default="512,1024")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=HERE / ".cache" / "peers")
    p.add_argument("--out", type=Path, default=HERE / "results" / "vision_int8")
    args = p.parse_args()
    rows = []
    for res in (int(r) for r in args.resolutions.split(",")):
        src = args.work / f"vision-{res}" / "vision.onnx"
        if not src.exists():
            raise SystemExit(f"{src} is missing: run benchmarks/peers.py first")
        model = onnx.load(str(src))
        name = model.graph.input[0].name
        rng = np.random.default_rng(0)
        calib = [{name: rng.random((1, 3, res, res), dtype=np.float32)} for _ in range(3)]
        nodes = [n for n in weight_nodes(model) if n.op in ("Conv", "MatMul")]
        t = time.perf_counter()
        q = quantize(model, {n.name: "int8-static" for n in nodes}, Options(), calibration=lambda: iter(calib))
        quant_s = time.perf_counter() - t
        g32 = OnnxGraph("fp32", str(src), threads=args.threads)
        g8 = OnnxGraph("int8", q.SerializeToString(), threads=args.threads)
        feeds = {name: rng.random((1, 3, res, res), dtype=np.float32)}
        g32.run(feeds), g8.run(feeds)  # first runs allocate
        times = {"fp32": [], "int8-static": []}
        for _ in range(args.reps):
            for k, g in (("fp32", g32), ("int8-static", g8)):
                t = time.perf_counter()
                g.run(feeds)
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"resolution": res, "weight_nodes": len(nodes), "quantize_s": round(quant_s, 1),
                     "fp32_ms": 1000 * med["fp32"], "int8_static_ms": 1000 * med["int8-static"],
                     "ratio": med["int8-static"] / med["fp32"]})
        print(rows[-1], flush=True)
    result = {"tower": "timm fastvit_mci3 + projector, random weights (the peers benchmark's)",
              "threads": args.threads, "reps": args.reps, "loadavg": round(os.getloadavg()[0], 2), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"Vision tower: {result['tower']}; one encode, median of {args.reps} interleaved; {args.threads} threads; "
             f"1-minute load average {result['loadavg']}.", "",
             "| px | weight nodes quantized | fp32 ms | int8-static (QDQ) ms | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {r['resolution']} | {r['weight_nodes']} | {r['fp32_ms']:.0f} | {r['int8_static_ms']:.0f} | "
              f"{r['ratio']:.2f}x |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Peak memory and time of `edgevlm quant` on the FastVLM-0.5B-shaped bundle (random weights).

    python benchmarks/quant_memory.py [--bundle benchmarks/.cache/peers/onnx-fp32-256] [--calib-n 8]

Runs the CLI in a child process per scheme (int8 with an fp32 tower, int4 with an int8-static tower) on the
fp32 bundle `benchmarks/peers.py` builds (2.9 GB: decoder 2.0 GB as external data, tower 0.5 GB, embeddings
0.5 GB) and reads the child's peak resident set size from the kernel (getrusage, RUSAGE_CHILDREN: each run
in a fresh interpreter so the peaks do not mix). Writes JSON, a markdown table and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
SCHEMES = {"int8, fp32 tower": ["--scheme", "int8", "--vision", "fp32"],
           "int4, int8-static tower": ["--scheme", "int4", "--vision", "int8-static"]}


def run(bundle: Path, args: list[str], calib_n: int) -> dict:
    """One `edgevlm quant` in a child; its peak RSS (a fresh child: ru_maxrss of the largest child so far,
    so each measurement runs in its own grandchild and reports back)."""
    with tempfile.TemporaryDirectory(prefix="edgevlm-qmem-") as tmp:
        cmd = [sys.executable, "-c", (
            "import resource, subprocess, sys, time, json; t = time.perf_counter(); "
            "rc = subprocess.call(sys.argv[1:]); "
            "print(json.dumps({'rc': rc, 's': time.perf_counter() - t, "
            "'kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"),
            str(Path(sys.executable).with_name("edgevlm")), "quant", "--bundle", str(bundle),
            "--to", str(Path(tmp) / "out"), "--calib-n", str(calib_n), "--dataset", "none", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        if r["rc"]:
            raise SystemExit(f"edgevlm quant failed ({r['rc']}): {' '.join(cmd)}")
        size = sum(p.stat().st_size for p in (Path(tmp) / "out").rglob("*") if p.is_file())
    return {"peak_rss_GB": r["kb"] * 1024 / 1e9, "seconds": r["s"], "output_GB": size / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=HERE / ".cache" / "peers" / "onnx-fp32-256")
    p.add_argument("--calib-n", type=int, default=8)
    p.add_argument("--out", type=Path, default=HERE / "results" / "quant_memory")
    args = p.parse_args()
    if not (args.bundle / "manifest.json").exists():
        raise SystemExit(f"{args.bundle} is missing: run benchmarks/peers.py (or peers_build.py) first")
    source = sum(f.stat().st_size for f in args.bundle.rglob("*") if f.is_file()) / 1e9
    rows = []
    for label, extra in SCHEMES.items():
        rows.append({"scheme": label, **run(args.bundle, extra, args.calib_n)})
        print(rows[-1], flush=True)
    result = {"bundle": "FastVLM-0.5B shape, random weights, fp32 (the peers benchmark's 256 px bundle)",
              "source_GB": source, "calib_n": args.calib_n, "loadavg": round(os.getloadavg()[0], 2), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"`edgevlm quant` on the {result['bundle']} ({source:.2f} GB), --calib-n {args.calib_n}, no eval set; "
             "peak resident memory of the process (getrusage).", "",
             "| scheme | peak RSS GB | x source | seconds | output GB |", "|---|---|---|---|---|"]
    lines += [f"| {r['scheme']} | {r['peak_rss_GB']:.1f} | {r['peak_rss_GB'] / source:.1f}x | {r['seconds']:.0f} | "
              f"{r['output_GB']:.2f} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([r["scheme"] for r in rows], [r["peak_rss_GB"] for r in rows], color="#4a7")
    ax.axvline(source, color="k", ls="--", lw=1, label=f"source bundle {source:.1f} GB")
    ax.set_xlabel("peak resident memory, GB")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Resident memory of a loaded runtime: as shipped vs onnxruntime's default of keeping each graph's bytes.

    python benchmarks/load_memory.py [--reps 3]

onnxruntime's Python InferenceSession, given a model as bytes, keeps those bytes for as long as it lives (to
rebuild itself if an execution provider fails at run time) although the session holds the weights already;
edgevlm hands every graph without external data to onnxruntime as the verified bytes of its file and lets go
of them once the session exists (`backends/onnx.py`). Each bundle is loaded in a fresh child process, the two
ways taking turns `--reps` times: as shipped, and with the bytes put back on each session as onnxruntime
leaves them. Measured: resident memory after `edgevlm.load()` (warm-up included) and after one chat turn
(a new 1024 px image, 8 tokens), and the process's peak. Bundles: the embedded demo and, when
`benchmarks/peers.py` has built them, the FastVLM-0.5B-shaped int8 and int4 bundles (RANDOM weights).
Writes JSON, a markdown table and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
BUNDLES = {"demo (embedded)": None, "0.5B shape int8": "onnx-int8-1024-v10", "0.5B shape int4": "onnx-int4-1024-v10"}
MODES = ("as shipped", "bytes kept (onnxruntime's default)")

CHILD = r"""
import json, os, resource, sys
import numpy as np
from PIL import Image
import edgevlm
from edgevlm.backends import onnx as backend

if sys.argv[2] == "keep":  # what onnxruntime does by itself: the session holds on to the model bytes
    init = backend.OnnxGraph.__init__
    def keep(self, name, model, *a, **k):
        init(self, name, model, *a, **k)
        if isinstance(model, bytes):
            self.session._model_bytes = model
    backend.OnnxGraph.__init__ = keep

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

vlm = edgevlm.load(sys.argv[1], threads=2)
loaded = rss()
image = Image.fromarray(np.random.default_rng(7).integers(0, 255, (1024, 1024, 3), dtype=np.uint8))
list(vlm.chat().stream("What is in the image?", image=image, max_tokens=8))
print(json.dumps({"after_load": loaded, "after_chat": rss(),
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def measure(bundle: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(bundle), "keep" if mode != MODES[0] else "ship"],
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def main() -> None:
    from edgevlm.model import DEFAULT_BUNDLE

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--work", type=Path, default=HERE / ".cache" / "peers")
    p.add_argument("--out", type=Path, default=HERE / "results" / "load_memory")
    args = p.parse_args()
    rows = []
    for label, name in BUNDLES.items():
        path = DEFAULT_BUNDLE if name is None else args.work / name
        if not (path / "manifest.json").exists():
            print(f"[load_memory] {path} is missing (benchmarks/peers.py builds it): skipped", file=sys.stderr)
            continue
        files = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        runs = {m: [] for m in MODES}
        for rep in range(args.reps):
            for mode in (MODES if rep % 2 == 0 else MODES[::-1]):
                runs[mode].append(measure(path, mode))
        row = {"bundle": label, "files_bytes": files}
        for mode, rs in runs.items():
            row[mode] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        rows.append(row)
        print(f"[load_memory] {label}: " + "; ".join(f"{m} {row[m]['after_load'] / 1e6:.0f} MB after load"
                                                     for m in MODES), file=sys.stderr, flush=True)
    result = {"reps": args.reps, "loadavg": round(os.getloadavg()[0], 2), "rows": rows,
              "note": "median of the reps; resident set size (/proc/self/statm) and peak (getrusage)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = ["Resident memory of one process running edgevlm (MB; median of "
             f"{args.reps}, the two ways taking turns, each in a fresh process; 0.5B-shaped bundles have RANDOM "
             "weights). *bytes kept*: each ONNX session keeps its graph's bytes, as onnxruntime's Python API "
             "does unless told otherwise.", "",
             "| bundle | files | after load, as shipped | after load, bytes kept | after a chat turn, as shipped "
             "| after a chat turn, bytes kept | peak, as shipped | peak, bytes kept |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r[MODES[0]], r[MODES[1]]
        lines.append(f"| {r['bundle']} | {r['files_bytes'] / 1e6:.0f} | **{a['after_load'] / 1e6:.0f}** | "
                     f"{b['after_load'] / 1e6:.0f} | {a['after_chat'] / 1e6:.0f} | {b['after_chat'] / 1e6:.0f} | "
                     f"{a['peak'] / 1e6:.0f} | {b['peak'] / 1e6:.0f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.7 * len(rows)))
    y = range(len(rows))
    for i, (mode, color) in enumerate(zip(MODES, ("#4a7", "#bbb"))):
        ax.barh([v + 0.2 - 0.4 * i for v in y], [r[mode]["after_chat"] / 1e6 for r in rows], height=0.38,
                color=color, label=mode)
    ax.set_yticks(list(y), [r["bundle"] for r in rows])
    ax.set_xlabel("resident memory after load and one chat turn, MB")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

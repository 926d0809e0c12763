"""The demo model as a static-shape (NPU-ready) bundle: `export --static` from the demo checkpoint, then
`quant --scheme int8-static` (QDQ) on it, both next to the embedded dynamic bundle on the same questions.

    python benchmarks/static_demo.py [--checkpoint export/checkpoints/shapes-fastvlm] [--n 300] [--seed S]
        [--kv-capacity 128] [--prefill-chunk 32]

For each bundle: whether every graph input/output shape is fixed, bytes, accuracy (`edgevlm eval`: greedy,
exact match), greedy answers identical to the dynamic fp32 bundle's, first-token logits max |diff| against it,
and cold TTFT (median, bundles interleaved). Runs on the CPU execution provider (the only one here).
Writes benchmarks/results/static_demo.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import numpy as np

import edgevlm
from edgevlm.bundle import open_bundle
from edgevlm.data import shapes
from edgevlm.evaluate import evaluate
from edgevlm.model import DEFAULT_BUNDLE
from edgevlm.quant.bundle_io import bundle_bytes

ROOT = Path(__file__).resolve().parents[1]
UNSEEN_SEED = 5_000_011  # not a training, validation, calibration or test seed


def all_static(root: Path) -> bool:
    from edgevlm.export.graphs import graph_shapes

    m = open_bundle(root).manifest
    dims = [d for c in m.components.values() for shapes_ in graph_shapes(root / c.file) for s in shapes_.values()
            for d in s]
    return all(isinstance(d, int) and d > 0 for d in dims)


def main(argv=None) -> int:
    from edgevlm.export.exporter import StaticOptions, export
    from edgevlm.quant import quantize_bundle

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "export" / "checkpoints" / "shapes-fastvlm")
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="the dynamic bundle of the same checkpoint")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=UNSEEN_SEED)
    p.add_argument("--kv-capacity", type=int, default=128)
    p.add_argument("--prefill-chunk", type=int, default=32)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "static_demo")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="static-demo-") as tmp:
        paths = {"dynamic fp32 (embedded)": args.bundle, "static fp32": Path(tmp) / "static",
                 "static int8-static (QDQ)": Path(tmp) / "static-qdq"}
        export(args.checkpoint, paths["static fp32"], progress=False,
               static=StaticOptions(args.kv_capacity, args.prefill_chunk))
        quantize_bundle(paths["static fp32"], paths["static int8-static (QDQ)"], "int8-static")
        vlms = {k: edgevlm.load(v) for k, v in paths.items()}
        ref = vlms["dynamic fp32 (embedded)"]
        exs = list(shapes.examples(args.seed, args.n, split="eval"))
        tokens = {k: [[r.token for r in v.stream(e.image, e.question, max_tokens=24)] for e in exs]
                  for k, v in vlms.items()}
        ttft = {k: [] for k in vlms}
        for e in shapes.examples(args.seed + 1, 40, split="eval"):  # images no bundle has seen
            for k, v in vlms.items():
                ttft[k].append(next(iter(v.stream(e.image, e.question, max_tokens=1))).ttft_s)
        rows = []
        for k, v in vlms.items():
            diff = max(float(np.abs(ref.prompt_logits(e.image, e.question) - v.prompt_logits(e.image, e.question)).max())
                       for e in exs[:50])
            m = v.manifest
            rows.append({"label": k, "static_shapes": all_static(paths[k]), "bytes": bundle_bytes(paths[k]),
                         "accuracy": evaluate(v, "shapes", args.seed, args.n)["accuracy"],
                         "identical_answers": sum(a == b for a, b in zip(tokens[k], tokens["dynamic fp32 (embedded)"])),
                         "max_abs_logit_diff": diff, "ttft_ms": 1e3 * statistics.median(ttft[k]),
                         "providers": sorted({p for ps in v.providers.values() for p in ps}),
                         "static": {c: {"chunk": comp.static.chunk, "kv_capacity": comp.static.kv_capacity}
                                    for c, comp in m.components.items() if comp.static}})
    result = {"checkpoint": args.checkpoint.name, "bundle_manifest_sha256": open_bundle(args.bundle).sha256,
              "n": args.n, "seed": args.seed, "machine": platform.platform(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# The demo as a static-shape bundle\n\nCheckpoint `{args.checkpoint.name}`; dynamic bundle manifest "
             f"sha256 {result['bundle_manifest_sha256'][:12]}; static export with --kv-capacity {args.kv_capacity} "
             f"--prefill-chunk {args.prefill_chunk}; {args.n} questions of seed {args.seed} (greedy, 24 tokens); "
             f"logits on the first 50; cold TTFT median of 40, bundles interleaved; ONNX Runtime CPU EP, "
             f"{platform.machine()}, 2 cores shared with other work.\n",
             "| bundle | all shapes fixed | MB | accuracy | answers identical to dynamic fp32 | first-token logits max abs diff | cold TTFT (ms) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {'yes' if r['static_shapes'] else 'no'} | {r['bytes'] / 1e6:.2f} | "
                     f"{r['accuracy']:.3f} | {r['identical_answers']} / {args.n} | {r['max_abs_logit_diff']:.2g} | "
                     f"{r['ttft_ms']:.1f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

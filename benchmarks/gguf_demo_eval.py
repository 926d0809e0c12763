"""The demo model with its language model in llama.cpp: accuracy of GGUF f32 / Q8_0 / Q4_K_M bundles next to
the ONNX bundle, and greedy agreement of each with the ONNX answers, on the same held-out questions.

    python benchmarks/gguf_demo_eval.py [--checkpoint export/checkpoints/shapes-fastvlm] [--n 300] [--seed S]

The GGUF bundles are exported from the demo's checkpoint, reusing the vision graph of the ONNX bundle
(default: the embedded demo bundle; both must come from the same training run, which the f32 parity check
at export enforces). Accuracy is exactly `edgevlm eval --json` (greedy, exact match). Writes
benchmarks/results/gguf_demo.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import edgevlm
from edgevlm.data import shapes
from edgevlm.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
UNSEEN_SEED = 7_000_001  # not the training, validation or the project's test seed


def answers(vlm, seed: int, n: int) -> list[list[int]]:
    return [[r.token for r in vlm.stream(ex.image, ex.question, max_tokens=24)]
            for ex in shapes.examples(seed, n, split="eval")]


def main() -> int:
    from edgevlm.export.gguf import export_gguf

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "export" / "checkpoints" / "shapes-fastvlm")
    p.add_argument("--bundle", type=Path, default=Path(edgevlm.__file__).parent / "assets" / "shapes-fastvlm")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=UNSEEN_SEED)
    p.add_argument("--quants", default="F32,Q8_0,Q4_K_M")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gguf_demo")
    args = p.parse_args()
    if not (args.checkpoint / "config.json").is_file():
        print(f"no demo checkpoint at {args.checkpoint}: the GGUF export needs the HF checkpoint", file=sys.stderr)
        return 1
    results = {}
    with tempfile.TemporaryDirectory() as work:
        t = time.perf_counter()
        onnx = edgevlm.load(args.bundle)
        ref = answers(onnx, args.seed, args.n)
        results["onnx fp32"] = {**evaluate(onnx, "shapes", args.seed, args.n), "bundle": args.bundle.name, "agreement": 1.0,
                                "bytes": sum(f.stat().st_size for f in args.bundle.iterdir()),
                                "seconds": round(time.perf_counter() - t, 1)}
        for q in args.quants.split(","):
            out = Path(work) / q
            export_gguf(args.checkpoint, out, quant=q, base_bundle=args.bundle, progress=False)
            t = time.perf_counter()
            vlm = edgevlm.load(out)
            got = answers(vlm, args.seed, args.n)
            r = evaluate(vlm, "shapes", args.seed, args.n)
            m = json.loads((out / "manifest.json").read_text())
            r.update(agreement=sum(a == b for a, b in zip(ref, got)) / len(ref), bytes=(out / "decoder.gguf").stat().st_size,
                     seconds=round(time.perf_counter() - t, 1), parity=m["source"]["parity"]["gguf_vs_onnx"],
                     tensor_types=(m["components"]["decoder"]["quant"] or {}).get("tensor_types"))
            r["bundle"] = f"gguf-{q.lower()}"
            results[f"gguf {q}"] = r
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"seed": args.seed, "n": args.n, "results": results}, indent=1))
    types = list(shapes.QTYPES)
    lines = ["| bundle | accuracy | greedy answers identical to ONNX | " + " | ".join(types) + " | decoder bytes |",
             "|---" * (len(types) + 4) + "|"]
    for name, r in results.items():
        cells = " | ".join(f"{r['per_type'].get(t, 0):.3f}" for t in types)
        size = f"{r['bytes'] / 1e6:.2f} MB" + (" (whole bundle)" if name.startswith("onnx") else "")
        lines.append(f"| {name} | **{r['accuracy']:.3f}** | {r['agreement']:.3f} | {cells} | {size} |")
    lines.append(f"\nn = {args.n} held-out questions, seed {args.seed} (unseen); greedy; exact match; "
                 "vision in ONNX for every row, the language model in llama.cpp for the GGUF rows.")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

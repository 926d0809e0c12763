"""Cold TTFT and LLM prefill length: the standard demo bundle vs its LLaVA-Mini (pre-fusion) variant.

    python benchmarks/prefusion_ttft.py [--n 60] [--out benchmarks/results/prefusion_ttft]
    python benchmarks/prefusion_ttft.py --scaled [--image-size 256] [--llm 12x768|qwen2-0.5b] [--n 20]

--scaled builds a larger random-weight pair instead of using the trained demo bundles (an LLM of 12
layers x 768, or of Qwen2-0.5B's shape as in FastVLM-0.5B: 24 x 896, GQA 14/2, MLP 4864; behind a FastViT
tower at --image-size px, stride 32: 256 px = 64 image tokens, 512 px = 256, FastVLM's count at 1024 px;
LLaVA-Mini with 2 pre-fusion layers): the regime where the language model, not the tower, dominates TTFT,
and (at 512 px) where image tokens outnumber the prompt's text as in the LLaVA-Mini paper's setting.
Random weights: only speed is meant.

Both bundles answer the same held-out questions, interleaved in one run (the machine is shared and noisy:
read the ratio). "Cold" = an image neither bundle has seen: preprocess + encode (+ compress + pre-fusion
prefix) + prefill + first token. Writes JSON, a markdown table and a PNG of the per-stage medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import edgevlm
from edgevlm.data import shapes
from edgevlm.profile import STAGES

ASSETS = Path(edgevlm.__file__).parent / "assets"
BUNDLES = {"standard": ASSETS / "shapes-fastvlm", "pre-fusion": ASSETS / "shapes-fastvlm-mini"}
STAGES = [s for s in STAGES if s != "first_decode"]  # the first-token path (edgevlm.profile)


def measure(n: int, seed: int, bundles: dict) -> dict:
    vlms = {name: edgevlm.load(path) for name, path in bundles.items()}
    runs = {name: [] for name in vlms}
    for ex in shapes.examples(seed, n, split="eval"):
        for name, vlm in vlms.items():
            first = next(iter(vlm.stream(ex.image, ex.question, max_tokens=1)))
            runs[name].append({"ttft_s": first.ttft_s, "prompt_tokens": first.prompt_tokens, **first.stages})
    out = {}
    for name, rs in runs.items():
        out[name] = {
            "ttft_s_median": statistics.median(r["ttft_s"] for r in rs),
            "llm_prefill_tokens_median": statistics.median(r["prompt_tokens"] for r in rs),
            "stages_s_median": {s: statistics.median(r.get(s, 0.0) for r in rs) for s in STAGES},
        }
    out["ratio_ttft_prefusion_over_standard"] = out["pre-fusion"]["ttft_s_median"] / out["standard"]["ttft_s_median"]
    out["ratio_prefill_tokens"] = (out["pre-fusion"]["llm_prefill_tokens_median"]
                                   / out["standard"]["llm_prefill_tokens_median"])
    return out


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = ["| bundle | cold TTFT (median ms) | LLM prefill tokens | " + " | ".join(STAGES) + " |",
             "|---" * (3 + len(STAGES)) + "|"]
    for name in BUNDLES:
        r = result[name]
        stages = " | ".join(f"{1000 * r['stages_s_median'][s]:.2f}" for s in STAGES)
        lines.append(f"| {name} | {1000 * r['ttft_s_median']:.2f} | {r['llm_prefill_tokens_median']:.0f} | {stages} |")
    lines.append("")
    lines.append(f"TTFT ratio pre-fusion / standard: **{result['ratio_ttft_prefusion_over_standard']:.2f}**; "
                 f"LLM prefill length ratio: **{result['ratio_prefill_tokens']:.2f}** "
                 f"(n = {result['n']}, seed {result['seed']}, {result['machine']}).")
    if "note" in result:
        lines.append(f"\n{result['note']}.")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(BUNDLES)
    bottom = [0.0] * len(names)
    for s in STAGES:
        vals = [1000 * result[nm]["stages_s_median"][s] for nm in names]
        ax.barh(names, vals, left=bottom, label=s)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("median ms (cold: new image)")
    ax.set_title("TTFT by stage: standard vs LLaVA-Mini pre-fusion")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


LLMS = {"12x768": dict(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048),
        "qwen2-0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864)}


def build_scaled(work: Path, image_size: int = 256, llm: str = "12x768") -> dict:
    """Random-weight standard + LLaVA-Mini bundles of a larger shape, exported into work/."""
    from edgevlm.export.dev.builders import CheckpointSpec, TextDims, VisionDims, build_checkpoint, build_mini_checkpoint
    from edgevlm.export.exporter import export

    spec = CheckpointSpec("fast_vlm", TextDims(**LLMS[llm]),
                          VisionDims(image_size=image_size, embed_dims=(32, 64, 128, 256), layers=(2, 2, 4, 2)))
    out = {}
    for name, build in (("standard", build_checkpoint), ("pre-fusion", lambda s, d: build_mini_checkpoint(s, d, 2))):
        ckpt = build(spec, work / f"{name}-ckpt")
        export(ckpt, work / name, overwrite=True, parity_tokens=4, max_logit_diff=1e-2)  # random weights, big logits
        out[name] = work / name
    return out


def main() -> None:
    import os
    import platform

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--seed", type=int, default=shapes.TEST_SEED)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prefusion_ttft")
    p.add_argument("--standard", type=Path, default=BUNDLES["standard"])
    p.add_argument("--prefusion", type=Path, default=BUNDLES["pre-fusion"])
    p.add_argument("--scaled", action="store_true", help="a larger random-weight pair instead of the demo bundles")
    p.add_argument("--image-size", type=int, default=256, help="tower input size of the --scaled pair (stride 32)")
    p.add_argument("--llm", choices=sorted(LLMS), default="12x768", help="LLM shape of the --scaled pair")
    args = p.parse_args()
    if args.scaled:
        import tempfile

        if args.out == p.get_default("out"):
            suffix = "" if args.image_size == 256 else f"_{args.image_size}"
            suffix += "" if args.llm == "12x768" else "_" + args.llm.replace(".", "p")  # no "." before a suffix
            args.out = args.out.with_name(f"prefusion_ttft_scaled{suffix}")
        with tempfile.TemporaryDirectory() as work:
            result = measure(args.n, args.seed, build_scaled(Path(work), args.image_size, args.llm))
        d = LLMS[args.llm]
        result["note"] = (f"random weights; LLM {d['layers']} layers x {d['hidden']} (GQA {d['heads']}/{d['kv_heads']}, "
                          f"MLP {d['intermediate']}), FastViT tower at {args.image_size} px -> "
                          f"{(args.image_size // 32) ** 2} image tokens; LLaVA-Mini with 2 pre-fusion layers")
    else:
        result = measure(args.n, args.seed, {"standard": args.standard, "pre-fusion": args.prefusion})
    result.update(n=args.n, seed=args.seed, machine=f"{platform.machine()}, {os.cpu_count()} cores, onnxruntime CPU")
    write(result, args.out)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

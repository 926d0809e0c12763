"""The demo on shapes videos: accuracy per frame count and question type, and TTFT against the number of frames,
for the standard demo bundle (16 image tokens a frame), the LLaVA-Mini demo and the LLaVA-Mini demo fine-tuned on
videos (one token a frame; export/dev/train_video.py).

    python benchmarks/video_demo.py [--mini-video benchmarks/.cache/shapes-fastvlm-mini-video] [--n 40]
        [--out benchmarks/results/video_demo]
    python benchmarks/video_demo.py --scaled [--llm 12x768] [--image-size 256] [--counts 1,2,4,8]

--scaled: TTFT only, on a random-weight standard / LLaVA-Mini pair of a larger shape (benchmarks/prefusion_ttft.py
builds it: an LLM of 12 x 768 or Qwen2-0.5B's shape behind a FastViT tower; 256 px = 64 tokens a frame), where the
language model's prefill, not the tower, decides TTFT. Random weights: only speed is meant.

Accuracy: greedy answers to held-out videos of 2..8 frames (edgevlm/data/shapes_video.py, test seed), exact after
normalisation. TTFT: "cold" = frames no cache holds (each frame encoded: tower, and for LLaVA-Mini its compressor
and pre-fusion prefix), "warm" = the same frames asked again with another question (the image cache serves every
frame; the prompt is prefilled afresh). Medians over --repeats runs; the bundles take turns (a shared machine:
read the ratios). Writes JSON, a markdown table and a PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import edgevlm
from edgevlm.data.shapes import TEST_SEED, normalize_answer
from edgevlm.data.shapes_video import MAX_FRAMES, MIN_FRAMES, VIDEO_QTYPES, make_video_example

ASSETS = Path(edgevlm.__file__).parent / "assets"
ROOT = Path(__file__).resolve().parent


def accuracy(vlm, n: int) -> dict:
    per_frames, per_type = {}, {}
    for frames in range(MIN_FRAMES, MAX_FRAMES + 1):
        for i in range(n):
            ex = make_video_example(TEST_SEED, i, "eval", frames)
            got = vlm.generate(None, ex.question, video=edgevlm.Video(list(ex.frames), frame_rate=1.0), max_tokens=8)
            ok = float(normalize_answer(got) == normalize_answer(ex.answer))
            per_frames.setdefault(frames, []).append(ok)
            per_type.setdefault(ex.qtype, []).append(ok)
    every = [x for v in per_frames.values() for x in v]
    return {"exact": round(sum(every) / len(every), 4), "n": len(every),
            "per_frames": {f: round(sum(v) / len(v), 3) for f, v in per_frames.items()},
            "per_type": {q: round(sum(per_type[q]) / len(per_type[q]), 3) for q in VIDEO_QTYPES if q in per_type}}


KINDS = ("cold", "fresh", "follow")


def ttft(vlms: dict, counts: list[int], repeats: int) -> dict:
    """Per bundle and frame count: median TTFT (ms) cold (frames encoded now), fresh (frames from the image cache,
    the prompt prefilled from scratch) and follow (another question: the video's prompt prefix from the prefix
    cache too), the prompt's tokens, median cold stage seconds."""
    runs = {name: {} for name in vlms}
    for r in range(repeats):
        for f in counts:
            ex = make_video_example(TEST_SEED + 1, 1000 * r + f, "eval", max(MIN_FRAMES, min(f, MAX_FRAMES)))
            frames = [ex.frames[k % len(ex.frames)] for k in range(f)]
            frames = [fr.rotate(0.5 * k) if k >= len(ex.frames) else fr for k, fr in enumerate(frames)]  # all distinct
            video = edgevlm.Video(frames, frame_rate=1.0)
            for name, vlm in vlms.items():
                vlm.caches.clear()
                try:
                    cold = next(iter(vlm.stream(None, ex.question, video=video, max_tokens=1)))
                except edgevlm.ContextOverflowError:  # 16 tokens a frame: the standard bundle's 512 fill up
                    continue
                vlm.caches.prefixes.clear()
                fresh = next(iter(vlm.stream(None, ex.question, video=video, max_tokens=1)))
                other = "How many shapes are there at the end?"
                follow = next(iter(vlm.stream(None, other, video=video, max_tokens=1)))
                cell = runs[name].setdefault(f, {"cold": [], "fresh": [], "follow": [], "tokens": 0, "stages": []})
                for kind, resp in zip(KINDS, (cold, fresh, follow)):
                    cell[kind].append(resp.ttft_s)
                cell["tokens"] = cold.prompt_tokens
                cell["stages"].append(cold.stages)
    out = {}
    for name, per in runs.items():
        out[name] = {}
        for f, c in sorted(per.items()):
            stages = sorted({s for st in c["stages"] for s in st})
            out[name][f] = {**{f"{k}_ms": round(1000 * statistics.median(c[k]), 2) for k in KINDS},
                            "prompt_tokens": c["tokens"],
                            "cold_stages_ms": {s: round(1000 * statistics.median(st.get(s, 0.0) for st in c["stages"]),
                                                                        2) for s in stages}}
    return out


def per_frame(rows: dict, key: str) -> float:
    """The slope of TTFT against frames (ms per added frame, least squares over the counts measured)."""
    xs = [int(f) for f in rows]
    ys = [rows[f][key] for f in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs), 3)


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [] if not result["accuracy"] else ["Accuracy (greedy, exact) on held-out shapes videos:", "",
             "| bundle | all | " + " | ".join(f"{f} fr" for f in range(MIN_FRAMES, MAX_FRAMES + 1)) + " | "
             + " | ".join(VIDEO_QTYPES) + " |", "|---" * (2 + MAX_FRAMES - MIN_FRAMES + 1 + len(VIDEO_QTYPES)) + "|"]
    for name, a in result["accuracy"].items():
        lines.append(f"| {name} | {a['exact']:.3f} | "
                     + " | ".join(f"{a['per_frames'][f]:.2f}" for f in a["per_frames"])
                     + " | " + " | ".join(f"{a['per_type'].get(q, 0):.2f}" for q in VIDEO_QTYPES) + " |")
    lines += ["", "TTFT against frames (median ms). cold: every frame encoded now; fresh: frames from the image "
              "cache, the prompt prefilled from scratch; follow: another question about the same video (its prompt prefix "
              "from the prefix cache too):", "",
              "| bundle | frames | prompt tokens | cold | fresh | follow |", "|---|---|---|---|---|---|"]
    for name, rows in result["ttft"].items():
        for f, r in rows.items():
            lines.append(f"| {name} | {f} | {r['prompt_tokens']} | {r['cold_ms']:.1f} | {r['fresh_ms']:.1f} | "
                         f"{r['follow_ms']:.1f} |")
    lines += ["", "Least-squares slope, ms per added frame:", "", "| bundle | cold | fresh | follow | prompt tokens |",
              "|---|---|---|---|---|"]
    for name, rows in result["ttft"].items():
        lines.append(f"| {name} | " + " | ".join(f"{per_frame(rows, f'{k}_ms'):.2f}" for k in KINDS)
                     + f" | {per_frame(rows, 'prompt_tokens'):.1f} |")
    lines += ["", f"Machine: {result['machine']}"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(result, out.with_suffix(".png"))


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in result["ttft"].items():
        xs = [int(f) for f in rows]
        for key, style in (("cold_ms", "-o"), ("fresh_ms", "--s"), ("follow_ms", ":^")):
            ax.plot(xs, [rows[f][key] for f in rows], style, label=f"{name}, {key[:-3]}")
    ax.set_xlabel("frames")
    ax.set_ylabel("TTFT (ms, median)")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def scaled(args) -> int:
    import sys
    import tempfile

    from edgevlm.cpu import isa

    sys.path.insert(0, str(ROOT))
    from prefusion_ttft import LLMS, build_scaled

    if args.out == ROOT / "results" / "video_demo":
        args.out = ROOT / "results" / f"video_ttft_scaled_{args.llm.replace('.', 'p')}"
    with tempfile.TemporaryDirectory() as work:
        built = build_scaled(Path(work), args.image_size, args.llm)
        vlms = {name: edgevlm.load(path, threads=args.threads) for name, path in built.items()}
        result = {"ttft": ttft(vlms, [int(c) for c in args.counts.split(",")], args.repeats), "accuracy": {}}
    d = LLMS[args.llm]
    result["machine"] = (f"{args.threads} threads, ISA {isa()}; random weights: LLM {d['layers']} x {d['hidden']}, "
                         f"FastViT at {args.image_size} px = {(args.image_size // 32) ** 2} tokens a frame "
                         "(standard), 1 (LLaVA-Mini, 2 pre-fusion layers)")
    write(result, args.out)
    print(args.out.with_suffix(".md").read_text())
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mini-video", type=Path, default=ROOT / ".cache" / "shapes-fastvlm-mini-video")
    p.add_argument("--n", type=int, default=40, help="videos per frame count (accuracy)")
    p.add_argument("--counts", default="1,2,4,8,16,28,64", help="frame counts for TTFT")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "video_demo")
    p.add_argument("--scaled", action="store_true", help="TTFT of a larger random-weight pair (no accuracy)")
    p.add_argument("--llm", default="12x768", help="--scaled: the LLM's shape (prefusion_ttft.LLMS)")
    p.add_argument("--image-size", type=int, default=256, help="--scaled: the tower's input size")
    args = p.parse_args(argv)
    if args.scaled:
        return scaled(args)
    from edgevlm.cpu import isa

    bundles = {"standard": ASSETS / "shapes-fastvlm", "llava-mini": ASSETS / "shapes-fastvlm-mini",
               "llava-mini-video": args.mini_video}
    vlms = {name: edgevlm.load(path, threads=args.threads) for name, path in bundles.items() if path.is_dir()}
    result = {"machine": f"{args.threads} threads, ISA {isa()}", "n_per_frame_count": args.n,
              "accuracy": {name: accuracy(vlm, args.n) for name, vlm in vlms.items()}}
    print(json.dumps(result["accuracy"], indent=1), flush=True)
    timed = {k: v for k, v in vlms.items() if k in ("standard", "llava-mini-video")} or vlms
    result["ttft"] = ttft(timed, [int(c) for c in args.counts.split(",")], args.repeats)
    write(result, args.out)
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`edgevlm bench`: TTFT per stage, cold and warm, per input resolution; a table, JSON and a stacked plot.

Every figure is read from the runtime's own `Response.profile`; nothing is re-timed here.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from .common import one_line_errors, requires

QUESTIONS = ("What color is the star?", "How many objects are there?", "Is there a red circle?",
             "What shape is the blue object?", "Describe the image.")
RESOLUTION_NOTE = ("resolution = the input image's side in pixels. A tower with a fixed input ({h}x{w} here) "
                   "sees the image after the preprocess resizes it, so the resolution changes the decode and "
                   "resize cost (the preprocess stage) only; the tower's own resolution is the bundle's "
                   "(export one bundle per tower size and pass several --bundle with --resolutions native).")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgevlm bench", description=(
        "Time to first token per stage (preprocess, encode, compress, prefusion, embed, prefill, first decode "
        "step), cold (caches empty, an image never seen), warm (the same image with a new question: image "
        "cache + prefix KV cache) and a chat's second turn (after chat.prepare(), as `edgevlm chat` runs it "
        "between turns), at each input resolution. Prints a table; writes JSON and a stacked plot."))
    p.add_argument("--bundle", metavar="B", action="append", default=None,
                   help="bundle directory (repeatable; default: the embedded demo)")
    p.add_argument("--resolutions", default="256,512,768,1024", metavar="LIST",
                   help="comma-separated input image sides in pixels, or 'native' (each bundle's tower input)")
    p.add_argument("--repeats", type=int, default=5, metavar="N",
                   help="images per resolution (medians are reported; default 5)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="write a stacked per-stage bar chart (needs matplotlib)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the runtime's default)")
    p.add_argument("--providers", default=None, metavar="LIST", help="comma-separated ONNX Runtime providers")
    return p


def _median(xs):
    return statistics.median(xs) if xs else 0.0


def measure(vlm, resolution: int, repeats: int = 5, seed: int = 7) -> dict:
    """Cold and warm first-token profiles of `vlm` on `repeats` procedural images of side `resolution`."""
    from edgevlm.data import shapes
    from edgevlm.profile import STAGES

    cold, warm, turn2 = [], [], []
    for i in range(repeats):
        image = shapes.make_example(seed, i, "eval", size=resolution).image
        vlm.caches.clear()
        vlm.decoder.reset()  # GGUF/CoreML/static: the decoder's own context is a cache too
        q1, q2 = QUESTIONS[i % len(QUESTIONS)], QUESTIONS[(i + 1) % len(QUESTIONS)]
        cold.append(list(vlm.stream(image, q1, max_tokens=2))[-1].profile)
        warm.append(list(vlm.stream(image, q2, max_tokens=2))[-1].profile)
        chat = vlm.chat()  # a conversation's second turn: its own KV (the first turn is a prefix-cache hit)
        chat.send(q1, image=image, max_tokens=2)
        chat.prepare()  # the turn separator and user header, as `edgevlm chat` runs them while the user types
        turn2.append(list(chat.stream(q2, max_tokens=2))[-1].profile)

    def summary(runs):
        return {"ttft_s": _median([r["ttft_s"] for r in runs]),
                "stages_s": {s: _median([r[f"{s}_s"] for r in runs]) for s in STAGES},
                "prompt_tokens": _median([r["prompt_tokens"] for r in runs]),
                "prefilled_tokens": _median([r["prefilled_tokens"] for r in runs]),
                "runs": runs}

    c, w, t2 = summary(cold), summary(warm), summary(turn2)
    return {"resolution": resolution, "cold": c, "warm": w, "chat_turn2": t2,
            "warm_over_cold": w["ttft_s"] / max(c["ttft_s"], 1e-12),
            "chat_turn2_over_cold": t2["ttft_s"] / max(c["ttft_s"], 1e-12),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in cold + warm + turn2)}


def tower_input(vlm) -> tuple:
    shape = vlm.manifest.components["vision"].inputs.get("pixel_values") or []
    return tuple(shape[-2:]) if len(shape) == 4 else ()


def table(rows: list[dict]) -> str:
    from edgevlm.profile import STAGES

    head = ["bundle", "res", "tower", "cold TTFT ms", *STAGES, "warm TTFT ms", "warm/cold", "turn 2 TTFT ms",
            "prefilled c/w", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c, w = r["cold"], r["warm"]
        lines.append("| " + " | ".join([
            r["bundle"], str(r["resolution"]), "x".join(map(str, r["tower_input"])) or "?", f"{c['ttft_s'] * 1e3:.2f}",
            *(f"{c['stages_s'][s] * 1e3:.2f}" for s in STAGES), f"{w['ttft_s'] * 1e3:.2f}",
            f"{r['warm_over_cold']:.3f}", f"{r['chat_turn2']['ttft_s'] * 1e3:.2f}",
            f"{c['prefilled_tokens']:.0f}/{w['prefilled_tokens']:.0f}",
            f"{r['peak_rss_bytes'] / 2**20:.0f}"]) + " |")
    return "\n".join(lines)


def figure(rows: list[dict], title: str = "TTFT per stage (median)"):
    """The stacked bars, cold and warm per row: the stages up to the first token (their top is the TTFT, the black
    line), then the first decode step above the line; the legend beside the axes, never over a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgevlm.profile import STAGES

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)) + 2.2, 4.5), layout="constrained")
    colors = plt.get_cmap("tab10").colors  # by the stage's place in STAGES: the same colour in every plot
    shown = {s for s in STAGES for r in rows for kind in ("cold", "warm") if r[kind]["stages_s"].get(s)}
    for i, r in enumerate(rows):
        for j, (kind, x) in enumerate((("cold", i - 0.18), ("warm", i + 0.18))):
            bottom = 0.0
            for k, s in enumerate(STAGES):  # first_decode is last: it runs after the first token
                if s not in shown:
                    continue
                h = r[kind]["stages_s"].get(s, 0.0) * 1e3
                label = ("first_decode (after TTFT)" if s == "first_decode" else s) if (i, j) == (0, 0) else None
                ax.bar(x, h, 0.34, bottom=bottom, color=colors[k], hatch=None if kind == "cold" else "//",
                       alpha=0.45 if s == "first_decode" else 1.0, label=label, edgecolor="white", linewidth=0.3)
                bottom += h
            ax.plot([x - 0.17, x + 0.17], [r[kind]["ttft_s"] * 1e3] * 2, color="black", linewidth=1)
    ax.set_xticks(range(len(rows)), [f"{r['bundle']}\n{r['resolution']} px\ncold | warm" for r in rows], fontsize=8)
    ax.set_ylabel("ms (black line: TTFT)")
    ax.set_title(title)
    fig.legend(loc="outside right upper", fontsize=8, title="stage (warm: hatched)", title_fontsize=8)
    return fig


def plot(rows: list[dict], out: str, title: str = "TTFT per stage (median)") -> None:
    import matplotlib.pyplot as plt

    fig = figure(rows, title)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


@one_line_errors
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    import edgevlm
    from edgevlm.cpu import isa
    from edgevlm.errors import ArgumentError

    if args.repeats < 1:
        raise ArgumentError("--repeats must be at least 1")
    if args.plot:  # before the measuring, not after it
        requires("bench --plot", "plot")
    native = args.resolutions.strip() == "native"
    try:
        resolutions = [] if native else [int(x) for x in args.resolutions.split(",") if x.strip()]
    except ValueError:
        raise ArgumentError(f"--resolutions takes comma-separated integers or 'native', not {args.resolutions!r}") from None
    if not native and (not resolutions or min(resolutions) < 8 or max(resolutions) > 4096):
        raise ArgumentError("--resolutions: each side must lie between 8 and 4096 pixels")
    providers = args.providers.split(",") if args.providers else None
    rows, notes = [], []
    for path in args.bundle or [None]:
        vlm = edgevlm.load(path, providers=providers, threads=args.threads)
        name = Path(path).name if path else "demo"
        tower = tower_input(vlm)
        if tower and all(isinstance(d, int) for d in tower):
            notes.append(f"{name}: " + RESOLUTION_NOTE.format(h=tower[0], w=tower[1]))
        for res in ([max(tower)] if native and tower else resolutions):
            print(f"bench: {name} at {res} px ({args.repeats} images)...", file=sys.stderr, flush=True)
            r = measure(vlm, int(res), args.repeats)
            rows.append({"bundle": name, "tower_input": list(tower), **r})
    print(table(rows))
    for n in notes:
        print(f"\n{n}")
    result = {"command": "edgevlm bench", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "isa": isa(), "python": platform.python_version()},
              "notes": notes, "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(rows, args.plot)
    return 0

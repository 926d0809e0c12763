"""The search's Pareto set as JSON, a markdown table and a PNG plot (bytes vs accuracy, TTFT as labels)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .search import SearchResult, as_json

log = logging.getLogger("edgevlm.quant")


def table(rows: list[dict], metric: str = "accuracy") -> str:
    """Markdown: one row per point (label, MB, ratio to fp32 bytes, cold TTFT ms, metric, Pareto, chosen)."""
    base = max(r["bytes"] for r in rows)
    lines = [f"| point | MB | bytes vs fp32 | cold TTFT (ms) | {metric} | confirmation | Pareto | levels |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["bytes"]):
        levels = "; ".join(f"{c}: " + ", ".join(f"{n} {lv}" for lv, n in d.items()) for c, d in r["levels"].items() if d)
        mark = " **(chosen)**" if r.get("chosen") else ""
        lines.append(f"| {r['label']}{mark} | {r['bytes'] / 1e6:.2f} | {r['bytes'] / base:.3f} | "
                     f"{r['ttft_s'] * 1e3:.2f} | {r['accuracy']:.4f} | {_confirm(r)} | {'yes' if r['pareto'] else ''} | "
                     f"{levels or 'all fp32'} |")
    return "\n".join(lines) + "\n"


def _confirm(r: dict) -> str:
    if r.get("confirm") is None:
        return "—"
    return f"{r['confirm']:.4f} ({'accepted' if r.get('accepted') else 'rejected'})"


def plot(rows: list[dict], path: Path, title: str, metric: str = "accuracy", target: float | None = None) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot written (pip install 'edgevlm[quant]')")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        colour = "tab:red" if r.get("chosen") else ("tab:blue" if r["pareto"] else "tab:gray")
        ax.scatter(r["bytes"] / 1e6, r["accuracy"], color=colour, s=40, zorder=3)
        ax.annotate(f"{r['label']}\n{r['ttft_s'] * 1e3:.1f} ms", (r["bytes"] / 1e6, r["accuracy"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["bytes"])
    ax.plot([r["bytes"] / 1e6 for r in front], [r["accuracy"] for r in front], color="tab:blue", lw=1, zorder=2)
    if target is not None:
        ax.axhline(target, color="tab:red", lw=0.8, ls="--", label=f"budget target {target:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("bundle MB")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(result: SearchResult, out: Path) -> list[Path]:
    """out.json, out.md, out.png (out is a path prefix, e.g. results/pareto)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    data = as_json(result)
    for p in data["points"]:
        p["chosen"] = p["k"] == result.chosen.k
    paths = [out.with_suffix(".json"), out.with_suffix(".md")]
    paths[0].write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    s = result.summary
    head = (f"# Mixed-precision search\n\nbudget {s['budget']} x fp32 {s['metric']} {s['fp32']:.4f} = target "
            f"{s['target']:.4f} on {s['eval']['dataset']} (seed {s['eval']['seed']}, n={s['eval']['n']}); "
            f"{s['promotions']} promotions ordered by sensitivity per byte, {s['measured']} measured.")
    c = s.get("confirm") or {}
    if c.get("n"):
        head += (f" A point is accepted only if it also meets the budget on the next {c['n']} questions of the seed "
                 f"(confirmation: fp32 {c['fp32']:.4f}, target {c['target']:.4f}).")
    head += "\n\n"
    paths[1].write_text(head + table(data["points"], result.metric), encoding="utf-8")
    if plot(data["points"], out.with_suffix(".png"), "mixed-precision search: measured points",
            result.metric, result.target):
        paths.append(out.with_suffix(".png"))
    return paths

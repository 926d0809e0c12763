"""Cold vs warm TTFT on the demo bundle, in one run, with the image cache and the prefix KV cache.

    python benchmarks/cache_ttft.py [--n 40] [--out benchmarks/results/cache_ttft]

Scenarios (medians over n held-out images; the figures are the runtime's own Response.profile):
  cold               caches empty (RAM and disk), an image never seen, question A
  warm               the same image, a new question B, a new chat, same process (image cache + prefix KV, RAM)
  chat turn 2        a follow-up question in the same chat (the chat's own KV)
  fresh process      a new process loading the bundle with the same cache_dir, a new question D on each
                     image (image entries and prefix KV read from disk: survives restarts)
  fresh process cold the same new process on images it never saw (the fair baseline for the previous row)
Then every entry on disk is forged (one byte flipped) and a new process asks again: none may be served.
Answers are compared with a computation with every cache empty.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import edgevlm
from edgevlm.data import shapes
from edgevlm.profile import STAGES

QA, QB, QC, QD = "What color is the star?", "How many objects are there?", "Is there a red circle?", "Is there a blue square?"
SEED = shapes.TEST_SEED
ORDER = ["cold", "warm", "chat turn 2", "fresh process", "fresh process cold"]


def image(i: int):
    return shapes.make_example(SEED, i, "eval").image


def ask(vlm, img, q) -> dict:
    rs = list(vlm.stream(img, q, max_tokens=4))
    return {**rs[-1].profile, "tokens": [r.token for r in rs]}


def child(cache_dir: str, n: int, cold_from: int) -> None:
    """A fresh process: a new question D on images 0..n-1 (their entries on disk), then question A on images
    never seen. Each image has a cache directory of its own, so "cold" is cold: not even the chat template's
    first tokens come from another image's entries."""
    vlm = edgevlm.load()
    for i in range(n):
        vlm.caches = vlm.new_caches(Path(cache_dir) / str(i))
        print(json.dumps({"scenario": "fresh process", "i": i, **ask(vlm, image(i), QD)}))
    for i in range(cold_from, cold_from + n):
        vlm.caches = vlm.new_caches(Path(cache_dir) / str(i))
        print(json.dumps({"scenario": "fresh process cold", "i": i, **ask(vlm, image(i), QA)}))


def run_child(cache_dir: str, n: int, cold_from: int) -> list[dict]:
    out = subprocess.run([sys.executable, __file__, "--child", cache_dir, "--n", str(n), "--cold-from", str(cold_from)],
                         capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def measure(n: int) -> dict:
    runs: dict[str, list[dict]] = {k: [] for k in ORDER}
    with tempfile.TemporaryDirectory() as cache_dir:
        vlm = edgevlm.load()
        for i in range(n):
            img = image(i)
            vlm.caches = vlm.new_caches(Path(cache_dir) / str(i))  # empty: RAM and its own disk directory
            runs["cold"].append(ask(vlm, img, QA))
            runs["warm"].append(ask(vlm, img, QB))
            chat = vlm.chat()
            chat.send(QC, image=img, max_tokens=4)
            rs = list(chat.stream(QA, max_tokens=4))
            runs["chat turn 2"].append(rs[-1].profile)
        for r in run_child(cache_dir, n, cold_from=10_000):
            runs[r["scenario"]].append(r)
        # the same answers as with every cache empty
        reference = edgevlm.load()
        want = {}
        for q in (QB, QD):
            for i in range(n):
                reference.caches.clear()
                want[q, i] = ask(reference, image(i), q)["tokens"]
        same = {"warm": sum(r["tokens"] == want[QB, i] for i, r in enumerate(runs["warm"])),
                "fresh process": sum(r["tokens"] == want[QD, i] for i, r in enumerate(runs["fresh process"]))}
        # forge every entry on disk (one byte flipped, name kept): a new process must serve none of them
        entries = sorted(Path(cache_dir).rglob("*.evc"))
        for p in entries:
            blob = bytearray(p.read_bytes())
            blob[len(blob) // 2] ^= 0x20
            p.write_bytes(bytes(blob))
        forged_runs = [r for r in run_child(cache_dir, min(n, 8), cold_from=20_000) if r["scenario"] == "fresh process"]
    forged = {"entries_forged": len(entries), "questions": len(forged_runs),
              "served_from_disk": sum(r["image_cache_source"] == "disk" or r["prefix_cache_source"] == "disk"
                                      for r in forged_runs),
              "answers_identical": sum(r["tokens"] == want[QD, r["i"]] for r in forged_runs)}

    def summary(rs):
        return {"n": len(rs), "ttft_s_median": statistics.median(r["ttft_s"] for r in rs),
                "ttft_s_p10": statistics.quantiles([r["ttft_s"] for r in rs], n=10)[0],
                "stages_s_median": {s: statistics.median(r[f"{s}_s"] for r in rs) for s in STAGES},
                "prompt_tokens_median": statistics.median(r["prompt_tokens"] for r in rs),
                "prefilled_tokens_median": statistics.median(r["prefilled_tokens"] for r in rs),
                "image_cache_sources": sorted({r["image_cache_source"] for r in rs}),
                "prefix_cache_sources": sorted({r["prefix_cache_source"] for r in rs})}

    out = {k: summary(v) for k, v in runs.items()}
    cold = out["cold"]["ttft_s_median"]
    return {"bundle": "edgevlm/assets/shapes-fastvlm (embedded demo, fp32 ONNX)", "n_images": n, "seed": SEED,
            "scenarios": out,
            "ratios_p10": {k: out[k]["ttft_s_p10"] / out["cold"]["ttft_s_p10"] for k in ORDER},
            "ratios": {"warm_over_cold": out["warm"]["ttft_s_median"] / cold,
                       "chat_turn2_over_cold": out["chat turn 2"]["ttft_s_median"] / cold,
                       "fresh_process_over_cold": out["fresh process"]["ttft_s_median"] / cold,
                       "fresh_process_over_fresh_process_cold":
                           out["fresh process"]["ttft_s_median"] / out["fresh process cold"]["ttft_s_median"]},
            "answers_identical_to_no_cache": same, "forged": forged}


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    s, stages = result["scenarios"], [x for x in STAGES if x != "first_decode"]
    lines = ["| scenario | TTFT (median ms) | vs cold | TTFT p10 ms | p10 vs cold | prompt / prefilled tokens | image from | KV from | "
             + " | ".join(stages) + " |", "|---" * (8 + len(stages)) + "|"]
    cold, cold10 = s["cold"]["ttft_s_median"], s["cold"]["ttft_s_p10"]
    for k in ORDER:
        r = s[k]
        lines.append(f"| {k} | {r['ttft_s_median'] * 1e3:.2f} | {r['ttft_s_median'] / cold:.3f} | "
                     f"{r['ttft_s_p10'] * 1e3:.2f} | {r['ttft_s_p10'] / cold10:.3f} | "
                     f"{r['prompt_tokens_median']:.0f} / {r['prefilled_tokens_median']:.0f} | "
                     f"{'/'.join(x or '-' for x in r['image_cache_sources'])} | "
                     f"{'/'.join(x or '-' for x in r['prefix_cache_sources'])} | "
                     + " | ".join(f"{r['stages_s_median'][x] * 1e3:.2f}" for x in stages) + " |")
    f, same = result["forged"], result["answers_identical_to_no_cache"]
    n = result["n_images"]
    load = result.get("load_average_1min")
    where = f"2 cores, 1-minute load average {load[0]} at the start and {load[1]} at the end" if load else "2 cores"
    lines += ["", f"n = {n} held-out images (seed {result['seed']}), {where}: medians "
              "and 10th percentiles (the p10 is closer to the cost on a quiet machine; stage columns are medians). "
              f"Answers identical to an all-caches-empty run: warm {same['warm']}/{n}, fresh process "
              f"{same['fresh process']}/{n}. Forged entries (a byte flipped in each of {f['entries_forged']}): "
              f"served {f['served_from_disk']} times in {f['questions']} questions, answers identical "
              f"{f['answers_identical']}/{f['questions']}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.get_cmap("tab10").colors
    for i, k in enumerate(ORDER):
        bottom = 0.0
        for j, st in enumerate(stages):
            h = s[k]["stages_s_median"][st] * 1e3
            ax.bar(i, h, 0.6, bottom=bottom, color=colors[j], label=st if i == 0 else None)
            bottom += h
        ax.plot([i - 0.3, i + 0.3], [s[k]["ttft_s_median"] * 1e3] * 2, color="black")
        ax.text(i, s[k]["ttft_s_median"] * 1e3, f"{s[k]['ttft_s_median'] / cold:.2f}x", ha="center", va="bottom")
    ax.set_xticks(range(len(ORDER)), ORDER, fontsize=8)
    ax.set_ylabel("ms (stages: medians; black line: median TTFT)")
    ax.set_title("Demo bundle: TTFT cold vs warm (image cache + prefix KV cache)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--out", default="benchmarks/results/cache_ttft")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cold-from", type=int, default=10_000, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.n, args.cold_from)
        return
    import os

    before = os.getloadavg()[0]
    result = measure(args.n)
    result["load_average_1min"] = [round(before, 2), round(os.getloadavg()[0], 2)]  # at start and end
    write(result, Path(args.out))


if __name__ == "__main__":
    main()

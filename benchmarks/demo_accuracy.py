"""Accuracy of the committed demo bundles on the held-out test split, overall and per question type.

    python benchmarks/demo_accuracy.py [--n 1000] [--seed 2000003] [--position-n 300] [--chat-n 150]

Greedy, exact match after normalisation (`edgevlm eval`), both bundles on the same questions; then the
position questions alone (--position-n of them, seed 424242), by form and by what was answered, since that
type used to be where the demo fell short; then two-question chats (--chat-n of them, seed 8800001: a question
with the image, then another about it in the same chat), since the demo is trained on single questions.
Writes benchmarks/results/demo_accuracy.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import edgevlm
from edgevlm.data import shapes
from edgevlm.evaluate import evaluate

ASSETS = Path(edgevlm.__file__).parent / "assets"
BUNDLES = {"standard": ASSETS / "shapes-fastvlm", "pre-fusion (LLaVA-Mini)": ASSETS / "shapes-fastvlm-mini"}


POSITION_SEED = 424_242  # used by nothing else
CHAT_SEED = 8_800_001  # nor this


def two_turns(vlm, n: int, seed: int = CHAT_SEED) -> dict:
    """n chats of two questions about one image (the second drawn from the other types of the same scene):
    accuracy of each turn."""
    import numpy as np

    ok = [0, 0]
    for i, ex in enumerate(shapes.examples(seed, n, split="eval")):
        (_, q2, a2), = shapes.scene_questions(ex.scene, np.random.default_rng([seed, i]), 1, split="eval")
        chat = vlm.chat()
        for k, (q, a, img) in enumerate(((ex.question, ex.answer, ex.image), (q2, a2, None))):
            ok[k] += shapes.normalize_answer(chat.send(q, image=img, max_tokens=24)) == shapes.normalize_answer(a)
    return {"n": n, "turn1": ok[0] / n, "turn2": ok[1] / n}


def position_forms(vlm, n: int, seed: int = POSITION_SEED) -> dict:
    """The first n position questions of the seed's stream: accuracy per form ("side", "x", "y") and the
    counts of (right answer -> answer given)."""
    tally: dict[str, dict[str, int]] = {}
    right: dict[str, int] = {}
    seen, index = 0, 0
    while seen < n:
        ex = shapes.make_example(seed, index)
        index += 1
        if ex.qtype != "position":
            continue
        got = shapes.normalize_answer(vlm.generate(ex.image, ex.question, max_tokens=4))
        cell = tally.setdefault(ex.spec.form, {})
        cell[f"{ex.answer} -> {got}"] = cell.get(f"{ex.answer} -> {got}", 0) + 1
        right[ex.spec.form] = right.get(ex.spec.form, 0) + (got == ex.answer)
        seen += 1
    return {form: {"n": sum(c.values()), "accuracy": right[form] / sum(c.values()), "answers": dict(sorted(c.items()))}
            for form, c in sorted(tally.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=shapes.TEST_SEED)
    p.add_argument("--position-n", type=int, default=300, help="position questions for the by-form breakdown")
    p.add_argument("--chat-n", type=int, default=150, help="two-question chats")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo_accuracy")
    args = p.parse_args()
    results = {}
    for name, path in BUNDLES.items():
        if not (path / "manifest.json").is_file():
            continue
        t = time.perf_counter()
        vlm = edgevlm.load(path)
        r = evaluate(vlm, "shapes", args.seed, args.n)
        if args.position_n:
            r["position_forms"] = position_forms(vlm, args.position_n)
        if args.chat_n:
            r["two_turns"] = two_turns(vlm, args.chat_n)
        r["bundle"] = path.name
        r["bundle_bytes"] = sum(f.stat().st_size for f in path.iterdir())
        r["seconds"] = round(time.perf_counter() - t, 1)
        results[name] = r
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"seed": args.seed, "n": args.n, "results": results}, indent=1))
    types = list(shapes.QTYPES)
    lines = ["| bundle | overall | " + " | ".join(types) + " | bytes |", "|---" * (len(types) + 3) + "|"]
    for name, r in results.items():
        cells = " | ".join(f"{r['per_type'].get(t, 0):.3f}" for t in types)
        lines.append(f"| {name} | **{r['accuracy']:.3f}** | {cells} | {r['bundle_bytes'] / 1e6:.1f} MB |")
    lines.append(f"\nn = {args.n} questions of the held-out split, seed {args.seed}; greedy; exact match.")
    if args.position_n:
        lines += ["", f"Position questions by form ({args.position_n} of seed {POSITION_SEED}; answers given, by right answer):",
                  "", "| bundle | form | n | accuracy | right answer -> answer given (count) |", "|---|---|---|---|---|"]
        for name, r in results.items():
            for form, f in r.get("position_forms", {}).items():
                given = ", ".join(f"{k}: {v}" for k, v in f["answers"].items())
                lines.append(f"| {name} | {form} | {f['n']} | {f['accuracy']:.3f} | {given} |")
    if args.chat_n:
        lines += ["", f"Two-question chats ({args.chat_n} of seed {CHAT_SEED}: the image and a question, then another "
                  "question about it in the same chat):", "", "| bundle | turn 1 | turn 2 |", "|---|---|---|"]
        lines += [f"| {name} | {r['two_turns']['turn1']:.3f} | {r['two_turns']['turn2']:.3f} |"
                  for name, r in results.items() if "two_turns" in r]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3))
        width = 0.8 / max(1, len(results))
        for i, (name, r) in enumerate(results.items()):
            xs = [j + i * width for j in range(len(types) + 1)]
            ax.bar(xs, [r["accuracy"]] + [r["per_type"].get(t, 0) for t in types], width, label=name)
        ax.set_xticks([j + width / 2 for j in range(len(types) + 1)], ["overall"] + types, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("exact match")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

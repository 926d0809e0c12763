"""Accuracy and honesty of the committed demo bundles: single questions, later turns of a chat, and inputs from
outside the shapes world.

    python benchmarks/demo_accuracy.py [--n 1000] [--seed 2000003] [--position-n 300] [--chat-n 150]
                                       [--outworld-n 300] [--text-n 100] [--odd-n 50]

Both bundles, greedy, exact match after normalisation (`edgevlm eval`), on the same inputs:
- first question: n held-out questions of the test split, per type; position questions alone by form;
- chats: --chat-n three-question chats (edgevlm.data.chats, seed 2000017) asked in one edgevlm Chat, previous
  answers in context, accuracy per turn; and two-question chats (seed 8800001) as measured before the demo was
  trained on chats;
- out of the world, where the one right answer is edgevlm.data.outworld.SENTENCE: --outworld-n pictures of the
  held-out outworld stream (seed 2000011, per kind), --text-n questions with no picture, three-question chats
  about such pictures (turns 2 and 3 too), the photos that ship with matplotlib and scikit-learn and crops of
  them (real photos; none is in training), and questions from outside the world's wordings about shapes scenes;
- degenerate output: every answer above to an out-of-world input and to --odd-n pictures in odd forms
  (outworld.make_odd: 1-8 px, strips, greyscale, alpha, palettes, photo-sized, ...) generated up to 64 tokens;
  an answer that does not end or that repeats a piece four times in a row counts (edgevlm.evaluate.degenerate).
Writes benchmarks/results/demo_accuracy.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import edgevlm
from edgevlm.data import chats, outworld, shapes
from edgevlm.evaluate import degenerate, evaluate

ASSETS = Path(edgevlm.__file__).parent / "assets"
BUNDLES = {"standard": ASSETS / "shapes-fastvlm", "pre-fusion (LLaVA-Mini)": ASSETS / "shapes-fastvlm-mini"}

POSITION_SEED = 424_242  # used by nothing else
TWO_TURN_SEED = 8_800_001  # nor this
ODD_SEED = 7_700_001  # nor this
PHOTO_QUESTIONS = ("What color is the star?", "How many objects are there?", "Describe the image.",
                   "What is in this image?", "Is there a red circle?")


def norm(s: str) -> str:
    return shapes.normalize_answer(s)


def answer(vlm, image, question: str, max_tokens: int = 64) -> tuple[str, bool]:
    """Greedy answer and whether it ended (EOS) within max_tokens."""
    rs = list(vlm.stream(image, question, max_tokens=max_tokens))
    return "".join(r.text for r in rs), rs[-1].finish_reason == "stop"


def two_turns(vlm, n: int, seed: int = TWO_TURN_SEED) -> dict:
    """n chats of two questions about one image (the second drawn from the scene's questions): each turn."""
    ok = [0, 0]
    for i, ex in enumerate(shapes.examples(seed, n, split="eval")):
        (_, q2, a2), = shapes.scene_questions(ex.scene, np.random.default_rng([seed, i]), 1, split="eval")
        chat = vlm.chat()
        for k, (q, a, img) in enumerate(((ex.question, ex.answer, ex.image), (q2, a2, None))):
            ok[k] += norm(chat.send(q, image=img, max_tokens=24)) == norm(a)
    return {"n": n, "seed": seed, "turn1": ok[0] / n, "turn2": ok[1] / n}


def three_turns(vlm, n: int, seed: int = chats.TEST_SEED) -> dict:
    """n three-question chats about a shapes scene: accuracy per turn, and per type from the second turn on."""
    ok, per = np.zeros(3), {}
    for i in range(n):
        chat = chats.shapes_chat(seed, i, 3)
        for k, (t, got) in enumerate(zip(chat.turns, chats.run(vlm, chat, max_tokens=24))):
            right = norm(got) == norm(t.answer)
            ok[k] += right
            if k:
                per.setdefault(t.qtype, []).append(right)
    return {"n": n, "seed": seed, **{f"turn{k + 1}": ok[k] / n for k in range(3)},
            "later_turns_per_type": {q: float(np.mean(v)) for q, v in sorted(per.items())}}


def real_photos() -> dict[str, object]:
    """The sample photos of matplotlib and scikit-learn, where installed (name -> PIL image)."""
    from PIL import Image

    found = {}
    try:
        from matplotlib import cbook

        found["grace_hopper.jpg"] = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    except Exception:  # noqa: BLE001 - optional
        pass
    try:
        from sklearn.datasets import load_sample_image

        for name in ("china.jpg", "flower.jpg"):
            found[name] = Image.fromarray(load_sample_image(name))
    except Exception:  # noqa: BLE001 - optional
        pass
    return found


def photo_inputs(crops: int = 20, seed: int = 5) -> list[tuple[str, object]]:
    """Each real photo whole and `crops` random crops of it (at least 64 px, any aspect)."""
    out = []
    rng = np.random.default_rng(seed)
    for name, im in real_photos().items():
        out.append((name, im))
        w, h = im.size
        for _ in range(crops):
            cw, ch = int(rng.integers(64, w)), int(rng.integers(64, h))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            out.append((name, im.crop((x, y, x + cw, y + ch))))
    return out


def honesty(vlm, n_images: int, n_text: int, n_chats: int, n_odd: int, photos: list) -> dict:
    """Out-of-world inputs: the share answered with SENTENCE, per group (and per kind of picture); every answer
    is also checked for degenerate output."""
    want = norm(outworld.SENTENCE)
    groups: dict[str, list[bool]] = {}
    kinds: dict[str, list[bool]] = {}
    bad: list[dict] = []

    def score(group, image, question, kind=""):
        text, ended = answer(vlm, image, question)
        groups.setdefault(group, []).append(norm(text) == want)
        if kind:
            kinds.setdefault(kind, []).append(norm(text) == want)
        if degenerate(text, ended):
            bad.append({"group": group, "question": question, "answer": text[:80]})

    for ex in outworld.examples(outworld.TEST_SEED, n_images):
        score("pictures", ex.image, ex.question, ex.kind)
    for ex in outworld.examples(outworld.TEST_SEED, n_text, image=False):
        score("no picture", None, ex.question)
    for k, (name, im) in enumerate(photos):
        score("real photos", im, PHOTO_QUESTIONS[k % len(PHOTO_QUESTIONS)])
    for i in range(n_odd):
        score("odd pictures", outworld.make_odd(ODD_SEED, i), outworld.question(np.random.default_rng([ODD_SEED, i]), "eval"))
    for i in range(n_chats):  # later turns about an out-of-world picture
        chat = chats.outworld_chat(outworld.TEST_SEED, 10_000 + i, 3)
        for k, (t, got) in enumerate(zip(chat.turns, chats.run(vlm, chat, max_tokens=64))):
            groups.setdefault(f"chat turn {k + 1}", []).append(norm(got) == want)
    rng = np.random.default_rng(ODD_SEED)
    for ex in shapes.examples(ODD_SEED, 100):  # a shapes scene, a question from outside its wordings
        text, ended = answer(vlm, ex.image, outworld.generic_question(rng, "eval"))
        groups.setdefault("off-topic question, shapes picture", []).append(norm(text) == want)
        if degenerate(text, ended):
            bad.append({"group": "off-topic", "answer": text[:80]})
    return {"groups": {g: {"n": len(v), "honest": float(np.mean(v))} for g, v in groups.items()},
            "kinds": {k: {"n": len(v), "honest": float(np.mean(v))} for k, v in sorted(kinds.items())},
            "degenerate": {"checked": sum(len(v) for g, v in groups.items() if not g.startswith("chat")),
                           "count": len(bad), "examples": bad[:10]}}


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
        got = norm(vlm.generate(ex.image, ex.question, max_tokens=4))
        cell = tally.setdefault(ex.spec.form, {})
        cell[f"{ex.answer} -> {got}"] = cell.get(f"{ex.answer} -> {got}", 0) + 1
        right[ex.spec.form] = right.get(ex.spec.form, 0) + (got == ex.answer)
        seen += 1
    return {form: {"n": sum(c.values()), "accuracy": right[form] / sum(c.values()), "answers": dict(sorted(c.items()))}
            for form, c in sorted(tally.items())}


def markdown(args, results: dict, photo_names: list[str]) -> str:
    types = list(shapes.QTYPES)
    lines = ["| bundle | first question | " + " | ".join(types) + " | chat turn 2 | chat turn 3 | out-of-world pictures "
             "| no picture | real photos | degenerate | bytes |", "|---" * (len(types) + 9) + "|"]
    for name, r in results.items():
        h = r["honesty"]["groups"]
        cells = " | ".join(f"{r['per_type'].get(t, 0):.3f}" for t in types)
        lines.append(f"| {name} | **{r['accuracy']:.3f}** | {cells} | **{r['three_turns']['turn2']:.3f}** | "
                     f"**{r['three_turns']['turn3']:.3f}** | **{h['pictures']['honest']:.3f}** | "
                     f"**{h['no picture']['honest']:.3f}** | {h.get('real photos', {}).get('honest', float('nan')):.3f} | "
                     f"{r['honesty']['degenerate']['count']} / {r['honesty']['degenerate']['checked']} | "
                     f"{r['bundle_bytes'] / 1e6:.1f} MB |")
    lines += ["", f"First question: n = {args.n} of the held-out split, seed {args.seed}. Chat turns: {args.chat_n} "
              f"three-question chats of seed {chats.TEST_SEED} (the image with the first question; each later question "
              "after the model's own earlier answers). Out of the world (right answer: \"" + outworld.SENTENCE + "\"): "
              f"{args.outworld_n} pictures of seed {outworld.TEST_SEED}, {args.text_n} questions with no picture, "
              f"{len(photo_names)} real photos and crops ({', '.join(sorted(set(photo_names))) or 'none installed'}). "
              f"Degenerate: answers that did not end within 64 tokens or repeat a piece 4+ times, over every "
              f"out-of-world answer and {args.odd_n} pictures in odd forms (seed {ODD_SEED}). Greedy; exact match."]
    lines += ["", "Chats, per turn, and the shares answered with the sentence per group:", "",
              "| bundle | chats turn 1 / 2 / 3 | two-question chats (seed 8800001) turn 1 / 2 | "
              + " | ".join(next(iter(results.values()))["honesty"]["groups"]) + " |",
              "|---" * (3 + len(next(iter(results.values()))["honesty"]["groups"])) + "|"]
    for name, r in results.items():
        t, two = r["three_turns"], r["two_turns"]
        lines.append(f"| {name} | {t['turn1']:.3f} / {t['turn2']:.3f} / {t['turn3']:.3f} | "
                     f"{two['turn1']:.3f} / {two['turn2']:.3f} | "
                     + " | ".join(f"{g['honest']:.3f} (n={g['n']})" for g in r["honesty"]["groups"].values()) + " |")
    kinds = list(outworld.KINDS)
    lines += ["", "Out-of-world pictures by kind (share answered with the sentence):", "",
              "| bundle | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for name, r in results.items():
        k = r["honesty"]["kinds"]
        lines.append(f"| {name} | " + " | ".join(f"{k[x]['honest']:.3f}" if x in k else "-" for x in kinds) + " |")
    lines += ["", f"Position questions by form ({args.position_n} of seed {POSITION_SEED}):", "",
              "| bundle | form | n | accuracy | right answer -> answer given (count) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        for form, f in r.get("position_forms", {}).items():
            given = ", ".join(f"{k}: {v}" for k, v in f["answers"].items())
            lines.append(f"| {name} | {form} | {f['n']} | {f['accuracy']:.3f} | {given} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = ["first question", "chat turn 2", "chat turn 3", "out-of-world", "no picture", "real photos"]
    fig, ax = plt.subplots(figsize=(7.5, 3))
    width = 0.8 / max(1, len(results))
    for i, (name, r) in enumerate(results.items()):
        h = r["honesty"]["groups"]
        vals = [r["accuracy"], r["three_turns"]["turn2"], r["three_turns"]["turn3"], h["pictures"]["honest"],
                h["no picture"]["honest"], h.get("real photos", {}).get("honest", 0)]
        ax.bar([j + i * width for j in range(len(vals))], vals, width, label=name)
    ax.set_xticks([j + width / 2 for j in range(len(labels))], labels, fontsize=8)
    ax.set_ylim(0.8, 1.0)
    ax.set_ylabel("exact match")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=shapes.TEST_SEED)
    p.add_argument("--position-n", type=int, default=300, help="position questions for the by-form breakdown")
    p.add_argument("--chat-n", type=int, default=150, help="three-question (and two-question) chats")
    p.add_argument("--outworld-n", type=int, default=300, help="out-of-world pictures")
    p.add_argument("--text-n", type=int, default=100, help="questions with no picture")
    p.add_argument("--odd-n", type=int, default=50, help="pictures in odd forms (degenerate-output check)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo_accuracy")
    args = p.parse_args()
    photos = photo_inputs()
    results = {}
    for name, path in BUNDLES.items():
        t = time.perf_counter()
        vlm = edgevlm.load(path)
        r = evaluate(vlm, "shapes", args.seed, args.n)
        r["position_forms"] = position_forms(vlm, args.position_n)
        r["three_turns"] = three_turns(vlm, args.chat_n)
        r["two_turns"] = two_turns(vlm, args.chat_n)
        r["honesty"] = honesty(vlm, args.outworld_n, args.text_n, args.chat_n // 3, args.odd_n, photos)
        r["bundle"] = path.name
        r["bundle_bytes"] = sum(f.stat().st_size for f in path.iterdir())
        r["seconds"] = round(time.perf_counter() - t, 1)
        results[name] = r
        print(name, json.dumps({k: v for k, v in r.items() if k not in ("position_forms",)})[:600], flush=True)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"seed": args.seed, "n": args.n, "sentence": outworld.SENTENCE,
                                                    "results": results}, indent=1))
    out.with_suffix(".md").write_text(markdown(args, results, [n for n, _ in photos]))
    plot(results, out)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

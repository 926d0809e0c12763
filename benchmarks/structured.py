"""Structured output: what the grammar mask costs a decode step, and what the demo answers under a schema.

    python benchmarks/structured.py [--n 300] [--reps 5] [--tokens 48] [--skip-05b] [--out benchmarks/results/structured]

1. FastVLM-0.5B's language model (Qwen2-0.5B: 24 layers, hidden 896, its real 151,936-token vocabulary and BPE from
   tests/data/real; random weights; int4 as `edgevlm quant --scheme int4`; the vision tower cut to one block a stage,
   it does not take part in decoding): decode tokens/s with and without a JSON Schema, the two taking turns in one
   process, median of --reps, and the mask's own time per token. Built once into benchmarks/.cache/structured.
2. The embedded demo bundle: n held-out "Describe the image." questions answered free and under
   edgevlm.data.shapes.scene_schema(): the share of answers that parse and validate, the share that name exactly
   the scene's objects (left to right) next to the free-text answers', and TTFT / tokens/s both ways.
Results: <out>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "structured"
sys.path.insert(0, str(HERE.parent / "tests"))


def build_05b() -> Path:
    """The int4 bundle of a FastVLM-0.5B-shaped checkpoint (real config, tokenizer and widths; random weights)."""
    out = CACHE / "fastvlm-0.5b-int4"
    if (out / "manifest.json").exists():
        return out
    from real_checkpoints import CHECKPOINTS, REAL

    from edgevlm.export.exporter import export
    from edgevlm.export.dev.published import Cut, build_from_published
    from edgevlm.quant import quantize_bundle

    real = CHECKPOINTS["fastvlm-0.5b-hf"]
    ckpt = CACHE / "ckpt"
    if not (ckpt / "config.json").exists():  # the whole language model: decoding is what is measured
        build_from_published(REAL / real.files, ckpt, Cut(text_layers=24, vision_layers=2, stages=(1, 1, 1, 1, 1)),
                             tokenizer_from=real.tokenizer_from)
    export(ckpt, CACHE / "fp32", overwrite=True, parity_tokens=4, max_logit_diff=1e-2)
    quantize_bundle(CACHE / "fp32", out, "int4", overrides={"vision": "fp32"}, overwrite=True, calib_n=4, eval_n=4)
    return out


def decode_rates(bundle: Path, reps: int, tokens: int) -> dict:
    """tokens/s of `tokens` greedy steps after the same prompt, free and under a JSON Schema, taking turns."""
    import numpy as np

    import edgevlm
    from edgevlm.constrain import grammar_of

    vlm = edgevlm.load(bundle, threads=2)
    eos = {t: -100 for t in vlm.manifest.generation.eos_token_ids}
    schema = {"type": "object", "properties": {"caption": {"type": "string"}, "tags": {
        "type": "array", "items": {"type": "string"}}}, "required": ["caption", "tags"]}
    image = np.full((64, 64, 3), 128, np.uint8)
    runs: dict[str, list[float]] = {"free": [], "schema": []}
    for r in range(reps + 1):  # the first pair warms up (and builds the token table)
        for kind in ("free", "schema"):
            kw = {"json_schema": schema} if kind == "schema" else {}
            rs = list(vlm.stream(image, "Describe the image.", max_tokens=tokens, logit_bias=eos, **kw))
            if r:
                runs[kind].append(rs[-1].decode_tps)
    table = vlm.token_table()
    proc = table.processor(grammar_of({"type": "json_schema", "json_schema": {"schema": schema}}))
    logits, history, t = np.zeros(vlm.manifest.vocab_size, np.float32), [], time.perf_counter()
    for _ in range(tokens):
        out = proc(logits, history)
        history.append(int(np.argmax(out)))
    mask_s = (time.perf_counter() - t) / tokens
    free, con = statistics.median(runs["free"]), statistics.median(runs["schema"])
    return {"free_tps": free, "schema_tps": con, "ratio": con / free, "mask_ms": mask_s * 1e3,
            "step_ms": 1e3 / free, "runs": runs, "vocab": vlm.manifest.vocab_size, "tokens": tokens}


def demo_answers(n: int) -> dict:
    import edgevlm
    from edgevlm.data import shapes

    vlm = edgevlm.load()
    schema = shapes.scene_schema()
    exs = [ex for ex in shapes.examples(31_337, n * 12, split="eval") if ex.qtype == "describe"][:n]
    valid = right_json = right_free = 0
    ttft = {"free": [], "schema": []}
    tps = {"free": [], "schema": []}
    for ex in exs:
        free = list(vlm.stream(ex.image, ex.question, max_tokens=48))
        con = list(vlm.stream(ex.image, ex.question, json_schema=schema, max_tokens=160))
        right_free += shapes.normalize_answer("".join(r.text for r in free)) == shapes.normalize_answer(ex.answer)
        try:
            got = json.loads("".join(r.text for r in con))
            valid += _valid(got, schema)
            right_json += got == shapes.scene_json(ex.scene)
        except ValueError:
            pass
        for kind, rs in (("free", free), ("schema", con)):
            ttft[kind].append(rs[0].ttft_s)
            tps[kind].append(rs[-1].decode_tps)
    return {"n": len(exs), "valid": valid / len(exs), "exact_json": right_json / len(exs),
            "exact_free": right_free / len(exs), "ttft_ms": {k: statistics.median(v) * 1e3 for k, v in ttft.items()},
            "decode_tps": {k: statistics.median(v) for k, v in tps.items()}}


def _valid(value, schema) -> bool:
    """scene_schema's constraints, checked directly (the benchmark needs no jsonschema package)."""
    props = schema["properties"]["objects"]
    objs = value.get("objects") if isinstance(value, dict) and set(value) == {"objects"} else None
    if not isinstance(objs, list) or not props["minItems"] <= len(objs) <= props["maxItems"]:
        return False
    item = props["items"]["properties"]
    return all(isinstance(o, dict) and set(o) == set(item) and all(o[k] in item[k]["enum"] for k in item) for o in objs)


def write(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Structured output\n", result["note"] + "\n"]
    if "05b" in result:
        r = result["05b"]
        lines += ["| FastVLM-0.5B shape, int4 decoder, 2 threads | tokens/s free | tokens/s under a JSON Schema | ratio | "
                  "mask per token | decode step |", "|---|---|---|---|---|---|",
                  f"| {r['tokens']} greedy tokens, median of {len(r['runs']['free'])} | {r['free_tps']:.1f} | "
                  f"{r['schema_tps']:.1f} | {r['ratio']:.3f} | {r['mask_ms']:.3f} ms | {r['step_ms']:.2f} ms |",
                  f"\nGoal (a schema costs at most ~10% of decode speed): **{'met' if r['ratio'] >= 0.9 else 'not met'}**.\n"]
    d = result["demo"]
    lines += ["| demo, \"Describe the image.\" | n | valid JSON of the schema | exact objects | TTFT ms | tokens/s |",
              "|---|---|---|---|---|---|",
              f"| free text | {d['n']} | - | {d['exact_free']:.3f} | {d['ttft_ms']['free']:.2f} | {d['decode_tps']['free']:.0f} |",
              f"| scene_schema() | {d['n']} | {d['valid']:.3f} | {d['exact_json']:.3f} | {d['ttft_ms']['schema']:.2f} | "
              f"{d['decode_tps']['schema']:.0f} |"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    bars = [("demo free", d["exact_free"]), ("demo JSON valid", d["valid"]), ("demo JSON exact", d["exact_json"])]
    if "05b" in result:
        bars.append(("0.5B tok/s ratio", result["05b"]["ratio"]))
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color=["#888", "#3a7", "#37a", "#a73"][:len(bars)])
    ax.set_ylim(0, 1.1)
    ax.set_title("structured output: validity, accuracy, speed ratio", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="demo describe questions (300)")
    p.add_argument("--reps", type=int, default=5, help="free / schema pairs on the 0.5B shape (5)")
    p.add_argument("--tokens", type=int, default=48, help="tokens per decode run (48)")
    p.add_argument("--skip-05b", action="store_true", help="only the demo part")
    p.add_argument("--out", type=Path, default=HERE / "results" / "structured")
    args = p.parse_args(argv)
    from edgevlm.cpu import isa

    result = {"machine": platform.platform(), "isa": isa(), "date": time.strftime("%Y-%m-%d")}
    if not args.skip_05b:
        result["05b"] = decode_rates(build_05b(), args.reps, args.tokens)
    result["demo"] = demo_answers(args.n)
    result["note"] = (f"CPU {platform.machine()} ({isa()}), {time.strftime('%Y-%m-%d')}; `python benchmarks/structured.py`. "
                      "Grammar masks from llguidance; the 0.5B figures are ratios from runs taking turns in one process.")
    write(result, args.out)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

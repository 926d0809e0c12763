"""Markdown table and PNG of `benchmarks/peers_mtmd.py`'s result (the JSON is written by peers_mtmd.py)."""

from __future__ import annotations

from pathlib import Path

MODEL_NAMES = {
    "smolvlm": "SmolVLM-256M-Instruct shape (SigLIP-B/16 512 px x 12 layers, pixel shuffle x4, SmolLM2-135M x 30 "
               "layers; full depth)",
    "llava": "LLaVA-1.5-7B shape (CLIP ViT-L/14-336 x 24 layers, MLP projector; LLaMA-7B width 4096 / 32 heads / "
             "MLP 11008 / vocabulary 32064, cut to 2 of 32 layers)",
}
STAGES = ("preprocess", "encode", "prefill", "sample")


def _ms(s: float) -> str:
    return f"{1000 * s:.0f}" if s >= 0.0995 else f"{1000 * s:.1f}"


def _mb(b: float) -> str:
    return f"{b / 1e6:.0f}"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "not met"


def markdown(result: dict) -> str:
    m = result["machine"]
    la = result["load_avg"]
    loads = [x for per in result["models"].values() for row in per["rows"].values() for x in row["load_avg"]]
    lines = [f"CPU: {m['cpu']} ({m['cores']} cores; {m['isa']}: {', '.join(m['flags'])}); onnxruntime "
             f"{m['onnxruntime']}, llama-cpp-python {m['llama_cpp_python']}. 1-minute load average at the start "
             f"{la['start']:.1f}, between {min(loads):.1f} and {max(loads):.1f} before the sessions (median "
             f"{sorted(loads)[len(loads) // 2]:.1f}), at the end {la.get('end', float('nan')):.1f}"
             + (": the machine was shared with other jobs, absolute times are inflated; read the ratios (both sides "
                "of each were measured in the same minutes)." if max(loads) > 2.5 else "."),
             "", f"RANDOM weights (speed only). Every figure is the median of {result['reps']} sessions, each in a "
             "fresh process (load, an untimed warm-up turn, then a cold turn on a new image, a warm turn on the "
             f"same image with a new question, {result['decode_tokens']} greedy tokens); the sessions of a class "
             "took turns. Prompt: the model's chat template with one image and \"" + result["prompt"] + "\"; warm: "
             "\"" + result["question"] + "\" (new conversation, same image file). llama.cpp: libmtmd through "
             "llama-cpp-python, reusing the previous prompt's KV cache for the common prefix as llama-server does "
             "(it re-reads and re-preprocesses the image, and skips encoding it). Stages: preprocess (file -> "
             "pixels; llama.cpp: bitmap + mtmd_tokenize), encode (vision tower + projector), prefill (the language "
             "model over the prompt; ours includes template + tokenizer + embedding), sample; first decode step "
             "apart.", ""]
    for model, per in result["models"].items():
        lines += [f"### {MODEL_NAMES.get(model, model)}", "", f"Image {per['image_size'][0]}x{per['image_size'][1]} "
                  "PNG.", "",
                  "| class | threads | system | cold TTFT ms | preprocess / encode / prefill / sample | vs llama.cpp "
                  "| warm TTFT ms (prefilled tokens) | decode tok/s | vs llama.cpp | peak RSS MB | on disk MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, row in per["rows"].items():
            cls, threads = key.split()
            sy = row["systems"]
            best_t = min((k for k in sy if k.startswith("llama")), key=lambda k: sy[k]["cold_ttft_s"])
            best_d = max((k for k in sy if k.startswith("llama")), key=lambda k: sy[k]["decode_tps"])
            for name, v in sy.items():
                ours = name.startswith("edgevlm")
                st = " / ".join(_ms(v["cold_stages_s"].get(s, 0.0)) for s in STAGES)
                rc = f"**{v['cold_ttft_s'] / sy[best_t]['cold_ttft_s']:.2f}x**" if ours else ""
                rd = f"**{v['decode_tps'] / sy[best_d]['decode_tps']:.2f}x**" if ours else ""
                lines.append(f"| {cls} | {threads[:-1]} | {name} | {_ms(v['cold_ttft_s'])} | {st} | {rc} | "
                             f"{_ms(v['warm_ttft_s'])} ({v['warm_prefilled_tokens']}) | {v['decode_tps']:.1f} | {rd} "
                             f"| {_mb(v['peak_rss_bytes'])} | {_mb(v['disk_bytes'])} |")
        first = next(iter(per["rows"].values()))
        n_prompt = {k: v["prompt_tokens"] for k, v in first["systems"].items()}
        lines += ["", f"Prompt tokens: {', '.join(f'{k} {v}' for k, v in n_prompt.items())}. Agreement on the same "
                  "image (first round; logits of the first token):", ""]
        lines += ["| class | threads | edgevlm | llama.cpp | prompt ids identical | logits corr | max abs diff (max abs) "
                  "| same top-1 / top-5 | greedy tokens equal |", "|---|---|---|---|---|---|---|---|---|"]
        for key, ag in per["agreement"].items():
            cls, threads = key.split()
            for pair, a in ag.items():
                x, y = pair.split(" | ")
                lines.append(f"| {cls} | {threads[:-1]} | {x[8:]} | {y[10:]} | {'yes' if a['prompt_ids_identical'] else 'no (' + str(a['first_difference']) + ')'} "
                             f"| {a['logits_corr']:.5f} | {a['logits_max_abs_diff']:.3g} ({a['logits_max_abs']:.3g}) | "
                             f"{'yes' if a['top1_same'] else 'no'} / {'yes' if a['top5_same_set'] else 'no'} | "
                             f"{a['greedy_agree']}/{a['greedy_len']} |")
        names = {k for r in per["rows"].values() for k in r["systems"]}  # each class has its own systems
        decides = {k: all(r["systems"][k].get("image_decides", True) for r in per["rows"].values() if k in r["systems"])
                   for k in sorted(names)}
        lines += ["", "Two images give different greedy answers (the image decides): "
                  + ("every system" if all(decides.values()) else
                     "not for " + ", ".join(k for k, v in decides.items() if not v)) + ".", ""]
    g = result.get("goals_measured", {})
    if g:
        lines += ["### Goals", "", f"cold TTFT <= {result['goals']['cold_ttft_vs_mtmd']}x llama.cpp's (our fastest "
                  "system of the class vs llama.cpp's fastest), decode >= "
                  f"{result['goals']['decode_vs_mtmd']}x, warm TTFT <= {result['goals']['warm_over_our_cold']}x our "
                  "cold and below llama.cpp's warm.", "",
                  "| model | class | threads | cold TTFT ratio | decode ratio | warm / our cold | warm ours / llama.cpp ms |",
                  "|---|---|---|---|---|---|---|"]
        for key, v in g.items():
            model, cls, threads = key.split()
            lines.append(f"| {model} | {cls} | {threads[:-1]} | {v['cold_ratio']:.2f}x ({_verdict(v['met']['cold_ttft_vs_mtmd'])}) "
                         f"| {v['decode_ratio']:.2f}x ({_verdict(v['met']['decode_vs_mtmd'])}) | "
                         f"{v['warm_over_our_cold']:.3f} ({_verdict(v['met']['warm'])}) | "
                         f"{_ms(v['warm_ours_s'])} / {_ms(v['warm_theirs_s'])} |")
    if "seconds" in result:
        lines += ["", f"Run time: build {result['seconds']['build']:.0f} s (cached after the first run), measurement "
                  f"{result['seconds']['measure']:.0f} s."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.2 * len(models)), squeeze=False)
    colours = {"preprocess": "#9ab", "encode": "C0", "prefill": "C1", "sample": "#444"}
    for i, model in enumerate(models):
        rows = result["models"][model]["rows"]
        labels, bars, dec = [], [], []
        for key, row in rows.items():
            for name, v in row["systems"].items():
                short = name.replace("llama.cpp ", "l.cpp ").replace(" + mmproj ", "+mm ")
                labels.append(f"{key} {short}")
                bars.append(v["cold_stages_s"])
                dec.append((v["decode_tps"], name.startswith("edgevlm")))
        a, b = axes[i]
        y = list(range(len(labels)))[::-1]
        left = [0.0] * len(labels)
        for s in ("preprocess", "encode", "prefill", "sample"):
            w = [st.get(s, 0.0) for st in bars]
            a.barh(y, w, left=left, color=colours[s], label=s)
            left = [l + x for l, x in zip(left, w)]
        a.set_yticks(y, labels, fontsize=6)
        a.set_xlabel("cold TTFT, s (median), by stage")
        a.set_title(f"{model}: cold TTFT", fontsize=9)
        a.legend(fontsize=7)
        b.barh(y, [d for d, _ in dec], color=["C0" if o else "C1" for _, o in dec])
        b.set_yticks(y, labels, fontsize=6)
        b.set_xlabel("decode tokens/s (blue: edgevlm, orange: llama.cpp)")
        b.set_title(f"{model}: decode", fontsize=9)
    m = result["machine"]
    fig.suptitle(f"edgevlm vs llama.cpp libmtmd, RANDOM weights; {m['cpu']} ({m['isa']}), {m['cores']} cores",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(result: dict, out: Path) -> None:
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))

"""The language model's ONNX graph two ways, same weights, side by side: torch.onnx export (`--decoder torch`) vs
the graph written on ONNX Runtime's fused kernels (`--decoder gqa`, export/gqa.py), fp32 and int4 (MatMulNBits,
the settings of `edgevlm quant`).

    python benchmarks/gqa_decoder.py [--llm qwen2-0.5b|demo] [--prompt 300] [--steps 32] [--reps 3] [--threads 1,2]

qwen2-0.5b: Qwen2-0.5B's shape (24 x 896, GQA 14/2, MLP 4864, vocabulary 151936, tied), RANDOM weights — only
speed is meant; demo: the embedded demo's language model (6 x 128). For each graph: prefill of --prompt positions
from an empty cache (the LLM part of a cold TTFT), then --steps single-token decode steps after it; repetitions
interleave the graphs (the machine is shared: read the ratios). Every graph runs through edgevlm's own session
settings (edgevlm.backends.onnx.OnnxGraph). Also checks that both graphs give the same logits. Writes JSON, a
markdown table and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
LLMS = {"qwen2-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                           intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768,
                           tie_word_embeddings=True, rope_theta=1000000.0)}


def language_model(llm: str):
    """-> (decoder body, lm_head, text config) in fp32, random for a named shape, else the demo's."""
    import torch

    if llm == "demo":
        from transformers import AutoModelForImageTextToText

        import edgevlm.export
        ckpt = Path(edgevlm.export.__file__).parent / "checkpoints" / "shapes-fastvlm"
        m = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
        return m.model.language_model, m.lm_head, m.config.text_config
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    m = Qwen2ForCausalLM(Qwen2Config(**LLMS[llm])).eval()
    return m.model, m.lm_head, m.config


def build(work: Path, llm: str) -> dict[str, Path]:
    """The four graphs (cached under work/): torch and gqa, each fp32 and int4."""
    import onnx
    import torch

    from edgevlm.export import gqa, graphs
    from edgevlm.quant.graphs import Options, quantize, weight_nodes

    paths = {f"{how}-{p}": work / f"{how}-{p}" / "decoder.onnx" for how in ("torch", "gqa") for p in ("fp32", "int4")}
    if all(p.exists() for p in paths.values()):
        return paths
    body, head, cfg = language_model(llm)
    for how in ("torch", "gqa"):
        fp32, int4 = paths[f"{how}-fp32"], paths[f"{how}-int4"]
        if not fp32.exists():
            fp32.parent.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            with torch.no_grad():
                if how == "gqa":
                    gqa.export_decoder(body, head, cfg, fp32)
                else:
                    graphs.export_decoder(body, graphs.LastLogits(head), cfg, fp32)
            print(f"{how} fp32 graph written in {time.perf_counter() - t:.0f} s", flush=True)
        if not int4.exists():
            model = onnx.load(str(fp32))
            levels = {n.name: "int4" for n in weight_nodes(model) if n.op == "MatMul"}
            q = quantize(model, levels, Options())
            int4.parent.mkdir(parents=True, exist_ok=True)
            big = q.ByteSize() > graphs.INLINE_LIMIT
            onnx.save(q, str(int4), save_as_external_data=big, all_tensors_to_one_file=True,
                      location="decoder.onnx.data")
            del model, q
    return paths


def _kv_names(graph):
    return [n for n in graph.input_names if n.startswith("past_key_values.")]


def _feeds(graph, embeds, kv):
    past = kv[0].shape[2]
    s = embeds.shape[1]
    feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, past + s), np.int64),
             "position_ids": np.arange(past, past + s, dtype=np.int64)[None]}
    feeds.update(zip(_kv_names(graph), kv))
    return feeds


def run_once(graph, embeds: np.ndarray, steps: int, dim: int) -> dict:
    """Prefill embeds [1, P, D] from an empty cache, then `steps` one-token steps -> timings and first logits."""
    heads_dim = graph.session.get_inputs()[3].shape  # [1, kv_heads, past, head_dim]
    empty = np.zeros((1, heads_dim[1], 0, heads_dim[3]), np.float32)
    kv = [empty] * len(_kv_names(graph))
    t = time.perf_counter()
    out = graph.run(_feeds(graph, embeds, kv))
    prefill = time.perf_counter() - t
    logits = out["logits"][0, -1]
    kv = [out[n.replace("past_key_values.", "present.")] for n in _kv_names(graph)]
    rng = np.random.default_rng(1)
    step_s = []
    for _ in range(steps):
        x = rng.normal(0, 0.02, (1, 1, dim)).astype(np.float32)
        t = time.perf_counter()
        out = graph.run(_feeds(graph, x, kv))
        step_s.append(time.perf_counter() - t)
        kv = [out[n.replace("past_key_values.", "present.")] for n in _kv_names(graph)]
    return {"prefill_s": prefill, "step_s_median": statistics.median(step_s), "logits": logits}


def measure(paths: dict[str, Path], prompt: int, steps: int, reps: int, threads: list[int]) -> dict:
    from edgevlm.backends.onnx import OnnxGraph

    result = {"threads": {}}
    for th in threads:
        graphs = {name: OnnxGraph(name, str(p), threads=th) for name, p in paths.items()}
        dim = graphs["gqa-fp32"].session.get_inputs()[0].shape[2]
        embeds = np.random.default_rng(0).normal(0, 0.02, (1, prompt, dim)).astype(np.float32)
        runs: dict[str, list] = {n: [] for n in graphs}
        for _ in range(reps):
            for name, g in graphs.items():
                runs[name].append(run_once(g, embeds, steps, dim))
        row = {}
        for name, rs in runs.items():
            row[name] = {"prefill_ms": 1000 * statistics.median(r["prefill_s"] for r in rs),
                         "decode_ms_per_token": 1000 * statistics.median(r["step_s_median"] for r in rs)}
            row[name]["decode_tokens_per_s"] = 1000 / row[name]["decode_ms_per_token"]
        for p in ("fp32", "int4"):
            a, b = row[f"torch-{p}"], row[f"gqa-{p}"]
            row[f"ratio_{p}"] = {"prefill_gqa_over_torch": b["prefill_ms"] / a["prefill_ms"],
                                 "decode_speedup_gqa_over_torch": a["decode_ms_per_token"] / b["decode_ms_per_token"]}
            la, lb = runs[f"torch-{p}"][0]["logits"], runs[f"gqa-{p}"][0]["logits"]
            row[f"ratio_{p}"]["logits_max_abs_diff"] = float(np.abs(la - lb).max())
            row[f"ratio_{p}"]["same_argmax"] = bool(la.argmax() == lb.argmax())
        result["threads"][str(th)] = row
        del graphs
    return result


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"Language model: {result['llm']} ({result['weights']}); prefill of {result['prompt']} positions from "
             f"an empty cache, then {result['steps']} decode steps; median of {result['reps']} interleaved "
             f"repetitions; 1-minute load average {result['loadavg']}.", "",
             "| threads | graph | prefill ms | decode ms/token | tokens/s |", "|---|---|---|---|---|"]
    for th, row in result["threads"].items():
        for name in ("torch-fp32", "gqa-fp32", "torch-int4", "gqa-int4"):
            r = row[name]
            lines.append(f"| {th} | {name} | {r['prefill_ms']:.1f} | {r['decode_ms_per_token']:.2f} | "
                         f"{r['decode_tokens_per_s']:.1f} |")
    lines += ["", "| threads | precision | prefill gqa / torch | decode speed-up gqa over torch | logits max abs diff "
              "| same argmax |", "|---|---|---|---|---|---|"]
    for th, row in result["threads"].items():
        for p in ("fp32", "int4"):
            r = row[f"ratio_{p}"]
            lines.append(f"| {th} | {p} | {r['prefill_gqa_over_torch']:.2f}x | {r['decode_speedup_gqa_over_torch']:.2f}x"
                         f" | {r['logits_max_abs_diff']:.3g} | {r['same_argmax']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = ["torch-fp32", "gqa-fp32", "torch-int4", "gqa-int4"]
    width = 0.8 / len(result["threads"])
    for k, (th, row) in enumerate(result["threads"].items()):
        xs = np.arange(len(names)) + k * width
        axes[0].bar(xs, [row[n]["prefill_ms"] for n in names], width, label=f"{th} thread(s)")
        axes[1].bar(xs, [row[n]["decode_tokens_per_s"] for n in names], width, label=f"{th} thread(s)")
    for ax, title in zip(axes, (f"prefill of {result['prompt']} positions (ms, lower is better)",
                                "decode (tokens/s, higher is better)")):
        ax.set_xticks(np.arange(len(names)) + width * (len(result["threads"]) - 1) / 2, names, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"decoder graph: torch.onnx vs GroupQueryAttention — {result['llm']}, {result['weights']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llm", choices=[*LLMS, "demo"], default="qwen2-0.5b")
    p.add_argument("--prompt", type=int, default=300, help="prefill positions (default 300: FastVLM at 1024 px)")
    p.add_argument("--steps", type=int, default=32, help="decode steps after the prefill")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    p.add_argument("--work", type=Path, default=HERE / ".cache" / "gqa_decoder", help="graph cache (gitignored)")
    p.add_argument("--out", type=Path, default=None, help="results path without suffix")
    args = p.parse_args()
    paths = build(args.work / args.llm, args.llm)
    result = {"llm": args.llm, "weights": "random weights" if args.llm != "demo" else "the trained demo",
              "prompt": args.prompt, "steps": args.steps, "reps": args.reps}
    result.update(measure(paths, args.prompt, args.steps, args.reps, [int(t) for t in args.threads.split(",")]))
    result["loadavg"] = round(os.getloadavg()[0], 2)
    out = args.out or HERE / "results" / f"gqa_decoder_{args.llm.replace('.', 'p')}"
    write(result, out)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

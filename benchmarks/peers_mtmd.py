"""edgevlm against llama.cpp's multimodal library (libmtmd), end to end, on the same checkpoint, image and prompt.

    python benchmarks/peers_mtmd.py [--models smolvlm,llava] [--classes fp32,int8,int4] [--threads 1,2]
                                    [--reps 3] [--decode-tokens 32] [--sdist llama_cpp_python-X.tar.gz]
                                    [--out benchmarks/results/peers_mtmd]

Models (RANDOM weights at real widths, built from the published text files; benchmarks/peers_mtmd_build.py):
SmolVLM-256M-Instruct at full depth, and LLaVA-1.5-7B's CLIP-L/336 tower at full depth with its 4096-wide
language model cut to a few layers. Each checkpoint is exported with `edgevlm export` and quantized with
`quantize_bundle`, and converted with llama.cpp's own converter from the llama-cpp-python sdist (text GGUF +
mmproj; llama_model_quantize for Q8_0 / Q4_K_M). Precision classes: our fp32 vs llama.cpp F32 text with an
F32 or F16 mmproj; our int8 (language model int8 dynamic; vision int8-static, or int8 dynamic: `int8-vdyn`) vs
Q8_0 text; our int4 (MatMulNBits) vs Q4_K_M text. llama.cpp runs through llama-cpp-python's bindings of libmtmd
(`llama_cpp.mtmd_cpp`: bitmap from the image file, mtmd_tokenize, mtmd_encode_chunk,
mtmd_helper_decode_image_chunk) and its low-level API (llama_decode, the greedy sampler), reusing the KV cache
of the previous prompt for the common prefix as llama-server does.

Every measurement is a session in a fresh process (benchmarks/peers_mtmd_run.py: load, an untimed warm-up
turn, a cold turn on a new image, a warm turn with the same image and a new question, decode). Sessions of all
systems of a class take turns, rep by rep (the order rotating), at each thread count, so both sides of a ratio
come from the same minutes. Ratios: median of ours / median of llama.cpp's, against llama.cpp's fastest
variant in the class. The first-token logits and prompt tokens of the two runtimes are compared on the same
image. Writes JSON, a markdown table and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers_mtmd_build as build  # noqa: E402

PROMPT = "What is in the image?"
QUESTION = "What colour is the largest shape?"
GOALS = {"cold_ttft_vs_mtmd": 0.33, "decode_vs_mtmd": 1.3, "warm_over_our_cold": 0.05}
IMAGE_SIZE = {"smolvlm": (640, 480), "llava": (672, 672)}  # LLaVA: square (llava-hf crops, llama.cpp pads)
# per class: our bundles, llama.cpp's (text GGUF, mmproj) pairs
CLASSES = {
    "fp32": (("fp32",), (("F32", "F32"), ("F32", "F16"))),
    "int8": (("int8", "int8-vdyn"), (("Q8_0", "Q8_0"), ("Q8_0", "F16"))),
    "int4": (("int4",), (("Q4_K_M", "Q8_0"), ("Q4_K_M", "F16"))),
}


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def log(msg: str) -> None:
    print(f"[peers_mtmd] {msg}", file=sys.stderr, flush=True)


# ---- the machine -------------------------------------------------------------------------------------------


def machine() -> dict:
    from edgevlm import cpu

    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import llama_cpp
    import onnxruntime

    flags = sorted(f for f in cpu._linux_flags() if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni",
                                                          "avx512_bf16", "amx_int8"))
    return {"cpu": name, "isa": cpu.isa(), "flags": flags, "cores": os.cpu_count(), "machine": platform.machine(),
            "onnxruntime": onnxruntime.__version__, "llama_cpp_python": llama_cpp.__version__}


# ---- inputs ------------------------------------------------------------------------------------------------


def images(work: Path, model: str, n: int) -> list[Path]:
    """PNG files (lossless: both runtimes decode the same pixels): [warm-up, cold 0, cold 1, ...]."""
    from edgevlm.export.parity import probe_image

    d = work / "images"
    d.mkdir(parents=True, exist_ok=True)
    w, h = IMAGE_SIZE[model]
    out = []
    for i in range(n + 1):
        p = d / f"{model}-{w}x{h}-{i}.png"
        if not p.exists():
            probe_image(w, h, seed=100 + i).save(p)
        out.append(p)
    return out


def systems(built: dict, model: str, cls: str) -> dict[str, dict]:
    """The systems of a class: name -> the session spec's runtime part."""
    ours, theirs = CLASSES[cls]
    out = {}
    for p in ours:
        out[f"edgevlm {p}"] = {"runtime": "edgevlm", "bundle": str(built["onnx"][p])}
    m = json.loads((Path(built["onnx"]["fp32"]) / "manifest.json").read_text())  # the orchestrator stays small
    for text, mm in theirs:
        if f"mmproj-{mm}" in built["gguf"]:
            out[f"llama.cpp {text} + mmproj {mm}"] = {
                "runtime": "llama.cpp", "text": str(built["gguf"][f"text-{text}"]),
                "mmproj": str(built["gguf"][f"mmproj-{mm}"]), "chat_template": m["chat_template"],
                "special_tokens": m.get("special_tokens", {}), "image_token": m["image_token"]}
    return out


def disk_bytes(spec: dict) -> int:
    if spec["runtime"] == "edgevlm":
        return sum(f.stat().st_size for f in Path(spec["bundle"]).rglob("*") if f.is_file())
    return os.path.getsize(spec["text"]) + os.path.getsize(spec["mmproj"])


# ---- sessions ------------------------------------------------------------------------------------------------


def session(spec: dict) -> dict:
    p = subprocess.run([sys.executable, str(HERE / "peers_mtmd_run.py"), json.dumps(spec)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise RuntimeError(f"session {spec['runtime']} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def measure(built: dict, model: str, cls: str, threads: int, reps: int, n_decode: int, work: Path) -> dict:
    """All systems of a class at one thread count, `reps` rounds, the order rotating each round."""
    sy = systems(built, model, cls)
    names = list(sy)
    imgs = images(work, model, reps)
    runs: dict[str, list] = {k: [] for k in names}
    loads = []
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            spec = {**sy[name], "threads": threads, "warmup_image": str(imgs[0]), "image": str(imgs[1 + rep]),
                    "prompt": PROMPT, "question": QUESTION, "decode_tokens": n_decode, "logits_out": None}
            if rep == 0:
                spec["logits_out"] = str(work / "logits" / f"{model}-{cls}-{threads}t-{name.replace(' ', '_')}.npy")
                Path(spec["logits_out"]).parent.mkdir(parents=True, exist_ok=True)
            loads.append(os.getloadavg()[0])
            r = session(spec)
            r["load_avg"] = loads[-1]
            runs[name].append(r)
            log(f"{model} {cls} {threads}t rep {rep} {name}: cold {r['cold']['ttft_s']:.2f} s ("
                + ", ".join(f"{k} {v:.2f}" for k, v in r["cold"]["stages"].items())
                + f"), warm {r['warm']['ttft_s']:.3f} s, decode {r['decode']['tps']:.1f} tok/s, "
                f"peak {r['peak_rss'] / 1e6:.0f} MB, load {loads[-1]:.1f}")
    return {"systems": {k: summarize(runs[k], sy[k]) for k in names}, "runs": runs, "load_avg": loads}


def summarize(runs: list[dict], spec: dict) -> dict:
    def stage(kind, s):
        return med([r[kind]["stages"].get(s, 0.0) for r in runs])

    return {"cold_ttft_s": med([r["cold"]["ttft_s"] for r in runs]),
            "cold_runs": [r["cold"]["ttft_s"] for r in runs],
            "cold_stages_s": {s: stage("cold", s) for s in runs[0]["cold"]["stages"]},
            "warm_ttft_s": med([r["warm"]["ttft_s"] for r in runs]),
            "warm_stages_s": {s: stage("warm", s) for s in runs[0]["warm"]["stages"]},
            "warm_prefilled_tokens": runs[0]["warm"]["prefilled_tokens"],
            "decode_tps": med([r["decode"]["tps"] for r in runs]),
            "decode_runs": [r["decode"]["tps"] for r in runs],
            "decode_context": runs[0]["decode"]["context"],
            "prompt_tokens": runs[0]["cold"]["prompt_tokens"],
            "peak_rss_bytes": med([r["peak_rss"] for r in runs]), "rss_after_load_bytes": med([r["rss_after_load"] for r in runs]),
            "load_s": med([r["load_s"] for r in runs]), "disk_bytes": disk_bytes(spec),
            "greedy": [r["decode"]["first_tokens"] for r in runs]}


# ---- agreement -----------------------------------------------------------------------------------------------


def agreement(row: dict, model: str, cls: str, threads: int, work: Path) -> dict:
    """Per llama.cpp system vs per edgevlm system, on the first round's image: prompt token ids (image rows as
    -1), first-token logits (Pearson correlation, max |diff|, top-5), greedy tokens after the warm prompt; and
    whether two images give two different answers (the image decides)."""
    out = {}
    names = list(row["systems"])
    for a in (n for n in names if n.startswith("edgevlm")):
        for b in (n for n in names if n.startswith("llama.cpp")):
            la = np.load(work / "logits" / f"{model}-{cls}-{threads}t-{a.replace(' ', '_')}.npy").astype(np.float64)
            lb = np.load(work / "logits" / f"{model}-{cls}-{threads}t-{b.replace(' ', '_')}.npy").astype(np.float64)
            ids_a, ids_b = row["runs"][a][0]["prompt_ids"], row["runs"][b][0]["prompt_ids"]
            first = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), None)
            top_a, top_b = np.argsort(-la)[:5], np.argsort(-lb)[:5]
            ga, gb = row["systems"][a]["greedy"][0], row["systems"][b]["greedy"][0]
            out[f"{a} | {b}"] = {
                "prompt_tokens": [len(ids_a), len(ids_b)], "prompt_ids_identical": ids_a == ids_b,
                "first_difference": first, "logits_corr": float(np.corrcoef(la, lb)[0, 1]),
                "logits_max_abs_diff": float(np.abs(la - lb).max()), "logits_max_abs": float(np.abs(la).max()),
                "top5_same_set": set(top_a.tolist()) == set(top_b.tolist()), "top1_same": int(top_a[0]) == int(top_b[0]),
                "greedy_agree": sum(1 for x, y in zip(ga, gb) if x == y) if ga[:1] == gb[:1] else 0,
                "greedy_len": min(len(ga), len(gb))}
    for n in names:
        g = row["systems"][n]["greedy"]
        row["systems"][n]["image_decides"] = len(g) < 2 or g[0] != g[1]
    return out


# ---- the run -------------------------------------------------------------------------------------------------


def goals(result: dict) -> dict:
    """Per model, class and thread count: our best system vs llama.cpp's best, and whether each goal is met."""
    out = {}
    for model, per in result["models"].items():
        for key, row in per["rows"].items():
            sy = row["systems"]
            ours = {k: v for k, v in sy.items() if k.startswith("edgevlm")}
            theirs = {k: v for k, v in sy.items() if k.startswith("llama.cpp")}
            o = min(ours, key=lambda k: ours[k]["cold_ttft_s"])
            t = min(theirs, key=lambda k: theirs[k]["cold_ttft_s"])
            od = max(ours, key=lambda k: ours[k]["decode_tps"])
            td = max(theirs, key=lambda k: theirs[k]["decode_tps"])
            tw = min(theirs, key=lambda k: theirs[k]["warm_ttft_s"])
            g = {"ours": o, "theirs": t, "cold_ratio": ours[o]["cold_ttft_s"] / theirs[t]["cold_ttft_s"],
                 "decode_ours": od, "decode_theirs": td, "decode_ratio": ours[od]["decode_tps"] / theirs[td]["decode_tps"],
                 "warm_over_our_cold": ours[o]["warm_ttft_s"] / ours[o]["cold_ttft_s"],
                 "warm_ours_s": ours[o]["warm_ttft_s"], "warm_theirs_s": theirs[tw]["warm_ttft_s"], "warm_theirs": tw}
            g["met"] = {"cold_ttft_vs_mtmd": g["cold_ratio"] <= GOALS["cold_ttft_vs_mtmd"],
                        "decode_vs_mtmd": g["decode_ratio"] >= GOALS["decode_vs_mtmd"],
                        "warm": g["warm_over_our_cold"] <= GOALS["warm_over_our_cold"]
                        and g["warm_ours_s"] < g["warm_theirs_s"]}
            out[f"{model} {key}"] = g
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=HERE / ".cache" / "peers_mtmd")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "peers_mtmd")
    ap.add_argument("--models", default=",".join(build.MODELS))
    ap.add_argument("--classes", default=",".join(CLASSES))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--sdist", type=Path, help="llama-cpp-python's sdist (default: pip download it)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    built = build.build(args.work, args.models.split(","), args.sdist)
    t1 = time.perf_counter()
    result = {"machine": machine(), "goals": GOALS, "reps": args.reps, "decode_tokens": args.decode_tokens,
              "prompt": PROMPT, "question": QUESTION, "load_avg": {"start": os.getloadavg()[0]}, "models": {}}
    for model in args.models.split(","):
        per = {"image_size": IMAGE_SIZE[model], "rows": {}, "agreement": {}}
        result["models"][model] = per
        for cls in args.classes.split(","):
            for threads in (int(t) for t in args.threads.split(",")):
                key = f"{cls} {threads}t"
                row = measure(built[model], model, cls, threads, args.reps, args.decode_tokens, args.work)
                per["agreement"][key] = agreement(row, model, cls, threads, args.work)
                for runs in row["runs"].values():
                    for r in runs:
                        r.pop("prompt_ids", None)
                per["rows"][key] = row
                write(result, args.out)  # kept as it grows
    result["load_avg"]["end"] = os.getloadavg()[0]
    result["seconds"] = {"build": round(t1 - t0, 1), "measure": round(time.perf_counter() - t1, 1)}
    result["goals_measured"] = goals(result)
    write(result, args.out)
    print(args.out.with_suffix(".md").read_text())


def write(result: dict, out: Path) -> None:
    import peers_mtmd_report

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    if "goals_measured" in result:
        peers_mtmd_report.write(result, out)


if __name__ == "__main__":
    main()

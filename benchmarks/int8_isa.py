"""Demo accuracy of every int8 scheme, on this CPU and on an emulated x86 CPU without VNNI (AVX2 only).

    python benchmarks/int8_isa.py [--n 1000] [--n-full 300] [--seed 31337] [--out benchmarks/results/int8_isa]

Quantizes the embedded demo bundle with `edgevlm quant`'s own function: int8, int8-static and the searched mix
with 7-bit weights (`--int8-range portable`, the default) and int8 / int8-static with 8-bit ones (`full`), then
answers the same held-out questions of a seed no search saw with each, greedy, once on this machine's CPU and
once under `qemu-x86_64 -cpu Haswell` (Debian's qemu-user: AVX2, no AVX-512, no VNNI -- the int8 kernels
onnxruntime picks there are the ones an AVX2-only laptop runs; emulation is ~150x slower, so only accuracy is
read there, never time). Results: <out>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {  # label -> (scheme, int8 range)
    "int8 (dynamic)": ("int8", "portable"),
    "int8-static (QDQ)": ("int8-static", "portable"),
    "mixed (budget 0.99)": ("mixed", "portable"),
    "int8 (dynamic), full range": ("int8", "full"),
    "int8-static (QDQ), full range": ("int8-static", "full"),
}


def worker(bundle: str, seed: int, n: int) -> None:
    """Print this CPU's ISA and the bundle's accuracy as one JSON line (run natively or under qemu)."""
    import edgevlm
    from edgevlm.cpu import isa
    from edgevlm.evaluate import evaluate

    vlm = edgevlm.load(bundle or None, threads=1)
    r = evaluate(vlm, "shapes", seed, n)
    print(json.dumps({"isa": isa(), "accuracy": r["accuracy"], "n": n, "per_type": r["per_type"]}))


def build(work: Path) -> dict[str, Path]:
    from edgevlm.model import DEFAULT_BUNDLE
    from edgevlm.quant import Options, quantize_bundle

    paths = {"fp32": DEFAULT_BUNDLE}
    for label, (scheme, rng) in VARIANTS.items():
        t = time.time()
        dst = work / f"{scheme}-{rng}"
        quantize_bundle(DEFAULT_BUNDLE, dst, scheme, opts=Options(int8_range=rng), dataset="shapes",
                        overwrite=True)
        print(f"built {label} in {time.time() - t:.0f} s", file=sys.stderr)
        paths[label] = dst
    return paths


def run(bundle: Path, seed: int, n: int, emulate: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(bundle), str(seed), str(n)]
    if emulate:
        cmd = [shutil.which("qemu-x86_64"), "-cpu", "Haswell"] + cmd
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"{bundle.name} {'emulated' if emulate else 'native'} {out['isa']}: {out['accuracy']:.4f} "
          f"({time.time() - t:.0f} s)", file=sys.stderr)
    return out


def write(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    isas = result["isas"]
    lines = ["# int8 on CPUs with and without VNNI (demo bundle)\n", result["note"] + "\n",
             "| bundle | int8 weights | " + " | ".join(f"accuracy, {i} | vs fp32" for i in isas) + " |",
             "|---|---|" + "---|---|" * len(isas)]
    def ratio(r, i):  # against fp32 on the same questions (the first n of the seed)
        a = r["accuracy"][i]
        return a["accuracy"] / result["fp32"][i][str(a["n"])]

    for r in result["rows"]:
        cells = [f"{r['accuracy'][i]['accuracy']:.4f} (n={r['accuracy'][i]['n']}) | {ratio(r, i):.3f}" for i in isas]
        lines.append(f"| {r['label']} | {r['range']} | " + " | ".join(cells) + " |")
    portable = [r for r in result["rows"] if r["range"] == "portable"]
    worst = min(ratio(r, i) for r in portable for i in isas)
    lines.append(f"\nGoal (every int8 scheme with portable weights keeps >= 0.99 x fp32 accuracy on every ISA): "
                 f"**{'met' if worst >= 0.99 else 'not met'}** (worst {worst:.4f}).")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(isas)
    for k, i in enumerate(isas):
        ax.bar([j + k * width for j in range(len(result["rows"]))],
               [r["accuracy"][i]["accuracy"] for r in result["rows"]], width, label=i)
    ax.set_xticks([j + width * (len(isas) - 1) / 2 for j in range(len(result["rows"]))])
    ax.set_xticklabels([r["label"].replace(", full range", "\nfull range") for r in result["rows"]], fontsize=7)
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("demo accuracy per int8 scheme, with and without VNNI", fontsize=10)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="questions per bundle and CPU (1000)")
    p.add_argument("--n-full", type=int, default=300, help="questions for the full-range bundles (300)")
    p.add_argument("--seed", type=int, default=31_337, help="held-out seed no search saw (31337)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8_isa")
    args = p.parse_args(argv)
    from edgevlm.cpu import isa

    if platform.machine() != "x86_64" or not shutil.which("qemu-x86_64"):
        raise SystemExit("needs an x86_64 host with qemu-x86_64 (Debian: apt-get install qemu-user)")
    host = isa()
    isas = [host] + (["AVX2 (emulated)"] if host != "AVX2" else [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="int8-isa-") as tmp:
        paths = build(Path(tmp))
        for label, path in paths.items():
            rng = VARIANTS.get(label, ("fp32", "-"))[1]
            n = args.n_full if rng == "full" else args.n
            acc = {host: run(path, args.seed, n, emulate=False)}
            if len(isas) > 1:
                acc[isas[1]] = run(path, args.seed, n, emulate=True)
                assert acc[isas[1]]["isa"] == "AVX2"
            rows.append({"label": label, "range": rng, "accuracy": acc})
        fp32 = {i: {str(args.n): rows[0]["accuracy"][i]["accuracy"]} for i in isas}
        if args.n_full != args.n:  # fp32 on the full-range rows' questions too
            for k, i in enumerate(isas):
                fp32[i][str(args.n_full)] = run(paths["fp32"], args.seed, args.n_full, emulate=k > 0)["accuracy"]
    result = {"seed": args.seed, "isas": isas, "rows": rows, "fp32": fp32, "machine": platform.platform(), "host_isa": host,
              "note": f"Embedded demo bundle and its quantized copies (`edgevlm quant`), greedy exact match on "
                      f"held-out questions of seed {args.seed} (no calibration or search saw it); host CPU "
                      f"{platform.machine()} with ISA {host}; `AVX2 (emulated)`: the same bundles under "
                      f"`qemu-x86_64 -cpu Haswell` (AVX2, no AVX-512/VNNI), 1 thread. Date "
                      f"{time.strftime('%Y-%m-%d')}."}
    write(result, args.out)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

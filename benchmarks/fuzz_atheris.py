"""Coverage-guided fuzzing (atheris / libFuzzer) of edgevlm's byte-level parsers of untrusted input:
manifest.json bytes, disk-cache entry files, image files and chat-template sources.

    pip install -e ".[fuzz]"
    python benchmarks/fuzz_atheris.py [--runs 100000] [--seed 20261122] [--targets manifest,cache,image,template] \
        [--out benchmarks/results/fuzz_atheris]

Each target runs in its own child process (`--child TARGET`), seeded, for --runs inputs, starting from the
valid files of tests/corpus (the demo manifest, a cache entry, the seed images, the demo template). An input
must end parsed or in an edgevlm error (for cache entries: a rejected entry); any other exception or a
crash stops libFuzzer and is recorded with the input that caused it. Results: <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("manifest", "cache", "image", "template")


def seeds(target: str) -> list[bytes]:
    sys.path.insert(0, str(ROOT / "tests" / "corpus"))
    import make_images

    from edgevlm.model import DEFAULT_BUNDLE

    manifest = (DEFAULT_BUNDLE / "manifest.json").read_bytes()
    if target == "manifest":
        return [manifest]
    if target == "image":
        return list(make_images.seeds().values())
    if target == "template":
        import fuzz_targets

        return [json.loads(manifest)["chat_template"].encode()] + [t.encode() for t in fuzz_targets.INJECTIONS[:8]]
    import numpy as np

    from edgevlm.diskcache import encode_entry

    return [encode_entry("ab" * 32, "prefix", "kv-" + "0" * 64, {"keys": [1, 2, 3]},
                         {"k.0": np.zeros((1, 2, 3, 4), np.float32), "v.0": np.ones((1, 2, 3, 4), np.float32)})]


def child(target: str, runs: int, seed: int, counts_path: str) -> None:
    import atheris

    with atheris.instrument_imports():
        import edgevlm.bundle
        import edgevlm.diskcache
        import edgevlm.image
        import edgevlm.manifest
        import edgevlm.template
    from edgevlm.errors import EdgeVLMError

    counts = collections.Counter()

    def save():
        Path(counts_path).write_text(json.dumps(counts))

    atexit.register(save)  # (libFuzzer may end the process without running it: also saved every 50 inputs)

    def one(data: bytes) -> None:
        if sum(counts.values()) % 50 == 0:
            save()
        try:
            if target == "manifest":
                edgevlm.bundle.read_manifest(data)
            elif target == "image":
                edgevlm.image.load_image(data)
            elif target == "template":
                edgevlm.template.render(data.decode("utf-8", "replace"), [{"role": "user", "content": "hi"}],
                                        bos_token="<s>")
            else:
                try:
                    edgevlm.diskcache.decode_entry(data, "ab" * 32, "prefix", "kv-" + "0" * 64)
                except edgevlm.diskcache.EntryError:
                    counts["EntryError"] += 1
                    return
            counts["ok"] += 1
        except EdgeVLMError as e:
            counts[type(e).__name__] += 1

    corpus = tempfile.mkdtemp(prefix=f"fuzz-{target}-")
    for i, blob in enumerate(seeds(target)):
        Path(corpus, f"seed{i}").write_bytes(blob)
    max_len = {"manifest": 16384, "image": 65536, "template": 4096, "cache": 4096}[target]
    atheris.Setup([sys.argv[0], f"-runs={runs}", f"-seed={seed}", f"-max_len={max_len}", "-rss_limit_mb=4096",
                   "-timeout=60", "-print_final_stats=1", corpus], one)
    atheris.Fuzz()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="manifest=40000,cache=30000,image=25000,template=15000",
                    help="inputs per target: N for all, or TARGET=N,... (default: 110,000 in all)")
    ap.add_argument("--seed", type=int, default=20261122)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz_atheris"))
    ap.add_argument("--child", choices=TARGETS, help=argparse.SUPPRESS)
    ap.add_argument("--counts", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, int(args.runs), args.seed, args.counts)
        return 0
    results, t0 = {}, time.perf_counter()
    runs = {t: int(args.runs) for t in TARGETS} if args.runs.isdigit() else \
        {k: int(v) for k, v in (x.split("=") for x in args.runs.split(","))}
    for target in args.targets.split(","):
        with tempfile.TemporaryDirectory() as work:
            counts = Path(work) / "counts.json"
            t = time.perf_counter()
            r = subprocess.run([sys.executable, __file__, "--child", target, "--runs", str(runs[target]),
                                "--seed", str(args.seed), "--counts", str(counts)],
                               capture_output=True, text=True, cwd=work)
            outcomes = json.loads(counts.read_text()) if counts.exists() else {}
            stats = dict(re.findall(r"^stat::(\w+):\s*(\S+)", r.stderr, re.M))
            finding = None if r.returncode == 0 else "\n".join(r.stderr.splitlines()[-25:])
            results[target] = {"runs": int(stats.get("number_of_executed_units", sum(outcomes.values()))),
                               "outcomes (sampled every 50 inputs)": outcomes, "exit_code": r.returncode,
                               "finding": finding, "seconds": round(time.perf_counter() - t, 1),
                               "libfuzzer": stats, "peak_rss_mb": stats.get("peak_rss_mb", "")}
            print(target, results[target]["runs"], outcomes, "exit", r.returncode, flush=True)
            if finding:
                print(finding, flush=True)
    total = sum(r["runs"] for r in results.values())
    summary = {"total_runs": total, "seed": args.seed, "runs_per_target": runs, "targets": results,
               "findings": {k: r["finding"] for k, r in results.items() if r["finding"]},
               "seconds": round(time.perf_counter() - t0, 1),
               "machine": {"python": platform.python_version(), "platform": platform.platform()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = ["# Coverage-guided fuzzing (atheris / libFuzzer, seeded)", "",
             f"`python benchmarks/fuzz_atheris.py --runs {args.runs} --seed {args.seed}`: {total} inputs in "
             f"{summary['seconds']:.0f} s on 2 shared cores, {len(summary['findings'])} findings "
             "(an exception that is not an edgevlm error, or a crash).", "",
             "| target | inputs | outcomes (up to the last 50) | corpus growth | peak RSS MB | exit | seconds |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        oc = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes (sampled every 50 inputs)"].items(),
                                                     key=lambda kv: -kv[1]))
        lines.append(f"| {name} | {r['runs']} | {oc} | {r['libfuzzer'].get('new_units_added', '')} new units | "
                     f"{r['peak_rss_mb']} | {r['exit_code']} | {r['seconds']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if not summary["findings"] else 1


if __name__ == "__main__":
    sys.exit(main())

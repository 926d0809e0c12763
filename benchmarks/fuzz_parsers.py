"""The dedicated parser-fuzzing run: >= 100,000 seeded hypothesis cases over the manifest (values, edits,
bytes), chat templates (random and injection templates, hostile message contents), disk-cache entries when
the cache module exists, and edited manifests through edgevlm.load + generate.

    python benchmarks/fuzz_parsers.py [--scale 1.0] [--seed 20261122] [--out benchmarks/results/fuzz_parsers]

Each case must end parsed or in an edgevlm error; anything else is a finding (hypothesis shrinks it and the
run records it). Results: <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "corpus"))
import fuzz_targets as ft  # noqa: E402


def load_and_generate(work: Path):
    import edgevlm
    from edgevlm.errors import EdgeVLMError

    example = ft.DEFAULT_BUNDLE.parent / "examples" / "shapes-1.png"
    b = work / "b"
    shutil.copytree(ft.DEFAULT_BUNDLE, b)

    def run(data) -> str:
        (b / "manifest.json").write_text(json.dumps(data))
        try:
            edgevlm.load(b, threads=1).generate(example, "What color is the star?", max_tokens=2)
            return "ok"
        except EdgeVLMError as e:
            return type(e).__name__
    return run


def campaigns(work: Path) -> dict:
    c = {  # name -> (strategies, target, cases)
        "manifest: any JSON value": ((ft.json_values,), ft.target_manifest_value, 20000),
        "manifest: edited demo manifest": ((ft.manifest_edits(),), ft.target_manifest_value, 25000),
        "manifest: bytes (flips, splices, nesting, random)": ((ft.manifest_bytes(),), ft.target_manifest_bytes, 20000),
        "template: random + injection templates": ((ft.templates(), ft.message_lists), ft.target_template, 25000),
        "template: demo template, hostile messages": ((ft.message_lists,), ft.target_demo_template, 10000),
        "load + generate: edited manifests": ((ft.manifest_edits(),), load_and_generate(work), 400),
    }
    def cache_entry(entry):
        return ft.target_cache_entry(*entry, work)

    c["cache: entry files (damaged, forged and re-signed)"] = ((ft.entry_files(),), cache_entry, 10000)
    return c


def run_campaign(strategies, target, n: int, s: int) -> dict:
    counts = collections.Counter()

    @seed(s)
    @settings(max_examples=n, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.tuples(*strategies))
    def case(args):
        counts[target(*args)] += 1

    t = time.perf_counter()
    finding = None
    try:
        case()
    except Exception as e:  # hypothesis re-raises the shrunk failing case
        finding = f"{type(e).__name__}: {str(e)[:500]}"
    return {"cases": sum(counts.values()), "outcomes": dict(counts.most_common()), "finding": finding,
            "seconds": round(time.perf_counter() - t, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every campaign's case count")
    ap.add_argument("--seed", type=int, default=20261122)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz_parsers"))
    ap.add_argument("--only", metavar="TEXT", help="rerun only the campaigns whose name contains TEXT, keeping the "
                                                    "other campaigns' figures from <out>.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    results = json.loads(out.with_suffix(".json").read_text())["campaigns"] if args.only else {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for name, (strategies, target, n) in campaigns(Path(work)).items():
            if args.only and args.only not in name:
                continue
            results[name] = r = run_campaign(strategies, target, max(1, int(n * args.scale)), args.seed)
            print(f"{name}: {r['cases']} cases in {r['seconds']} s, {r['outcomes']}"
                  + (f"  FINDING {r['finding']}" if r["finding"] else ""), flush=True)
    total = sum(r["cases"] for r in results.values())
    findings = {k: r["finding"] for k, r in results.items() if r["finding"]}
    summary = {"total_cases": total, "findings": findings, "seed": args.seed, "scale": args.scale, "campaigns": results,
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "seconds": round(sum(r["seconds"] for r in results.values()), 1),
               "machine": {"python": platform.python_version(), "platform": platform.platform()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = ["# Parser fuzzing (hypothesis, seeded)", "",
             f"`python benchmarks/fuzz_parsers.py --scale {args.scale} --seed {args.seed}`: {total} cases in {summary['seconds']:.0f} s "
             f"on 2 shared cores, {len(findings)} findings (a finding = an exception that is not an edgevlm error), "
             f"peak RSS {summary['peak_rss_mb']:.0f} MB.", "",
             "| campaign | cases | outcomes | findings | seconds |", "|---|---|---|---|---|"]
    for name, r in results.items():
        oc = ", ".join(f"{k} {v}" for k, v in r["outcomes"].items())
        lines.append(f"| {name} | {r['cases']} | {oc} | {'1' if r['finding'] else '0'} | {r['seconds']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if not findings else 1


if __name__ == "__main__":
    sys.exit(main())

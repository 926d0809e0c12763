"""Seeded byte-mutation fuzzing of image decoding: >= 10,000 mutated JPEG/PNG/WebP/GIF/BMP files through
edgevlm.image.load_image and the demo bundle's preprocessing, a sample of them through generate.

    python benchmarks/fuzz_images.py [--n 12000] [--seed 20261122] [--workers-batch 1000] \
        [--out benchmarks/results/fuzz_images]

Cases run in child processes, one batch each, so a crash in a native decoder (a signal) is seen and
counted, not lost with the run. Each case must end decoded (HxWx3 uint8) or in an ImageError; any other
exception type is a failure. Peak RSS is each child's own maximum (getrusage). A last child decodes a
legitimate image at the pixel cap (40 MP RGBA, the most memory a valid image can take) for the bound.
Results: <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import platform
import random
import re
import resource
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "corpus"))
import make_images  # noqa: E402


def _kind(msg: str) -> str:
    return re.sub(r"\d+", "N", msg.split(":")[0])[:70]


def run_batch(seed: int, start: int, stop: int, generate_every: int, q) -> None:
    import numpy as np

    import edgevlm
    from edgevlm.errors import EdgeVLMError, ImageError
    from edgevlm.image import load_image, preprocess

    vlm = edgevlm.load(threads=1)
    seeds = make_images.seeds()
    names = sorted(seeds)
    out = {"ok": 0, "image_error": 0, "other_edgevlm_error": 0, "failures": [], "kinds": collections.Counter(),
           "by_seed": collections.Counter(), "generated": 0, "slowest_s": 0.0, "slowest_case": None}
    for k in range(start, stop):
        rng = random.Random(seed * 1_000_003 + k)  # each case reproducible on its own
        name = names[k % len(names)]
        data = make_images.mutate(seeds[name], rng)
        t = time.perf_counter()
        try:
            a = load_image(data)
            assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3, a.shape
            preprocess(a, vlm.manifest.preprocess)
            out["ok"] += 1
            out["by_seed"][name + " ok"] += 1
            if out["ok"] % generate_every == 0:
                vlm.generate(data, "What color is the star?", max_tokens=1)
                out["generated"] += 1
        except ImageError as e:
            out["image_error"] += 1
            out["kinds"][_kind(str(e))] += 1
        except EdgeVLMError as e:
            out["other_edgevlm_error"] += 1
            out["failures"].append({"case": k, "seed_image": name, "error": f"{type(e).__name__}: {e}"[:300]})
        except Exception as e:  # the bar: nothing but edgevlm errors
            out["failures"].append({"case": k, "seed_image": name, "error": f"{type(e).__name__}: {e}"[:300],
                                    "where": traceback.format_exc().splitlines()[-3][:200]})
        if time.perf_counter() - t > out["slowest_s"]:
            out["slowest_s"], out["slowest_case"] = time.perf_counter() - t, [k, name, len(data)]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    q.put(out)


def at_the_cap(q) -> None:
    """A valid 8000 x 5000 RGBA PNG (40 MP, alpha composited): the largest image that is accepted."""
    import io

    import numpy as np
    from PIL import Image

    from edgevlm.image import MAX_PIXELS, load_image, preprocess
    from edgevlm.model import load

    vlm = load(threads=1)
    img = Image.new("RGBA", (8000, 5000), (10, 200, 30, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    del img
    data = buf.getvalue()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    a = load_image(data)
    pixels = preprocess(a, vlm.manifest.preprocess)
    q.put({"pixels": 8000 * 5000, "cap": MAX_PIXELS, "file_bytes": len(data), "seconds": time.perf_counter() - t,
           "rss_before_mb": base, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "shape": list(pixels.shape), "mean": float(np.mean(pixels))})


def child(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    try:
        result = q.get(timeout=3600)
    except Exception:
        result = None
    p.join()
    if p.exitcode != 0 or result is None:
        return {"crashed": True, "exitcode": p.exitcode}
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12000)
    ap.add_argument("--seed", type=int, default=20261122)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--generate-every", type=int, default=40, help="run generate on every Nth decoded mutant")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz_images"))
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    total = collections.Counter()
    kinds, by_seed, failures, crashes, rss, slowest = collections.Counter(), collections.Counter(), [], [], [], 0.0
    slowest_case = None
    for start in range(0, args.n, args.batch):
        stop = min(args.n, start + args.batch)
        r = child(run_batch, args.seed, start, stop, args.generate_every)
        if r.get("crashed"):
            crashes.append({"cases": [start, stop], "exitcode": r["exitcode"]})
            print(f"batch {start}-{stop}: CRASH (exit code {r['exitcode']})", flush=True)
            continue
        for key in ("ok", "image_error", "other_edgevlm_error", "generated"):
            total[key] += r[key]
        kinds.update(r["kinds"])
        by_seed.update(r["by_seed"])
        failures += r["failures"]
        rss.append(r["peak_rss_mb"])
        if r["slowest_s"] > slowest:
            slowest, slowest_case = r["slowest_s"], r["slowest_case"]
        print(f"batch {start}-{stop}: ok {r['ok']} image errors {r['image_error']} failures {len(r['failures'])} "
              f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    cap = child(at_the_cap)
    seconds = time.perf_counter() - t0
    result = {
        "cases": args.n, "seed": args.seed, "seed_images": sorted(make_images.seeds()),
        "decoded": total["ok"], "image_errors": total["image_error"], "generate_runs": total["generated"],
        "other_edgevlm_errors": total["other_edgevlm_error"], "non_edgevlm_exceptions": len(failures) - total["other_edgevlm_error"],
        "crashes": len(crashes), "failures": failures[:50], "crash_batches": crashes,
        "peak_rss_mb_max_over_batches": round(max(rss, default=0), 1), "slowest_case_s": round(slowest, 3), "slowest_case": slowest_case,
        "error_kinds": dict(kinds.most_common(25)), "decoded_by_seed": dict(sorted(by_seed.items())),
        "at_the_pixel_cap": cap, "seconds": round(seconds, 1),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Image mutation fuzzing", "",
        f"`python benchmarks/fuzz_images.py --n {args.n} --seed {args.seed}` ({seconds:.0f} s on 2 shared cores)", "",
        "| cases | decoded | ImageError | other edgevlm errors | other exceptions | crashes | generate runs | peak RSS (max over batches) | slowest case |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {args.n} | {total['ok']} | {total['image_error']} | {total['other_edgevlm_error']} | "
        f"{result['non_edgevlm_exceptions']} | {len(crashes)} | {total['generated']} | "
        f"{result['peak_rss_mb_max_over_batches']:.0f} MB | {slowest * 1000:.0f} ms |", "",
        f"Seed images: {', '.join(result['seed_images'])} (tests/corpus/make_images.py `seeds()`), mutated by `mutate()`.",
        "",
        "At the pixel cap (a valid 8000 x 5000 RGBA PNG, decoded, composited and preprocessed): "
        + ("crashed" if cap.get("crashed") else
           f"peak RSS {cap['peak_rss_mb']:.0f} MB (process before decoding: {cap['rss_before_mb']:.0f} MB), "
           f"{cap['seconds']:.1f} s."), "",
        "Most frequent ImageError messages (digits as N):", "",
        "| message | count |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in kinds.most_common(12)],
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if not failures and not crashes else 1


if __name__ == "__main__":
    sys.exit(main())

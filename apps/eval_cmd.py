"""`edgevlm eval --bundle B --dataset shapes --seed S --n N [--json]`: exact-match accuracy, greedy.
`edgevlm eval --bundle B --dataset rows.jsonl [--engine local|ray] [--output preds.jsonl]`: a labelled file of
(image, question, answer) rows, exact and normalised match, on `edgevlm batch`'s engines (apps/eval_file.py)."""

from __future__ import annotations

import argparse
import json
import sys

from edgevlm.errors import ArgumentError

from .batch_cmd import add_engine_args
from .common import one_line_errors


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgevlm eval", description=(
        "Measure a bundle's accuracy (greedy) on the procedural held-out set (`shapes`: exact match after "
        "normalisation, overall and per question type) or on a file of rows {image, question, answer} (.jsonl, "
        ".csv, .parquet; MMStar / Tiny LVLM-eHub style: exact and normalised match, per `category` if rows have "
        "one), answered by a local process pool or Ray Data. Without --bundle the embedded demo is evaluated."))
    p.add_argument("--bundle", metavar="B", help="bundle directory (default: the embedded demo)")
    p.add_argument("--dataset", default="shapes", metavar="shapes|FILE", help=(
        "shapes: the procedural held-out scenes the demo model was trained on (default); or a JSONL / CSV / Parquet "
        "file of {image, question, answer} rows (MMStar / Tiny LVLM-eHub style)"))
    p.add_argument("--seed", type=int, default=None, help="dataset seed (default: the project's test seed)")
    p.add_argument("--n", type=int, default=500, help="number of questions (default 500)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--max-image-tokens", type=int, default=None, metavar="K",
                   help="image-token budget per image (default: the bundle's, else all rows)")
    f = p.add_argument_group("a dataset file")
    f.add_argument("--output", metavar="OUT", help="per-row predictions (.jsonl or .parquet); a rerun resumes")
    f.add_argument("--max-tokens", type=int, default=24, metavar="N", help="answer length cap (default 24)")
    add_engine_args(p)
    return p


@one_line_errors
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.dataset != "shapes":
        return _eval_file(args)
    if args.engine != "local" or args.workers or args.ray_address or args.output:
        raise ArgumentError("--engine, --workers, --ray-address and --output are for --dataset FILE; "
                            "the shapes set is scored in this process")
    import edgevlm
    from edgevlm.data import shapes
    from edgevlm.evaluate import evaluate

    vlm = edgevlm.load(args.bundle)
    seed = shapes.TEST_SEED if args.seed is None else args.seed
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), disable=args.json or not sys.stderr.isatty(), transient=True) as bar:
        task = bar.add_task("eval", total=args.n)
        result = evaluate(vlm, args.dataset, seed, args.n, progress=lambda k: bar.advance(task, k),
                          max_image_tokens=args.max_image_tokens)
    if args.json:
        print(json.dumps({"dataset": args.dataset, "seed": seed, **result}))
        return 0
    print(f"{args.dataset} seed {seed}, n={result['n']}: accuracy {result['accuracy']:.4f}")
    for t, acc in result["per_type"].items():
        print(f"  {t:<10} {acc:.4f}")
    return 0


def _eval_file(args) -> int:
    from .eval_file import evaluate_file

    result = evaluate_file(args)
    if args.json:
        print(json.dumps({"dataset": args.dataset, **result}))
        return 0
    run = result["run"]
    resumed = f", {result['skipped']} read back from {args.output}" if result["skipped"] else ""
    print(f"{args.dataset}, n={result['n']}: exact match {result['exact_match']:.4f}, normalised match "
          f"{result['normalized_match']:.4f} ({result['errors']} rows failed)")
    print(f"  {run['rows']} rows answered in {run['seconds']:.1f} s, {run['rows_per_s']:.1f} rows/s on "
          f"{run['workers']} {run['engine']} worker(s){resumed}")
    for c, acc in result["per_category"].items():
        print(f"  {c:<10} {acc:.4f}")
    return 0

"""`edgevlm eval --bundle B --dataset shapes --seed S --n N [--json]`: exact-match accuracy, greedy."""

from __future__ import annotations

import argparse
import json
import sys

from .common import one_line_errors


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgevlm eval", description=(
        "Measure a bundle's accuracy (greedy, exact match) on a procedural held-out set, overall and per "
        "question type. Without --bundle the embedded demo bundle is evaluated."))
    p.add_argument("--bundle", metavar="B", help="bundle directory (default: the embedded demo)")
    p.add_argument("--dataset", default="shapes", choices=["shapes"],
                   help="the held-out set: shapes, the procedural scenes the demo model was trained on (default)")
    p.add_argument("--seed", type=int, default=None, help="dataset seed (default: the project's test seed)")
    p.add_argument("--n", type=int, default=500, help="number of questions (default 500)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--max-image-tokens", type=int, default=None, metavar="K",
                   help="image-token budget per image (default: the bundle's, else all rows)")
    return p


@one_line_errors
def main(argv=None) -> int:
    args = parser().parse_args(argv)
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

"""`edgevlm batch --input rows.{jsonl,csv,parquet} --output out.{jsonl,parquet}`: one answer per row, at scale.

Each input row names an image (a path; relative paths are read from the input file's directory) and a prompt;
each output row is the input row plus the answer, its finish reason, TTFT and stage times, and `error` (null,
or why the row failed). Rerunning with the same output skips the rows already there. Engines: a local process
pool (default) or Ray Data on a Ray cluster (apps/batch.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from edgevlm.errors import ArgumentError, BundleError, DependencyError

from . import batch, batch_io
from .common import one_line_errors, requires


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The options `batch` and `eval --dataset FILE` share: which engine, how many workers, rows per task."""
    g = p.add_argument_group("engine")
    g.add_argument("--engine", choices=batch.ENGINES, default="local",
                   help="local: a process pool on this machine (default); ray: Ray Data on a Ray cluster")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="model copies, one CPU each (default: the cores here; with ray, the cluster's CPUs)")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="auto (the running cluster) or HOST:PORT; without it --engine ray starts a local instance")
    g.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="rows per task sent to a worker (and per fsync of the output; default 32)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("sampling (greedy by default)")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None, help="sampler seed, the same for every row")
    s.add_argument("--stop", action="append", default=[], metavar="S", help="stop string (repeatable)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgevlm batch", description=(
        "Answer a prompt about each image of a file of rows ({\"image\": path, \"prompt\": text, ...}) and "
        "write one output row per input row (its fields + answer, finish_reason, ttft_s, stage times, error). "
        "A failed row gets its error and the job goes on; rerunning skips the rows already in --output."))
    p.add_argument("--bundle", metavar="B", help="bundle directory (default: the embedded demo)")
    p.add_argument("--input", required=True, metavar="ROWS", help="rows: .jsonl, .csv or .parquet")
    p.add_argument("--output", required=True, metavar="OUT",
                   help="results: .jsonl (appended) or .parquet (a directory of parts)")
    p.add_argument("--prompt", default=None, metavar="P", help="the prompt of rows that have none")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="default: the bundle's")
    p.add_argument("--json-schema", metavar="FILE", help="constrain answers to a JSON schema (not yet available)")
    p.add_argument("--max-image-tokens", type=int, default=None, metavar="K",
                   help="image-token budget per image (default: the bundle's)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_engine_args(p)
    add_sampling_args(p)
    return p


def options(args, max_tokens: int | None) -> batch.Options:
    """The generation options of parsed args (eval has no sampling options: greedy)."""
    bundle = str(Path(args.bundle).resolve()) if args.bundle else None  # workers may run in another directory
    if bundle and args.ray_address is None and not Path(bundle, "manifest.json").is_file():
        # caught here, not by N workers at once (on a cluster the bundle may live on the workers only)
        raise BundleError(f"bundle {args.bundle!r} has no manifest.json")
    sampling = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "repetition_penalty", "seed")
                if hasattr(args, k)}
    return batch.Options(bundle=bundle, max_tokens=max_tokens, stop=tuple(getattr(args, "stop", ())),
                         max_image_tokens=args.max_image_tokens, **sampling)


def make_tasks(rows: list[dict], ids: list, done: set, base: Path, prompt_key: str = "prompt",
               default_prompt: str | None = None) -> list[batch.Task]:
    """(row index, image path, prompt) of the rows whose id is not done; relative paths resolved against base."""
    tasks = []
    for i, (row, rid) in enumerate(zip(rows, ids)):
        if rid in done:
            continue
        image = row.get("image")
        if isinstance(image, str) and image:
            image = str(base / os.path.expanduser(image))  # an absolute path stays itself
        prompt = row.get(prompt_key)
        tasks.append((i, image, prompt if prompt not in (None, "") else default_prompt))
    return tasks


def result_fields(result: dict, rename: dict | None = None) -> dict:
    """The public fields of an engine result (no `_` keys), some renamed (eval: answer -> prediction)."""
    rename = rename or {}
    return {rename.get(k, k): v for k, v in result.items() if not k.startswith("_")}


def execute(tasks: list[batch.Task], opts: batch.Options, args, sink: Callable[[list[dict]], None],
            label: str = "batch", quiet: bool = False) -> dict:
    """Run tasks on args' engine with a progress bar (rows/s); sink receives each batch of results. -> figures."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    t0, n, errors, rss, done_at, cpu = time.perf_counter(), 0, 0, {}, [], 0.0
    first = None  # seconds to the first results: what starting the workers costs
    results = batch.run(tasks, opts, args.engine, args.workers, args.batch_size, args.ray_address)
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), _RateColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), disable=quiet or not sys.stderr.isatty(), transient=True) as bar:
        task = bar.add_task(label, total=len(tasks))
        for out in results:
            first = first or time.perf_counter() - t0
            sink(out)
            n, errors = n + len(out), errors + sum(r["error"] is not None for r in out)
            for r in out:
                rss[r["_worker"]] = max(rss.get(r["_worker"], 0), r["_rss"])
                done_at.append(r["_t"])
                cpu += r["_cpu"]
            bar.advance(task, len(out))
    seconds = time.perf_counter() - t0
    # steady state: rows finished by the workers between their first and last row (startup excluded)
    span = max(done_at) - min(done_at) if done_at else 0.0
    return {"rows": n, "errors": errors, "seconds": round(seconds, 3), "rows_per_s": round(n / max(seconds, 1e-9), 2),
            "first_result_s": round(first or 0.0, 3), "steady_rows_per_s": round((n - 1) / span, 2) if span else 0.0,
            "cpu_s_per_row": round(cpu / n, 5) if n else 0.0,  # a figure other jobs on the cores do not change
            "engine": args.engine, "workers": len(rss), "worker_peak_rss_bytes": rss}


class _RateColumn:  # rich ProgressColumn duck type: renders the task's rows per second
    max_refresh = 0.5

    def __call__(self, task):
        from rich.text import Text

        return Text(f"{task.speed:6.1f} rows/s" if task.speed else "   ... rows/s", style="progress.data.speed")

    def get_table_column(self):
        from rich.table import Column

        return Column(no_wrap=True)


def check_extras(args, command: str, files: tuple[str, ...]) -> None:
    """Refuse at once, before reading or writing anything, when the engine or a file format lacks its extra."""
    if args.engine == "ray":
        requires(f"{command} --engine ray", "ray")
    if any(str(f).lower().endswith(".parquet") for f in files if f):
        requires(f"{command} with Parquet files", "parquet")


def check_columns(rows: list[dict], taken, path) -> None:
    clash = sorted({k for r in rows[:1000] for k in r} & set(taken))
    if clash:
        raise ArgumentError(f"{path}: column(s) {', '.join(clash)} would be overwritten by the results; rename them")


@one_line_errors
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.json_schema:
        raise DependencyError("--json-schema is not yet available: edgevlm has no structured output yet")
    check_extras(args, "batch", (args.input, args.output))
    opts = options(args, args.max_tokens)
    rows = batch_io.read_rows(args.input)
    if rows and not any("image" in r for r in rows[:1000]):
        raise ArgumentError(f"{args.input}: rows need an `image` column (a path)")
    check_columns(rows, batch.RESULT_TYPES, args.input)
    ids = batch_io.row_ids(rows, args.input)
    out = batch_io.open_output(args.output, rows, batch.RESULT_TYPES, args.input)
    skipped = sum(i in out.done for i in ids)
    tasks = make_tasks(rows, ids, out.done, Path(args.input).resolve().parent, default_prompt=args.prompt)

    def sink(results: list[dict]) -> None:
        out.write([{"id": ids[r["_i"]], **rows[r["_i"]], **result_fields(r)} for r in results])

    try:
        figures = execute(tasks, opts, args, sink, quiet=args.json)
    finally:
        out.close()
    summary = {"input": str(args.input), "output": str(args.output), "total": len(rows), "skipped": skipped,
               **figures}
    if args.json:
        print(json.dumps(summary))
    else:
        mem = max(figures["worker_peak_rss_bytes"].values(), default=0) / 2**20
        print(f"{figures['rows']} rows answered ({figures['errors']} failed, {skipped} already in {args.output}) "
              f"in {figures['seconds']:.1f} s: {figures['rows_per_s']:.1f} rows/s on {figures['workers']} "
              f"{args.engine} worker(s), peak {mem:.0f} MiB each")
    return 0


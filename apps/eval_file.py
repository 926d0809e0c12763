"""`edgevlm eval --dataset rows.jsonl`: a labelled set of (image, question, answer) rows, MMStar / Tiny
LVLM-eHub style, scored on `edgevlm batch`'s engines (a local process pool, or Ray Data on a cluster).

Two scores per row, both greedy: exact (the prediction equals the answer, surrounding whitespace aside) and
normalised (equal after `normalize`: Unicode NFKC, lower case, punctuation and articles dropped, single spaces).
With --output the per-row predictions are written as `edgevlm batch` writes its rows, and a rerun resumes.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from pathlib import Path

from edgevlm.errors import ArgumentError

from . import batch, batch_io
from .batch_cmd import check_columns, check_extras, execute, make_tasks, options, result_fields

REQUIRED = ("image", "question", "answer")
CATEGORY_KEYS = ("category", "qtype", "task")  # the first a row has groups the per-category scores
RENAME = {"answer": "prediction"}  # the row's own `answer` is the reference
TYPES = {RENAME.get(k, k): t for k, t in batch.RESULT_TYPES.items()} | {"exact": "bool", "match": "bool"}
ARTICLES = {"a", "an", "the"}


def normalize(s) -> str:
    """Canonical text for the normalised match ("The RED circle." -> "red circle"; "(B)" -> "b")."""
    s = unicodedata.normalize("NFKC", str(s)).lower()
    words = re.sub(r"[^\w\s]", " ", s).split()
    return " ".join([w for w in words if w not in ARTICLES] or words)  # a lone "a" may be an option letter


def judge(prediction, reference) -> dict:
    if prediction is None:  # the row failed: wrong on both counts
        return {"exact": False, "match": False}
    return {"exact": prediction.strip() == str(reference).strip(), "match": normalize(prediction) == normalize(reference)}


def score(records: list[dict]) -> dict:
    """Exact and normalised accuracy over records (rows with prediction/exact/match), overall and per category."""
    n = len(records)
    key = next((k for k in CATEGORY_KEYS if records and k in records[0]), None)
    right, total = defaultdict(int), defaultdict(int)
    for r in records:
        if key is not None:
            total[str(r.get(key))] += 1
            right[str(r.get(key))] += bool(r["match"])
    return {"n": n, "exact_match": sum(bool(r["exact"]) for r in records) / max(n, 1),
            "normalized_match": sum(bool(r["match"]) for r in records) / max(n, 1),
            "errors": sum(r.get("error") is not None for r in records), "category_key": key,
            "per_category": {c: right[c] / total[c] for c in sorted(total)}}


def _load(path) -> tuple[list[dict], list]:
    rows = batch_io.read_rows(path)
    if not rows:
        raise ArgumentError(f"{path} has no rows")
    missing = [k for k in REQUIRED if any(k not in r for r in rows)]
    if missing:
        raise ArgumentError(f"{path}: every row needs {', '.join(REQUIRED)} (missing: {', '.join(missing)})")
    check_columns(rows, TYPES, path)
    return rows, batch_io.row_ids(rows, path)


def evaluate_file(args) -> dict:
    """Score args.bundle on the rows of args.dataset with args' engine -> score() figures + the run's figures."""
    check_extras(args, "eval", (args.dataset, args.output))
    opts = options(args, args.max_tokens)
    rows, ids = _load(args.dataset)
    out = batch_io.open_output(args.output, rows, TYPES, args.dataset) if args.output else None
    done = out.done if out else set()
    tasks = make_tasks(rows, ids, done, Path(args.dataset).resolve().parent, prompt_key="question")
    records: list[dict] = []

    def sink(results: list[dict]) -> None:
        recs = []
        for r in results:
            row, fields = rows[r["_i"]], result_fields(r, RENAME)
            recs.append({"id": ids[r["_i"]], **row, **fields, **judge(fields["prediction"], row["answer"])})
        if out:
            out.write(recs)
        else:
            records.extend(recs)

    try:
        figures = execute(tasks, opts, args, sink, label="eval", quiet=args.json)
    finally:
        if out:
            out.close()
    if out:  # the rows of earlier runs count too
        wanted = set(ids)
        records = [r for r in batch_io.read_output(args.output) if r["id"] in wanted]
    return {**score(records), "run": figures, "skipped": len(done & set(ids))}

"""The hostile corpus (tests/corpus/hostile.py): every bundle, image, cache entry, tokenizer and argument of an
attack round, and 200 seeded variants of the same kinds, each in a fresh process: each ends in an edgevlm
error (or, where the input is only junk in a cache, in a correct answer) -- never another exception, never a
hang, never a blow-up of memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "corpus"))
import hostile  # noqa: E402

# ceilings, not speeds: a case that is refused takes well under a second here; one that hangs or
# decodes a 22 GB image would take minutes and gigabytes
SECONDS = 30.0
RSS_MB = 1024.0
EDGEVLM_ERRORS = {"BundleError", "IntegrityError", "ImageError", "ContextOverflowError", "TemplateError",
                  "BackendError", "ArgumentError", "DependencyError", "EdgeVLMError"}


def run_corpus(tmp_path, names: list[str], seed: int = 0, n: int = 0, timeout: float = 1200) -> list[dict]:
    out = tmp_path / "results.jsonl"
    try:
        subprocess.run([sys.executable, hostile.__file__, str(out), str(seed), str(n), *names],
                       capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pass  # the last "started" line names the case that hung
    lines = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    hung = [x["case"] for x in lines[-1:] if x.get("started")]
    assert not hung, f"case did not finish: {hung[0]}"
    return [x for x in lines if "outcome" in x]


def judge(results: list[dict], expected: dict) -> None:
    bad = []
    for r in results:
        print(f"{r['outcome'][:40]:40} {r['seconds']:6.2f} s {r['rss_growth_mb']:7.1f} MB  {r['case']}")
        allowed = expected.get(r["case"]) or (EDGEVLM_ERRORS | {"ok"})
        if r["outcome"] not in allowed or r["seconds"] > SECONDS or r["rss_growth_mb"] > RSS_MB:
            bad.append(r)
    assert not bad, bad


def test_named_cases(tmp_path):
    table = hostile.cases()
    results = run_corpus(tmp_path, list(table))
    assert len(results) == len(table)
    judge(results, {name: set(allowed) for name, (_, allowed) in table.items()})


@pytest.mark.parametrize("seed", [1, 2])
def test_seeded_variants(tmp_path, seed):
    table = hostile.variants(seed, 100)
    results = run_corpus(tmp_path, list(table), seed=seed, n=100)
    assert len(results) == 100
    judge(results, {name: set(allowed) for name, (_, allowed) in table.items() if allowed})
    refused = sum(r["outcome"] != "ok" for r in results)
    print(f"seed {seed}: {refused} of 100 refused with an edgevlm error, the rest answered")
    assert refused > 20  # the variants are mostly hostile: a corpus that nothing refuses tests nothing
